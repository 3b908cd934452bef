//! What a benchmark ran on, for its report: CPU model, family and model numbers, cores, memory.

/// One line: CPU (with family and model), cores, memory, architecture.
pub fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split(':').nth(1))
            .map_or("?", str::trim)
    };
    let cpu = format!(
        "{} (cpu family {}, model {})",
        field("model name"),
        field("cpu family"),
        field("model")
    );
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or_else(|| "? GiB".into(), |kb| format!("{:.0} GiB", kb / (1 << 20) as f64));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, {mem} RAM, {}", std::env::consts::ARCH)
}
