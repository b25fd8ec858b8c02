//! Experiments: benchmark, protocol, reports and plots.

pub mod bench;
pub mod demo;
pub mod report;
pub mod shard;
pub mod stats;
pub mod submit;
pub mod sweep;
