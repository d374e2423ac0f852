//! Shared helpers of the engine tests: open a model for a given batch of its calibration
//! data (or synthetic inputs) with the analysis passes run for that batch shape.
#![allow(dead_code)]

use std::path::Path;

use plprune_onnx::tensor::Tensor;
use plprune_onnx::{Config, Session};

#[path = "../common/mod.rs"]
mod common;
#[allow(unused_imports)]
pub use common::{fixture, shared};

/// The model analysed for the first `n` samples of `calib` (or `n` synthetic samples).
/// Returns the session, the inputs and the labels when the file has them.
pub fn prepared(model: &Path, calib: Option<&Path>, n: usize) -> (Session, Vec<(String, Tensor)>, Option<Vec<usize>>) {
    let config = Config { calib: calib.map(|c| c.to_path_buf()), verify: false, ..Config::default() };
    let mut s = Session::open(model, config).expect("open");
    let batch = match s.cx.inputs.as_ref() {
        Some(b) => b.take(n),
        None => {
            s.analyze().expect("analyze");
            let mut shapes = s.cx.input_shapes.clone();
            shapes.values_mut().for_each(|d| d[0] = n);
            plprune_onnx::calib::synthetic(&s.model, &shapes, 11)
        }
    };
    let mut s = Session::open(model, Config { verify: false, ..Config::default() }).expect("open");
    for (k, t) in &batch.arrays {
        s.cx.config.input_shapes.insert(k.clone(), t.dims.clone());
    }
    s.analyze().expect("analyze");
    let labels = batch.labels.as_ref().map(|l| l.to_i64_vec().into_iter().map(|v| v as usize).collect());
    let inputs = batch.ordered(&s.model);
    (s, inputs, labels)
}

/// Deterministic pseudo-random numbers in [-1, 1) (xorshift), for probes and targets.
pub fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}
