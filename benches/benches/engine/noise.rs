//! Other processes on a shared machine: how many cores they keep busy, and rerunning a point
//! until they stay quiet.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::runner::Point;
use crate::NOISE_CORES;

/// CPU time in clock ticks (USER_HZ, 100/s on Linux) spent by the whole machine (not idle) and
/// by this process.
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = me.get(me.rfind(')')? + 2..)?.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) of `man 5 proc`; `fields` starts at field 3.
    let own = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((busy, own))
}

/// Cores other processes kept busy on average since `start` (NaN without /proc).
pub fn other_cores(start: Option<(u64, u64)>, since: Instant) -> f64 {
    match (start, cpu_ticks()) {
        (Some((b0, o0)), Some((b1, o1))) => {
            (b1 - b0).saturating_sub(o1 - o0) as f64 / 100.0 / since.elapsed().as_secs_f64()
        }
        _ => f64::NAN,
    }
}

/// Waits (at most `limit`) for a 3-second stretch in which other processes stay under
/// `NOISE_CORES`.
fn wait_for_quiet(limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        let (t, c) = (Instant::now(), cpu_ticks());
        std::thread::sleep(Duration::from_secs(3));
        let others = other_cores(c, t);
        if others.is_nan() || others < NOISE_CORES {
            return;
        }
    }
}

/// Runs `f` until other processes stay under `NOISE_CORES` during the run, at most `tries`
/// times; returns the least disturbed run.
pub fn least_disturbed(label: &str, tries: usize, mut f: impl FnMut() -> Result<Point>) -> Result<Point> {
    let mut best: Option<Point> = None;
    for attempt in 1..=tries.max(1) {
        wait_for_quiet(Duration::from_secs(120));
        let p = f()?;
        let quiet = p.others.is_nan() || p.others < NOISE_CORES;
        if !quiet {
            println!(
                "  ({label}, run {attempt}: other processes kept {:.2} cores busy meanwhile)",
                p.others
            );
        }
        if best.as_ref().is_none_or(|b| p.others < b.others) {
            best = Some(p);
        }
        if quiet {
            break;
        }
    }
    best.context("no run")
}
