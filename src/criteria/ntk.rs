//! Per-unit NTK features and Hessian traces (docs/method.md), and the three criteria that
//! rank by one of them:
//!
//! - `ntk-min`: λ_min(K_u), the PL constant's per-unit proxy (rank by λ_min alone; the
//!   ablation the trained gate is compared against).
//! - `ntk-max`: λ_max(K_u) — MAT, Shi et al., "Towards Understanding and Improving the
//!   Generalization of Pruned Networks via NTK" / the max-eigenvalue attention-head
//!   criterion (NeurIPS 2023): units with a large top NTK eigenvalue are kept.
//! - `hessian`: h_u = tr(H_uu), Optimal-Brain-Damage style sensitivity (LeCun et al. 1990,
//!   trace form as in HAWQ-v2, Dong et al. 2020): units the loss is most curved in are kept.
//!
//! K_u = (1/k) Σ_j J_{u,j} J_{u,j}ᵀ over k output projections s_j = ⟨r_j, f⟩/√dim f, formed
//! layer by layer by `engine::gram`; eigenvalues by `linalg::sym_eigvals`.
//!
//! h_u: where the objective's residual is zero (MSE to the dense output, at the dense
//! weights) the Hessian is the Gauss-Newton matrix (1/N) JᵀJ and tr(H_uu) = E_r[tr K_u]/n,
//! read off the Grams (non-negative; unbiased over the projections). Elsewhere (labels,
//! pseudo-label cross-entropy, masked models of the linear schedule): Hutchinson,
//! h_u ≈ mean over Rademacher probes z of Σ_{p∈u} z_p (Hz)_p, Hz by central differences of
//! f64 gradients (`engine::hvp`), with the standard error over probes reported.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::probe::Probe;
use super::unit_sum;
use crate::engine::gpu::{pl, Device};
use crate::engine::{gram, hvp, Params};
use crate::error::{Error, Result};
use crate::ir::Id;
use crate::pipeline::Phase;
use crate::rng::Rng;
use crate::units::UnitGroup;

/// The features of one unit.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UnitFeatures {
    /// λ_min, floored at the Gram's resolution ([`gram_resolution`] · λ_max): a
    /// rank-deficient unit reports that floor, so its κ is 1 / (n ε_f32).
    pub lambda_min: f64,
    pub lambda_max: f64,
    /// λ_max/λ_min; null in JSON when λ_min = 0 (λ_max = 0: a unit with no gradient).
    pub kappa: Option<f64>,
    pub entropy: f64,
    pub trace_k: f64,
    /// tr(H_uu).
    pub hessian: f64,
    /// Standard error of `hessian` over Hutchinson probes (absent when read off the Grams).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hessian_se: Option<f64>,
}

/// The relative level, n · ε_f32 of λ_max, below which a unit Gram's eigenvalues are
/// round-off: its entries are sums of products of f32 gradients, which two backends (or two
/// summation orders) give only to about that accuracy. Below it λ_min is floored (see
/// `linalg::spectral_features`): many units' Grams are rank-deficient (on EfficientNet-lite0
/// 55% of the filters have λ_min < 1e-8 · λ_max, 1279 of the head conv's 1280), and ranking
/// those by the round-off left in their λ_min chose different filters on the CPU and on a
/// GPU.
pub fn gram_resolution(n: usize) -> f64 {
    n as f64 * f32::EPSILON as f64
}

/// Per group (None where the group is not scored), per unit.
pub type Features = Vec<Option<Vec<UnitFeatures>>>;

/// How h was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HessianMethod {
    GaussNewton,
    Hutchinson,
}

