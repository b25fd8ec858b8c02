//! Experiments: benchmark, protocol, reports and plots.

pub mod bench;
pub mod demo;
