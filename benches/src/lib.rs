//! Helpers shared by the benchmarks in `benches/benches/`.

pub mod bandwidth;

pub use bandwidth::measure_read_bandwidth_gbps;
