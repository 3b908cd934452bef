//! The serving engine: one scheduler thread owns the queue, the KV blocks, the adapter page pool
//! and the adapter leases; each step it runs one ragged batch and streams tokens back.

pub mod sampling;
pub mod stop;
