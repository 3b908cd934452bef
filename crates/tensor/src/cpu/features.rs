//! The CPU features the kernels dispatch on, probed once per process (the idea of candle's
//! `cpu/features.rs`). Every kernel reads [`features`] instead of running its own
//! `is_x86_feature_detected!`, so all choices come from one record that the server can log.

use std::fmt;
use std::sync::OnceLock;

/// What this CPU supports, as far as the kernels care; all false off x86_64.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512bf16: bool,
    pub avx512vnni: bool,
}

/// The features of this CPU, probed on first use.
pub fn features() -> &'static CpuFeatures {
    static PROBED: OnceLock<CpuFeatures> = OnceLock::new();
    PROBED.get_or_init(CpuFeatures::probe)
}

impl CpuFeatures {
    #[cfg(target_arch = "x86_64")]
    fn probe() -> Self {
        CpuFeatures {
            avx2: is_x86_feature_detected!("avx2"),
            fma: is_x86_feature_detected!("fma"),
            f16c: is_x86_feature_detected!("f16c"),
            avx512f: is_x86_feature_detected!("avx512f"),
            avx512bw: is_x86_feature_detected!("avx512bw"),
            avx512bf16: is_x86_feature_detected!("avx512bf16"),
            avx512vnni: is_x86_feature_detected!("avx512vnni"),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn probe() -> Self {
        CpuFeatures::default()
    }

    /// The AVX2 matmul tiles, the widener, the AVX2 LoRA tiles and the AVX2 attention body,
    /// which widens f16 K/V (`#[target_feature(enable = "avx2,fma,f16c")]`).
    #[inline]
    pub(crate) fn avx2_fma_f16c(&self) -> bool {
        self.avx2 && self.fma && self.f16c
    }

    /// The AVX-512 matmul kernels and (with [`Self::avx2_fma_f16c`]) attention body.
    #[inline]
    pub(crate) fn avx512f_bw(&self) -> bool {
        self.avx512f && self.avx512bw
    }

    /// The AVX-512 LoRA tiles, compiled with `avx512f,avx2,fma,f16c`.
    #[inline]
    pub(crate) fn avx512f_avx2(&self) -> bool {
        self.avx512f && self.avx2_fma_f16c()
    }

    /// `vdpbf16ps` and its conversions (`bf16dot.rs`); public through
    /// [`super::bf16_activations_supported`].
    #[inline]
    pub(crate) fn avx512_bf16(&self) -> bool {
        self.avx512f_bw() && self.avx512bf16
    }

    /// `vpdpbusd` on zmm registers, for the integer kernels of quantized weights
    /// (`quant_avx512.rs`, compiled with `avx512f,avx512bw,avx512vnni`).
    #[inline]
    pub(crate) fn avx512_vnni(&self) -> bool {
        self.avx512f_bw() && self.avx512vnni
    }

    /// Each feature's name with whether this CPU has it.
    fn flags(&self) -> [(&'static str, bool); 7] {
        [
            ("avx2", self.avx2),
            ("fma", self.fma),
            ("f16c", self.f16c),
            ("avx512f", self.avx512f),
            ("avx512bw", self.avx512bw),
            ("avx512bf16", self.avx512bf16),
            ("avx512vnni", self.avx512vnni),
        ]
    }
}

/// The features present, space-separated (`none` where the kernels get none), for start-up logs.
impl fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for (name, _) in self.flags().into_iter().filter(|(_, has)| *has) {
            if any {
                f.write_str(" ")?;
            }
            f.write_str(name)?;
            any = true;
        }
        if !any {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn probe_agrees_with_std_detection() {
        let f = features();
        let std = [
            is_x86_feature_detected!("avx2"),
            is_x86_feature_detected!("fma"),
            is_x86_feature_detected!("f16c"),
            is_x86_feature_detected!("avx512f"),
            is_x86_feature_detected!("avx512bw"),
            is_x86_feature_detected!("avx512bf16"),
            is_x86_feature_detected!("avx512vnni"),
        ];
        for ((name, has), want) in f.flags().into_iter().zip(std) {
            assert_eq!(has, want, "{name}");
        }
        eprintln!("cpu features: {f}");
    }

    /// Features set from flags in the order of `flags`.
    fn with(f: [bool; 7]) -> CpuFeatures {
        let [avx2, fma, f16c, avx512f, avx512bw, avx512bf16, avx512vnni] = f;
        CpuFeatures {
            avx2,
            fma,
            f16c,
            avx512f,
            avx512bw,
            avx512bf16,
            avx512vnni,
        }
    }

    type Check = fn(&CpuFeatures) -> bool;

    /// Each combined check holds with all features and fails without any one it needs (the
    /// kernels' `target_feature` sets), and only those.
    #[test]
    fn combined_checks_need_exactly_their_features() {
        let checks: [(Check, &[usize]); 5] = [
            (CpuFeatures::avx2_fma_f16c, &[0, 1, 2]),
            (CpuFeatures::avx512f_bw, &[3, 4]),
            (CpuFeatures::avx512f_avx2, &[0, 1, 2, 3]),
            (CpuFeatures::avx512_bf16, &[3, 4, 5]),
            (CpuFeatures::avx512_vnni, &[3, 4, 6]),
        ];
        for (i, (check, needs)) in checks.iter().enumerate() {
            assert!(check(&with([true; 7])), "check {i} with everything");
            for drop in 0..7 {
                let mut f = [true; 7];
                f[drop] = false;
                assert_eq!(check(&with(f)), !needs.contains(&drop), "check {i} without {drop}");
            }
        }
    }

    #[test]
    fn display_lists_present_features() {
        assert_eq!(CpuFeatures::default().to_string(), "none");
        let f = CpuFeatures {
            avx2: true,
            fma: true,
            avx512bf16: true,
            ..CpuFeatures::default()
        };
        assert_eq!(f.to_string(), "avx2 fma avx512bf16");
    }
}