/// The k projection vectors: from `--ntk-projections FILE.npz` (key `projections`, shape
/// [k, per-sample output shape...], as ../bench/ntk_ref.py writes them), else Gaussian from
/// the seed.
pub fn projections(file: Option<&Path>, k: usize, per_sample: usize, seed: u64) -> Result<Vec<Vec<f64>>> {
    let Some(path) = file else {
        return Ok(super::probe::gaussian_projections(k, per_sample, seed));
    };
    let err = |msg: String| Error::Calibration { path: path.to_path_buf(), msg };
    let mut arrays = crate::npz::read_keys(path, &["projections"])?;
    let t = arrays.remove("projections").ok_or_else(|| err("no array 'projections' in the file".into()))?;
    let kk = *t.dims.first().ok_or_else(|| err("'projections' is a scalar".into()))?;
    if kk == 0 || t.numel() != kk * per_sample || !t.dtype.is_float() {
        return Err(err(format!(
            "'projections' has shape {:?} ({}); expected [k, ...] floats with {per_sample} values per projection \
             (the scored output's per-sample size)",
            t.dims, t.dtype
        )));
    }
    let v = t.to_f64_vec();
    Ok(v.chunks(per_sample).map(|c| c.to_vec()).collect())
}

/// λ_min, λ_max, κ, ρ and tr K for every unit of the groups with `scored[g]`, at `params`.
/// Returns the features (hessian left 0) and the weights left out of the Grams.
pub fn ntk_features(
    probe: &Probe,
    params: &Params<f32>,
    proj: &[Vec<f64>],
    scored: &[bool],
) -> Result<(Features, Vec<String>)> {
    ntk_features_timed(probe, params, proj, scored).map(|(f, s, _)| (f, s))
}

