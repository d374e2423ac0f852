//! Losses on the model's outputs, as seed functions for `GradProgram::run`: each returns
//! the loss value and dL/d(output) for every output (zero for outputs it ignores).
//! Conventions follow docs/method.md: MSE is 0.5·mean over all elements, cross-entropy is
//! the mean over samples, and the NTK projection is s(x) = ⟨r, f(x)⟩/sqrt(dim f) summed
//! over samples (samples are independent, so its backward gives per-sample gradients).

use super::cpu::Real;
use crate::error::{Error, Result};

pub type Outputs<T> = [(String, Vec<usize>, Vec<T>)];

fn zeros<T: Real>(outs: &Outputs<T>) -> Vec<Vec<T>> {
    outs.iter().map(|(_, _, d)| vec![T::zero(); d.len()]).collect()
}

/// 0.5 · mean((f_k − target)²) on output `k`.
pub fn mse<T: Real>(outs: &Outputs<T>, k: usize, target: &[f64]) -> Result<(f64, Vec<Vec<T>>)> {
    let y = &outs.get(k).ok_or_else(|| Error::Other(format!("no output {k}")))?.2;
    if y.len() != target.len() {
        return Err(Error::Other(format!("target has {} values, output {} has {}", target.len(), k, y.len())));
    }
    let n = y.len() as f64;
    let mut cot = zeros(outs);
    let mut l = 0.0;
    for (i, (&a, &t)) in y.iter().zip(target).enumerate() {
        let d = a.to_f64c() - t;
        l += 0.5 * d * d / n;
        cot[k][i] = T::c(d / n);
    }
    Ok((l, cot))
}

/// Mean cross-entropy of logits `[n, C]` (output `k`) against integer labels.
pub fn cross_entropy<T: Real>(outs: &Outputs<T>, k: usize, labels: &[usize]) -> Result<(f64, Vec<Vec<T>>)> {
    let (_, shape, y) = outs.get(k).ok_or_else(|| Error::Other(format!("no output {k}")))?;
    let n = shape.first().copied().unwrap_or(1);
    let c = y.len() / n.max(1);
    if labels.len() != n {
        return Err(Error::Other(format!("{} labels for {n} samples", labels.len())));
    }
    let mut cot = zeros(outs);
    let mut l = 0.0;
    for s in 0..n {
        let row: Vec<f64> = y[s * c..(s + 1) * c].iter().map(|v| v.to_f64c()).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        let lab = labels[s].min(c - 1);
        l += (z.ln() + m - row[lab]) / n as f64;
        for j in 0..c {
            let p = (row[j] - m).exp() / z;
            cot[k][s * c + j] = T::c((p - if j == lab { 1.0 } else { 0.0 }) / n as f64);
        }
    }
    Ok((l, cot))
}

/// Σ_samples ⟨r, f_k(x_s)⟩ / sqrt(dim f), with `r` of one sample's output size.
pub fn projection<T: Real>(outs: &Outputs<T>, k: usize, r: &[f64]) -> Result<(f64, Vec<Vec<T>>)> {
    let y = &outs.get(k).ok_or_else(|| Error::Other(format!("no output {k}")))?.2;
    let d = r.len();
    if d == 0 || y.len() % d != 0 {
        return Err(Error::Other(format!("projection of {d} values for an output of {}", y.len())));
    }
    let scale = 1.0 / (d as f64).sqrt();
    let mut cot = zeros(outs);
    let mut l = 0.0;
    for (i, v) in y.iter().enumerate() {
        l += v.to_f64c() * r[i % d] * scale;
        cot[k][i] = T::c(r[i % d] * scale);
    }
    Ok((l, cot))
}
