//! Adaptation methods, one file each, on the shared training step.

pub mod step;
