//! `--device auto|cpu|cuda[:N]`: which backend runs the model. `auto` takes CUDA when this build
//! has it and a driver and device answer, and otherwise says why in the log and uses the CPU.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("device {other:?}: expected auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The KV + adapter budget on a GPU: the given fraction of the memory still free once the weights
/// are resident, less a reserve for activations and cuBLAS workspaces.
pub fn device_budget(free: usize, total: usize, fraction: f64) -> usize {
    let reserve = (total / 20).max(256 << 20);
    ((free as f64 * fraction.clamp(0.0, 1.0)) as usize).saturating_sub(reserve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, d) in [
            ("auto", Device::Auto),
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(s.parse::<Device>(), Ok(d));
        }
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        let err = "gpu".parse::<Device>().expect_err("not a device");
        assert!(err.contains("cuda:N"), "{err}");
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[test]
    fn budget_leaves_a_reserve() {
        let gib = 1usize << 30;
        assert_eq!(device_budget(100 * gib, 140 * gib, 0.9), 90 * gib - 7 * gib);
        assert_eq!(device_budget(gib / 8, 140 * gib, 0.9), 0);
    }
}