/// [`ntk_features`], also returning its phases (name, device, seconds) in order.
pub fn ntk_features_timed(
    probe: &Probe,
    params: &Params<f32>,
    proj: &[Vec<f64>],
    scored: &[bool],
) -> Result<(Features, Vec<String>, Vec<Phase>)> {
    let idx: Vec<usize> = (0..probe.groups.len()).filter(|&g| scored[g]).collect();
    let groups: Vec<UnitGroup> = idx.iter().map(|&g| probe.groups[g].clone()).collect();
    let n = probe.n;
    let device = probe.device.describe();
    let mut phases = Vec::new();
    let (acc, skipped) = match &probe.device {
        Device::Cpu => {
            let mut times = gram::GramTimes::default();
            let gr = gram::grams_mean(
                &probe.low.gp,
                &probe.low.model,
                &probe.inputs,
                params,
                &groups,
                probe.output,
                proj,
                &mut times,
                crate::progress::tick,
            )?;
            let k = proj.len();
            phases.push(Phase::new("ntk: forward", &device, times.forward));
            phases.push(Phase::new(&format!("ntk: backward ({k} projections)"), &device, times.backward));
            phases.push(Phase::new("ntk: per-sample gradients + grams", &device, times.grams));
            (gr.k, gr.skipped)
        }
        Device::Gpu(_) => {
            let t = Instant::now();
            let mut acc: Vec<Vec<Vec<f64>>> = groups.iter().map(|g| vec![vec![0.0; n * n]; g.count]).collect();
            let mut skipped = Vec::new();
            for r in proj {
                let gr = gram::grams_on(
                    &probe.device,
                    &probe.low.gp,
                    &probe.low.model,
                    &probe.inputs,
                    params,
                    &groups,
                    probe.output,
                    r,
                )?;
                for (a, k) in acc.iter_mut().zip(gr.k) {
                    for (au, ku) in a.iter_mut().zip(k) {
                        au.iter_mut().zip(ku).for_each(|(x, y)| *x += y / proj.len() as f64);
                    }
                }
                skipped = gr.skipped;
                crate::progress::tick();
            }
            let name = format!("ntk: forward, backward, per-sample gradients + grams ({} projections)", proj.len());
            phases.push(Phase::new(&name, &device, t.elapsed().as_secs_f64()));
            (acc, skipped)
        }
    };
    let t = Instant::now();
    let mut on_cpu = 0usize;
    let mut out: Features = vec![None; probe.groups.len()];
    for (gi, k) in idx.into_iter().zip(acc) {
        let eigs: Vec<Vec<f64>> = match &probe.device {
            Device::Gpu(cx) if pl::eig_supported(cx, n) => {
                let flat: Vec<f32> = k.iter().flatten().map(|&x| x as f32).collect();
                let e = pl::sym_eigvals(cx, &cx.upload(&flat), n, k.len())?;
                let e = cx.read(&e, k.len() * n)?;
                // f32 Jacobi resolves λ_min only down to ~1e-3·λ_max at this accuracy:
                // below that, the spectrum is recomputed in f64 on the CPU.
                let eigs: Vec<Option<Vec<f64>>> = e
                    .par_chunks(n.max(1))
                    .map(|c| {
                        let (lmin, lmax) = (c[0] as f64, c[c.len() - 1] as f64);
                        if pl::lambda_min_resolved(lmin, lmax, n) {
                            Some(c.iter().map(|&x| x as f64).collect())
                        } else {
                            None
                        }
                    })
                    .collect();
                on_cpu += eigs.iter().filter(|e| e.is_none()).count();
                eigs.into_par_iter()
                    .zip(&k)
                    .map(|(e, ku)| e.unwrap_or_else(|| crate::linalg::sym_eigvals(ku, n)))
                    .collect()
            }
            _ => {
                on_cpu += k.len();
                k.par_iter().map(|ku| crate::linalg::sym_eigvals(ku, n)).collect()
            }
        };
        let feats: Vec<UnitFeatures> = k
            .par_iter()
            .zip(eigs)
            .map(|(ku, eig)| {
                let (lmin, lmax, kappa, rho) = crate::linalg::spectral_features(&eig, gram_resolution(n));
                let trace_k = (0..n).map(|i| ku[i * n + i]).sum();
                UnitFeatures {
                    lambda_min: lmin,
                    lambda_max: lmax,
                    kappa: kappa.is_finite().then_some(kappa),
                    entropy: rho,
                    trace_k,
                    hessian: 0.0,
                    hessian_se: None,
                }
            })
            .collect();
        out[gi] = Some(feats);
    }
    let eig_device = match &probe.device {
        Device::Gpu(cx) if pl::eig_supported(cx, n) && on_cpu > 0 => {
            format!("{device}; {on_cpu} units below f32 resolution in f64 on the cpu")
        }
        Device::Gpu(cx) if pl::eig_supported(cx, n) => device.clone(),
        _ => Device::Cpu.describe(),
    };
    phases.push(Phase::new("eigenvalues", &eig_device, t.elapsed().as_secs_f64()));
    Ok((out, skipped, phases))
}

/// h_u = tr K_u / n: the exact-in-expectation Gauss-Newton trace at zero residual.
pub fn gauss_newton_traces(features: &mut Features, n: usize) {
    for f in features.iter_mut().flatten() {
        for u in f.iter_mut() {
            u.hessian = u.trace_k / n as f64;
            u.hessian_se = None;
        }
    }
}

