//! Calibration data: loading and validating an `.npz` against the model's inputs, and
//! synthetic inputs in each input's valid range when no data is given.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::ir::{Dim, Model};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// A batch of inputs by graph-input name, all with the same leading sample axis.
#[derive(Clone, Debug)]
pub struct Batch {
    pub arrays: BTreeMap<String, Tensor>,
    pub labels: Option<Tensor>,
    pub samples: usize,
}

impl Batch {
    /// The first `n` samples (all of them if fewer).
    pub fn take(&self, n: usize) -> Batch {
        self.range(0, n)
    }

    /// Samples `start..end` (clamped to what there is).
    pub fn range(&self, start: usize, end: usize) -> Batch {
        let end = end.min(self.samples);
        let idx: Vec<usize> = (start.min(end)..end).collect();
        self.select(&idx)
    }

    /// The samples `idx`, in that order (each index must be below `samples`).
    pub fn select(&self, idx: &[usize]) -> Batch {
        Batch {
            arrays: self.arrays.iter().map(|(k, t)| (k.clone(), t.take(0, idx))).collect(),
            labels: self.labels.as_ref().map(|l| l.take(0, idx)),
            samples: idx.len(),
        }
    }

    /// Inputs in graph-input order, as the runtime wants them; inputs the rewrite
    /// narrowed (a KV cache of pruned heads) keep only the slim model's entries.
    pub fn ordered(&self, model: &Model) -> Vec<(String, Tensor)> {
        model
            .inputs
            .iter()
            .filter_map(|&i| {
                let name = &model.value(i).name;
                self.arrays.get(name).map(|t| (name.clone(), narrow(model, name, t)))
            })
            .collect()
    }

    /// The batch as `model` reads it: inputs the rewrite narrowed keep only the slim
    /// model's entries (unchanged for a model whose interface is the dense one's).
    pub fn for_model(&self, model: &Model) -> Batch {
        Batch {
            arrays: self.arrays.iter().map(|(k, t)| (k.clone(), narrow(model, k, t))).collect(),
            labels: self.labels.clone(),
            samples: self.samples,
        }
    }
}

fn narrow(model: &Model, name: &str, t: &Tensor) -> Tensor {
    match model.interface.get(name) {
        Some(n) => n.apply(t),
        None => t.clone(),
    }
}

/// Loads `path` and checks it against the model: every input present, same dtype and rank,
/// fixed dimensions equal, one sample count for all.
pub fn load(path: &Path, model: &Model) -> Result<Batch> {
    let mut arrays = crate::npz::read(path)?;
    let err = |msg: String| Error::Calibration { path: path.to_path_buf(), msg };
    let labels = arrays.remove("labels");
    let mut out = BTreeMap::new();
    let mut samples = None;
    for &i in &model.inputs {
        let v = model.value(i);
        let t = arrays.remove(&v.name).ok_or_else(|| {
            let have: Vec<&str> = arrays.keys().map(String::as_str).collect();
            err(format!("no array for model input '{}' (the file has: {})", v.name, have.join(", ")))
        })?;
        if let Some(dt) = v.dtype {
            if dt != t.dtype {
                return Err(err(format!("input '{}' is {} in the file, the model expects {}", v.name, t.dtype, dt)));
            }
        }
        if let Some(decl) = &v.declared {
            if decl.len() != t.dims.len() {
                return Err(err(format!(
                    "input '{}' has shape {:?} in the file, the model expects rank {}",
                    v.name,
                    t.dims,
                    decl.len()
                )));
            }
            for (k, (d, &n)) in decl.iter().zip(&t.dims).enumerate() {
                if let Dim::Fixed(x) = d {
                    if *x as usize != n {
                        return Err(err(format!(
                            "input '{}' has shape {:?} in the file, the model expects {} at axis {k}",
                            v.name, t.dims, x
                        )));
                    }
                }
            }
        }
        let n = *t.dims.first().ok_or_else(|| err(format!("input '{}' is a scalar, not a batch", v.name)))?;
        if let Some(s) = samples {
            if s != n {
                return Err(err(format!("input '{}' has {n} samples, other inputs have {s}", v.name)));
            }
        }
        if n == 0 {
            return Err(err(format!("input '{}' holds no samples", v.name)));
        }
        samples = Some(n);
        out.insert(v.name.clone(), t);
    }
    if let (Some(l), Some(n)) = (&labels, samples) {
        if l.dims.first() != Some(&n) {
            return Err(err(format!("'labels' has {:?} entries, the inputs have {n} samples", l.dims)));
        }
    }
    Ok(Batch { arrays: out, labels, samples: samples.unwrap_or(0) })
}

/// Synthetic inputs for the given shapes: floats uniform in [-1, 1]; integer inputs that
/// index an embedding table (Gather on a weight) below that table's size; other integer
/// inputs (masks) set to 1.
pub fn synthetic(model: &Model, shapes: &BTreeMap<String, Vec<usize>>, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let mut arrays = BTreeMap::new();
    for &i in &model.inputs {
        let v = model.value(i);
        let dims = shapes.get(&v.name).cloned().unwrap_or_default();
        let n: usize = dims.iter().product();
        let dt = v.dtype.unwrap_or(DType::F32);
        let t = if dt.is_float() {
            let data: Vec<f64> = (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
            Tensor::from_f64_as(dt, dims, &data)
        } else {
            let bound = index_bound(model, i);
            let data: Vec<i64> = match bound {
                Some(b) => (0..n).map(|_| rng.below(b as u64) as i64).collect(),
                None => vec![1; n],
            };
            Tensor::from_i64_as(dt, dims, &data)
        };
        arrays.insert(v.name.clone(), t);
    }
    let samples = arrays.values().next().and_then(|t| t.dims.first().copied()).unwrap_or(1);
    Batch { arrays, labels: None, samples }
}

/// The size of the table an integer input indexes (through Gather on a static table).
fn index_bound(model: &Model, input: crate::ir::Id) -> Option<usize> {
    model
        .consumers(input)
        .into_iter()
        .filter(|&(op, slot)| model.op(op).op_type == "Gather" && slot == 1)
        .filter_map(|(op, _)| model.input(op, 0))
        .filter_map(|t| model.value(t).data.as_ref().map(|d| d.dims.first().copied().unwrap_or(1)))
        .min()
}
