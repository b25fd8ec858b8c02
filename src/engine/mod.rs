//! The CPU engine: one GEMM entry point, fused row-wise kernels with explicit backward passes, parameters, the
//! AdamW optimiser and CMA-ES (gradient-free). No autograd graph: each layer caches what its backward pass needs.

pub mod attention;
pub mod bf16;
pub mod cma;
pub mod gemm;
pub mod kernels;
pub mod llama_ops;
pub mod param;
pub mod t5_ops;
pub mod weights;

#[cfg(test)]
mod gradcheck;