/// Hutchinson estimates of tr(H_uu) of the probe's objective at the gated weights, with
/// `probes` Rademacher vectors over every unit tensor; fills `hessian` and `hessian_se`.
pub fn hutchinson(probe: &Probe, gates: &[Vec<f64>], probes: usize, seed: u64, features: &mut Features) -> Result<()> {
    let base64: Params<f64> = probe.low.engine.params(&probe.low.model);
    let params = crate::engine::gates::gated_params(&probe.low.model, &base64, &probe.groups, gates);
    let tensors: Vec<Id> = probe.unit_tensors.iter().copied().filter(|t| probe.low.gp.wrt.contains_key(t)).collect();
    // ε relative to the scale of the weights probed (z has unit entries).
    let (ss, cnt) = tensors
        .iter()
        .filter_map(|t| params.get(t))
        .fold((0.0, 0usize), |(s, c), w| (s + w.iter().map(|x| x * x).sum::<f64>(), c + w.len()));
    let eps = 1e-4 * (ss / cnt.max(1) as f64).sqrt().max(1e-3);
    let mut rng = Rng::new(seed ^ 0x4855_5443_4849_4E53);
    let mut samples: Vec<Vec<Vec<f64>>> = probe.groups.iter().map(|g| vec![Vec::new(); g.count]).collect();
    let objective = probe.objective.clone();
    let output = probe.output;
    for _ in 0..probes {
        crate::progress::tick();
        let lens: Vec<usize> = tensors.iter().map(|t| params[t].len()).collect();
        let z: BTreeMap<Id, Vec<f64>> = tensors.iter().copied().zip(rademacher(&mut rng, &lens)).collect();
        let seedf = |o: &crate::engine::loss::Outputs<f64>| Probe::seed(&objective, output, o);
        let hz = hvp::hvp::<f64>(&probe.low.gp, &probe.inputs, &params, &z, eps, &seedf)?;
        let prod: BTreeMap<Id, Vec<f64>> =
            hz.iter().map(|(id, h)| (*id, h.iter().zip(&z[id]).map(|(a, b)| a * b).collect())).collect();
        for (gi, g) in probe.groups.iter().enumerate() {
            if features[gi].is_none() {
                continue;
            }
            for (u, s) in samples[gi].iter_mut().enumerate() {
                s.push(unit_sum(&probe.low.model, g, u, &prod));
            }
        }
    }
    for (gi, f) in features.iter_mut().enumerate() {
        let Some(f) = f else { continue };
        for (u, feat) in f.iter_mut().enumerate() {
            let s = &samples[gi][u];
            let m = s.len().max(1) as f64;
            let mean = s.iter().sum::<f64>() / m;
            let var = s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (m - 1.0).max(1.0);
            feat.hessian = mean;
            feat.hessian_se = Some((var / m).sqrt());
        }
    }
    Ok(())
}

/// Step of the f32 central differences, relative to the weights' RMS: round-off in the
/// difference of two f32 gradients grows as ε_f32/ε and truncation as ε², balanced near
/// ε_f32^(1/3) ≈ 5e-3.
pub const HUTCHINSON_F32_STEP: f64 = 4e-3;

/// The probes of [`hutchinson`] (same seed → same Rademacher vectors, drawn in the same
/// order over the same tensors).
fn rademacher(rng: &mut Rng, lens: &[usize]) -> Vec<Vec<f64>> {
    lens.iter().map(|&len| (0..len).map(|_| if rng.next_u64() & 1 == 1 { 1.0 } else { -1.0 }).collect()).collect()
}

