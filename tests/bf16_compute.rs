//! The global bf16 compute mode: routing of `matmul`, the record of which products ran in bf16, and a whole
//! model step in bf16 against f32. Its own test binary, because the compute mode is process-wide.

use loracomp::engine::bf16::{self, Mat};
use loracomp::engine::gemm::{self, matmul, Compute, Trans};
use loracomp::engine::param::AdamW;
use loracomp::methods::step::classifier_step;
use loracomp::models::bert::Batch;
use rand::{Rng, SeedableRng};
use std::sync::Mutex;

/// The tests switch the process-wide mode: one at a time.
static MODE: Mutex<()> = Mutex::new(());

#[test]
fn bf16_mode_routes_large_products_and_records_it() {
    let _g = MODE.lock().unwrap_or_else(|e| e.into_inner());
    let (m, n, k) = (96, 160, 200); // 6.1 MFLOP, n ≥ 128: over the threshold
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let b: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let small = [1.0f32; 16];

    // f32 mode (the default): nothing in bf16
    assert_eq!(gemm::compute(), Compute::F32);
    let mut c32 = vec![0.0f32; m * n];
    gemm::start_recording();
    matmul(m, n, k, 1.0, &a, Trans::N, &b, Trans::T, 0.0, &mut c32);
    assert!(!gemm::stop_recording()[0].bf16);

    gemm::set_compute(Compute::Bf16);
    let mut c16 = vec![0.0f32; m * n];
    let mut tiny = [0.0f32; 16];
    gemm::start_recording();
    matmul(m, n, k, 1.0, &a, Trans::N, &b, Trans::T, 0.0, &mut c16);
    matmul(4, 4, 1, 1.0, &small, Trans::N, &small, Trans::N, 0.0, &mut tiny); // under the threshold
    let calls = gemm::stop_recording();
    gemm::set_compute(Compute::F32);
    assert_eq!(calls[0].bf16, bf16::available(), "large product: bf16 exactly when the CPU has it");
    assert!(!calls[1].bf16, "small product stays f32");
    assert_eq!(tiny[0], 1.0);
    if bf16::available() {
        let mut want = vec![0.0f32; m * n];
        let am = Mat { data: &a, rs: k, cs: 1 };
        let bm = Mat { data: &b, rs: 1, cs: k };
        bf16::matmul_bf16_reference(m, n, k, 1.0, am, bm, 0.0, &mut want, n);
        assert_eq!(c16, want, "routed product = bf16 reference");
        assert_ne!(c16, c32, "bf16 rounding changes the result");
    } else {
        assert_eq!(c16, c32, "no bf16 on this CPU: f32 fallback");
    }
    for (x, y) in c16.iter().zip(&c32) {
        assert!((x - y).abs() < 0.02 * (k as f32).sqrt(), "{x} vs {y}");
    }
}

#[test]
fn bf16_training_steps_track_f32() {
    let _g = MODE.lock().unwrap_or_else(|e| e.into_inner());
    // a few learned-composition steps of a small encoder in each mode: same losses to bf16 precision
    let run = |mode: Compute| -> Vec<f32> {
        gemm::set_compute(mode);
        let mut m = loracomp::experiments::bench::setup("tiny", "learned", 4, 3).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (bsz, seq) = (16, 32);
        let batch = Batch {
            batch: bsz,
            seq,
            ids: (0..bsz * seq).map(|_| rng.gen_range(1..30522u32)).collect(),
            types: vec![0; bsz * seq],
            mask: vec![1.0; bsz * seq],
        };
        let labels: Vec<usize> = (0..bsz).map(|_| rng.gen_range(0..10)).collect();
        let opt = AdamW { lr: 1e-2, ..Default::default() };
        gemm::start_recording();
        let losses =
            (1..=5).map(|t| classifier_step(&mut m, &batch, &labels, &opt, t, &|_| opt.lr, None).unwrap()).collect();
        let in_bf16 = gemm::stop_recording().iter().filter(|c| c.bf16).count();
        assert_eq!(in_bf16 > 0, mode == Compute::Bf16 && bf16::available(), "{mode:?}: {in_bf16} products in bf16");
        gemm::set_compute(Compute::F32);
        losses
    };
    let l32 = run(Compute::F32);
    let l16 = run(Compute::Bf16);
    assert!(l32[4] < l32[0], "f32 loss decreases: {l32:?}");
    assert!(l16[4] < l16[0], "bf16 loss decreases: {l16:?}");
    for (a, b) in l32.iter().zip(&l16) {
        assert!((a - b).abs() < 0.02 * a.abs().max(1.0), "f32 {l32:?} vs bf16 {l16:?}");
    }
}