/// [`hutchinson`] on the GPU: the same probes; both gradients of each central difference
/// by the GPU executor (f32, step [`HUTCHINSON_F32_STEP`] × RMS of the weights), and the
/// per-unit sums Σ_{p∈u} z_p (Hz)_p by `unit_dots.wgsl` over the concatenated unit tensors.
/// Mean and standard error over probes in f64 on the host.
///
/// Not used by the pipeline yet: on digits/vgg_bn (labelled cross-entropy) the f32
/// central differences differ from the f64 ones by as much as the traces themselves, which
/// changes the PL selection; the scoring keeps the f64 CPU estimator.
pub fn hutchinson_gpu(
    cx: &crate::engine::gpu::GpuContext,
    probe: &Probe,
    gates: &[Vec<f64>],
    probes: usize,
    seed: u64,
    features: &mut Features,
) -> Result<()> {
    let params = probe.gated(gates);
    let tensors: Vec<Id> = probe.unit_tensors.iter().copied().filter(|t| probe.low.gp.wrt.contains_key(t)).collect();
    let lens: Vec<usize> = tensors.iter().map(|t| params.get(t).map(|w| w.len()).unwrap_or(0)).collect();
    let mut offset: BTreeMap<Id, usize> = BTreeMap::new();
    let mut total = 0;
    for (t, l) in tensors.iter().zip(&lens) {
        offset.insert(*t, total);
        total += l;
    }
    let (ss, cnt) = tensors
        .iter()
        .filter_map(|t| params.get(t))
        .fold((0.0, 0usize), |(s, c), w| (s + w.iter().map(|&x| x as f64 * x as f64).sum::<f64>(), c + w.len()));
    let eps = HUTCHINSON_F32_STEP * (ss / cnt.max(1) as f64).sqrt().max(1e-3);
    // Every scored unit, group-major, as lists of flat indices.
    let mut lists = Vec::new();
    let mut slots = Vec::new();
    for (gi, g) in probe.groups.iter().enumerate() {
        if features[gi].is_none() {
            continue;
        }
        for u in 0..g.count {
            let mut l = Vec::new();
            super::unit_fold(&probe.low.model, g, u, |t, e| {
                if let Some(o) = offset.get(&t) {
                    l.push(o + e);
                }
            });
            lists.push(l);
            slots.push((gi, u));
        }
    }
    let csr = pl::Csr::new(&lists)?;
    let out = cx.empty(probes * csr.units());
    let mut rng = Rng::new(seed ^ 0x4855_5443_4849_4E53);
    let objective = probe.objective.clone();
    let output = probe.output;
    let flat = |m: &BTreeMap<Id, Vec<f32>>| -> Vec<f32> {
        tensors.iter().zip(&lens).flat_map(|(t, &l)| m.get(t).cloned().unwrap_or_else(|| vec![0.0; l])).collect()
    };
    for k in 0..probes {
        let z = rademacher(&mut rng, &lens);
        let shifted = |sign: f64| -> Params<f32> {
            let mut p = params.clone();
            for (t, dz) in tensors.iter().zip(&z) {
                if let Some(w) = params.get(t) {
                    let nw: Vec<f32> = w.iter().zip(dz).map(|(&a, &d)| (a as f64 + sign * eps * d) as f32).collect();
                    p.insert(*t, std::sync::Arc::new(nw));
                }
            }
            p
        };
        let seedf = |o: &crate::engine::loss::Outputs<f32>| Probe::seed(&objective, output, o);
        let none = std::collections::HashSet::new();
        let plus = probe.low.gp.run_on(&probe.device, &probe.inputs, &shifted(1.0), seedf, &none)?;
        let minus = probe.low.gp.run_on(&probe.device, &probe.inputs, &shifted(-1.0), seedf, &none)?;
        let zf: Vec<f32> = z.iter().flatten().map(|&x| x as f32).collect();
        let (gp, gm) = (cx.upload(&flat(&plus.grads)), cx.upload(&flat(&minus.grads)));
        pl::unit_dots(cx, &cx.upload(&zf), &gp, &gm, &csr, (0.5 / eps) as f32, &out, k)?;
    }
    let vals = cx.read(&out, probes * csr.units())?;
    for (j, &(gi, u)) in slots.iter().enumerate() {
        let s: Vec<f64> = (0..probes).map(|k| vals[k * csr.units() + j] as f64).collect();
        let m = s.len().max(1) as f64;
        let mean = s.iter().sum::<f64>() / m;
        let var = s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (m - 1.0).max(1.0);
        if let Some(f) = features[gi].as_mut() {
            f[u].hessian = mean;
            f[u].hessian_se = Some((var / m).sqrt());
        }
    }
    Ok(())
}

/// One feature as scores (group-aligned; unscored groups get zeros).
pub fn scores_from(features: &Features, groups: &[UnitGroup], f: impl Fn(&UnitFeatures) -> f64) -> Vec<Vec<f64>> {
    features
        .iter()
        .zip(groups)
        .map(|(fs, g)| match fs {
            Some(fs) => fs.iter().map(&f).collect(),
            None => vec![0.0; g.count],
        })
        .collect()
}
