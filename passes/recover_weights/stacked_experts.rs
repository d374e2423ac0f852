//! `--recover lsq` for stacked experts (one weight [E, F, C] holds every expert's
//! down-projection, run by Einsum over all experts or by Gather of the routed ones and a
//! batched MatMul): when whole experts are pruned, the kept experts' down-projections (and
//! their stacked bias) are refit together so the block's combined output reproduces the
//! dense one on the calibration tokens, the removed experts' tokens included.
//!
//! The down-projection is found structurally: the stacked weight of the group whose chain of
//! single consumers reaches a value shaped like the block's input (the combined output)
//! through affine ops only (Gather, MatMul, Einsum, Add, Mul, ReduceSum, layout ops); the
//! up-projection's chain meets the activation and does not qualify; com.microsoft MoE
//! takes it as its fc2 input. Its bias is the [E, C] stacked weight whose chain joins that
//! one.
//!
//! The least-squares features are then measured, not derived from the graph: the combined
//! output Y is affine in the stacked weight W and bias b (with the masked model's routing
//! and hidden activations fixed), Y = Y0 + Σ_e Φ_e W[e] + γ_e b[e]. Forwards with W and b
//! set to selector patterns (W[e, f, c] = 1 for c = f − jC, for each expert e and block j
//! of C features; b[e_i, i] = 1) read Φ_e (the routing weight times the hidden activation)
//! and γ_e (the routing weight) off Y, whatever form the block has. A forward with the
//! actual weights checks the decomposition (so a block that is not affine in W, or whose W
//! has its axes the other way round, is found out and skipped, not refit wrongly). The
//! refit is the ridge least squares of the other consumers (towards the original weights),
//! solved block by block over the kept experts (Gauss-Seidel: exact in one sweep for
//! top-1 routing, where each token sees one expert; a few sweeps for top-k).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{a_b, at_b, padding_rows, residual_after, run_keep, RefitLayer, Runner};
use crate::engine::Params;
use crate::error::{Error, Result};
use crate::ir::{Id, Model};
use crate::tensor::Tensor;
use crate::units::{KeepSet, UnitGroup};

/// A stacked-expert block whose down-projection can be refit.
#[derive(Clone, Debug)]
pub(super) struct Block {
    pub group: usize,
    /// The stacked down-projection [E, F, C] (or [E, C, F]; the probes find which).
    pub weight: Id,
    /// Its stacked bias [E, C].
    pub bias: Option<Id>,
    /// The block's combined output (shaped like its input), and the op that makes it.
    pub combined: Id,
    pub op: Id,
    /// The residual stream added to the combined output, whose drift the refit absorbs.
    pub residual: Option<Id>,
}

/// Ops through which the output stays affine in input `slot` whatever the other inputs are
/// (com.microsoft MoE: in its fc2 weight and bias, the down-projection).
fn affine_step(domain: &str, op_type: &str, slot: usize) -> bool {
    match (domain, op_type) {
        ("", "MatMul" | "Einsum" | "Add" | "Sub" | "Mul") => true,
        (
            "",
            "Gather" | "Squeeze" | "Unsqueeze" | "Reshape" | "Transpose" | "Identity" | "Flatten" | "Expand"
            | "ReduceSum" | "Div" | "Neg",
        ) => slot == 0,
        ("com.microsoft", "MoE") => slot == 4 || slot == 5,
        _ => false,
    }
}

/// The values from `start` along its chain of single consumers through affine steps, up to
/// and including the first one `stop` accepts; None when the chain branches, meets another
/// op, or is longer than 32 steps.
fn affine_chain(model: &Model, start: Id, stop: impl Fn(Id) -> bool) -> Option<Vec<Id>> {
    let mut chain = vec![start];
    let mut v = start;
    for _ in 0..32 {
        let [(op, slot)] = model.consumers(v)[..] else { return None };
        let o = model.op(op);
        if !affine_step(&o.domain, &o.op_type, slot) || model.outputs(op).len() != 1 {
            return None;
        }
        v = model.output(op, 0);
        chain.push(v);
        if stop(v) {
            return Some(chain);
        }
    }
    None
}

/// The refit of experts group `group` (stacked, experts pruned), or why there is none.
pub(super) fn find(model: &Model, groups: &[UnitGroup], group: usize) -> std::result::Result<Block, String> {
    let g = &groups[group];
    let router = *g.producers.first().ok_or("no router")?;
    let x = model.input(router, 0).ok_or("the router has no input")?;
    let xs = model.value(x).shape.clone().ok_or("the shape of the block's input is unknown")?;
    let c = *xs.last().ok_or("the block's input is a scalar")?;
    let dims = |t: Id| model.value(t).data.as_ref().map(|d| d.dims.clone()).unwrap_or_default();
    let stacked: BTreeSet<Id> = g
        .slices
        .iter()
        .filter(|s| s.axis == 0 && dims(s.tensor).first() == Some(&g.count) && model.value(s.tensor).is_static())
        .map(|s| s.tensor)
        .collect();
    // The down-projection: the shortest affine chain to a value shaped like the input.
    let mut best: Option<(Vec<Id>, Id)> = None;
    for &w in &stacked {
        let d = dims(w);
        if d.len() != 3 || (d[1] != c && d[2] != c) || model.consumers(w).len() != 1 {
            continue;
        }
        let chain = affine_chain(model, w, |v| model.value(v).shape.as_ref() == Some(&xs));
        if let Some(ch) = chain.filter(|ch| best.as_ref().is_none_or(|(b, _)| ch.len() < b.len())) {
            best = Some((ch, w));
        }
    }
    let (chain, weight) = best.ok_or("no stacked weight reaches the block output through affine ops only")?;
    let combined = *chain.last().expect("a chain holds its start");
    let on_chain: BTreeSet<Id> = chain.iter().copied().collect();
    let bias = stacked.iter().copied().find(|&b| {
        dims(b) == [g.count, c]
            && model.consumers(b).len() == 1
            && affine_chain(model, b, |v| on_chain.contains(&v)).is_some()
    });
    let (op, _) = model.producer(combined).ok_or("the combined output has no producer")?;
    Ok(Block { group, weight, bias, combined, op, residual: residual_after(model, combined) })
}

/// The probed features of the kept experts: per expert, rows × (F + 1) (the routing weight
/// times the hidden activation, then the routing weight), and Y0.
struct Features {
    per_expert: Vec<Vec<f64>>,
    f: usize,
    y0: Vec<f64>,
}

/// Refits `blk` on the masked model towards `dense` (the dense combined output, plus the
/// dense residual when the block has one), updating `model`'s weights when the fit is
/// better. Err(reason) (inside Ok) when the block cannot be refit.
pub(super) fn refit(
    run: &Runner,
    model: &mut Model,
    keep: &KeepSet,
    blk: &Block,
    dense: &[f64],
    ridge: f64,
) -> Result<std::result::Result<RefitLayer, String>> {
    let masked = crate::passes::rewrite_graph::masked(model, run.groups, keep);
    let params: Params<f32> = run.engine.params(&masked);
    let wt = model.value(blk.weight).data.clone().expect("stacked weights have data");
    let bt = blk.bias.and_then(|b| model.value(b).data.clone());
    let ids: Vec<Id> = std::iter::once(blk.combined).chain(blk.residual).collect();
    let (arena, slots) = run_keep(run.engine, run.device, run.inputs, &params, &ids)?;
    let read = |v: Id| -> Result<(Vec<f64>, Vec<usize>)> {
        let s = slots.get(&v).copied().ok_or_else(|| Error::Other("the MoE block output was not lowered".into()))?;
        let x = arena.get(s).ok_or_else(|| Error::Other("the MoE block output was not kept".into()))?;
        Ok((x.iter().map(|&v| v as f64).collect(), run.engine.lowered.program.shape(s).to_vec()))
    };
    let (ym, shape) = read(blk.combined)?;
    let rm = blk.residual.map(|r| read(r).map(|(v, _)| v)).transpose()?;
    drop(arena);
    let c = *shape.last().unwrap_or(&1);
    let kept: Vec<usize> = (0..run.groups[blk.group].count).filter(|&e| keep.keep[blk.group][e]).collect();
    // The output axis of W: the one of size C; both when F = C (the check picks).
    let d = wt.dims.clone();
    let axes: Vec<usize> = [2, 1].into_iter().filter(|&a| d[a] == c).collect();
    // The first rows (tokens in sample order) whose features fit in memory.
    let f_max = axes.iter().map(|&a| d[3 - a]).max().unwrap_or(0);
    let all_rows = (ym.len() / c.max(1)).min((MAX_FEATURE_VALUES / (kept.len().max(1) * (f_max + 1))).max(1));
    let probe = |w: Tensor, b: Option<Tensor>| -> Result<Vec<f64>> {
        let mut p = params.clone();
        p.insert(blk.weight, Arc::new(crate::engine::tensor_to::<f32>(&w)));
        if let (Some(id), Some(b)) = (blk.bias, b) {
            p.insert(id, Arc::new(crate::engine::tensor_to::<f32>(&b)));
        }
        let (arena, slots) = run_keep(run.engine, run.device, run.inputs, &p, &[blk.combined])?;
        let y = slots
            .get(&blk.combined)
            .and_then(|&s| arena.get(s))
            .ok_or_else(|| Error::Other("the MoE block output was not kept".into()))?;
        Ok(y.iter().map(|&v| v as f64).collect())
    };
    let mut found = None;
    for out_axis in axes {
        let feats = features(&probe, &wt, bt.as_ref(), &kept, out_axis, c, all_rows)?;
        let pred = predict(&feats, &weights_of(&wt, bt.as_ref(), &kept, out_axis), all_rows, c);
        let num: f64 = pred.iter().zip(&ym).map(|(p, y)| (p - y) * (p - y)).sum();
        let den: f64 = ym.iter().zip(&feats.y0).map(|(y, z)| (y - z) * (y - z)).sum();
        if num <= 1e-6 * den.max(f64::MIN_POSITIVE) {
            found = Some((feats, out_axis));
            break;
        }
    }
    let Some((feats, out_axis)) = found else {
        return Ok(Err(format!(
            "the block output is not affine in '{}' as the probes read it",
            model.value(blk.weight).name
        )));
    };
    // Rows: real tokens only; the target is the dense output (+ R_d − R_m) minus Y0.
    let live = padding_rows(run.fit, &shape, all_rows);
    let rows_of: Vec<usize> = (0..all_rows).filter(|&r| live.as_ref().is_none_or(|l| l[r])).collect();
    let mut target = Vec::with_capacity(rows_of.len() * c);
    for &r in &rows_of {
        for j in 0..c {
            let i = r * c + j;
            target.push(dense[i] - rm.as_ref().map_or(0.0, |m| m[i]) - feats.y0[i]);
        }
    }
    let fk = feats.f + 1;
    let a: Vec<Vec<f64>> = feats
        .per_expert
        .iter()
        .map(|fe| rows_of.iter().flat_map(|&r| fe[r * fk..(r + 1) * fk].iter().copied()).collect())
        .collect();
    let rows = rows_of.len();
    // Tokens no kept expert serves (their routing weights, read through the bias, all zero).
    let unrouted = match bt {
        Some(_) => (0..rows).filter(|&r| a.iter().all(|ae| ae[r * fk + feats.f] == 0.0)).count(),
        None => 0,
    };
    let w0 = weights_of(&wt, bt.as_ref(), &kept, out_axis);
    let norm = target.iter().map(|v| v * v).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    let err = |w: &[Vec<f64>]| -> f64 {
        let mut p = vec![0.0; rows * c];
        for (ae, we) in a.iter().zip(w) {
            p.iter_mut().zip(a_b(ae, we, rows, fk, c)).for_each(|(p, q)| *p += q);
        }
        p.iter().zip(&target).map(|(p, t)| (p - t) * (p - t)).sum::<f64>().sqrt() / norm
    };
    let before = err(&w0);
    let new = gauss_seidel(&a, &target, &w0, rows, fk, c, ridge, bt.is_some());
    let after = err(&new);
    let layer = |after: f64| RefitLayer {
        node: model.op(blk.op).name.clone(),
        weight: model.value(blk.weight).name.clone(),
        inputs: d[0] * feats.f,
        kept_inputs: kept.len() * feats.f,
        bias: bt.is_some(),
        residual: blk.residual.map(|r| model.value(r).name.clone()),
        padding_rows: all_rows - rows,
        unrouted_rows: unrouted,
        target: Some(model.value(blk.combined).name.clone()),
        rows,
        rel_err_before: before,
        rel_err_after: after,
        rearranged: None,
    };
    if after >= before {
        return Ok(Ok(layer(before)));
    }
    let out = layer(after);
    let (w, b) = store(&wt, bt.as_ref(), &kept, out_axis, &new);
    model.value_mut(blk.weight).set_data(w);
    if let (Some(id), Some(b)) = (blk.bias, b) {
        model.value_mut(id).set_data(b);
    }
    Ok(Ok(out))
}

/// Φ_e and γ_e of every kept expert on the first `rows` rows, read off the combined output
/// of probe forwards.
fn features(
    probe: &dyn Fn(Tensor, Option<Tensor>) -> Result<Vec<f64>>,
    w: &Tensor,
    b: Option<&Tensor>,
    kept: &[usize],
    out_axis: usize,
    c: usize,
    rows: usize,
) -> Result<Features> {
    let d = &w.dims;
    let f = d[3 - out_axis];
    let zeros_w = || vec![0.0f64; w.numel()];
    let zeros_b = || b.map(|b| vec![0.0f64; b.numel()]);
    let as_w = |v: &[f64]| Tensor::from_f64_as(w.dtype, d.clone(), v);
    let as_b = |v: Option<Vec<f64>>| v.zip(b).map(|(v, b)| Tensor::from_f64_as(b.dtype, b.dims.clone(), &v));
    let mut y0 = probe(as_w(&zeros_w()), as_b(zeros_b()))?;
    y0.truncate(rows * c);
    let fk = f + 1;
    let mut per_expert = vec![vec![0.0; rows * fk]; kept.len()];
    for (k, &e) in kept.iter().enumerate() {
        for start in (0..f).step_by(c) {
            let mut wv = zeros_w();
            for feat in start..(start + c).min(f) {
                wv[entry(d, out_axis, e, feat, feat - start)] = 1.0;
            }
            let y = probe(as_w(&wv), as_b(zeros_b()))?;
            for r in 0..rows {
                for feat in start..(start + c).min(f) {
                    per_expert[k][r * fk + feat] = y[r * c + feat - start] - y0[r * c + feat - start];
                }
            }
        }
    }
    // The routing weights, C experts per probe (through the bias: without one there is no
    // bias to refit and the column stays zero).
    if b.is_some() {
        for chunk in (0..kept.len()).collect::<Vec<_>>().chunks(c) {
            let mut bv = zeros_b().expect("a bias");
            for (i, &k) in chunk.iter().enumerate() {
                bv[kept[k] * c + i] = 1.0;
            }
            let y = probe(as_w(&zeros_w()), as_b(Some(bv)))?;
            for (i, &k) in chunk.iter().enumerate() {
                for r in 0..rows {
                    per_expert[k][r * fk + f] = y[r * c + i] - y0[r * c + i];
                }
            }
        }
    }
    Ok(Features { per_expert, f, y0 })
}

/// The flat index of expert `e`'s entry (input feature `feat`, output `out`) in a stacked
/// weight of dims `d` whose output axis is `out_axis` (2: [E, F, C]; 1: [E, C, F]).
fn entry(d: &[usize], out_axis: usize, e: usize, feat: usize, out: usize) -> usize {
    let (i, j) = if out_axis == 2 { (feat, out) } else { (out, feat) };
    (e * d[1] + i) * d[2] + j
}

/// The kept experts' weights as [F + 1, C] matrices (the bias last, or zeros).
fn weights_of(w: &Tensor, b: Option<&Tensor>, kept: &[usize], out_axis: usize) -> Vec<Vec<f64>> {
    let (wv, bv) = (w.to_f64_vec(), b.map(|b| b.to_f64_vec()));
    let d = &w.dims;
    let (f, c) = (d[3 - out_axis], d[out_axis]);
    kept.iter()
        .map(|&e| {
            let mut m = vec![0.0; (f + 1) * c];
            for feat in 0..f {
                for out in 0..c {
                    m[feat * c + out] = wv[entry(d, out_axis, e, feat, out)];
                }
            }
            if let Some(bv) = &bv {
                m[f * c..].copy_from_slice(&bv[e * c..(e + 1) * c]);
            }
            m
        })
        .collect()
}

/// Writes the kept experts' refit matrices back into the stacked weight and bias.
fn store(w: &Tensor, b: Option<&Tensor>, kept: &[usize], out_axis: usize, m: &[Vec<f64>]) -> (Tensor, Option<Tensor>) {
    let (mut wv, mut bv) = (w.to_f64_vec(), b.map(|b| b.to_f64_vec()));
    let d = &w.dims;
    let (f, c) = (d[3 - out_axis], d[out_axis]);
    for (&e, me) in kept.iter().zip(m) {
        for feat in 0..f {
            for out in 0..c {
                wv[entry(d, out_axis, e, feat, out)] = me[feat * c + out];
            }
        }
        if let Some(bv) = bv.as_mut() {
            bv[e * c..(e + 1) * c].copy_from_slice(&me[f * c..]);
        }
    }
    let bt = bv.zip(b).map(|(v, b)| Tensor::from_f64_as(b.dtype, b.dims.clone(), &v));
    (Tensor::from_f64_as(w.dtype, d.clone(), &wv), bt)
}

/// The ridge least squares min ‖Σ_e A_e W_e − T‖² + Σ_e λ_e ‖W_e − W0_e‖², λ_e = ridge ·
/// mean diag(A_eᵀA_e), by block coordinate descent over the experts (each block's normal
/// equations solved exactly given the others). Without a bias the last column is held at
/// its start (zero). An expert no row reaches keeps its weights.
#[allow(clippy::too_many_arguments)]
fn gauss_seidel(
    a: &[Vec<f64>],
    target: &[f64],
    w0: &[Vec<f64>],
    rows: usize,
    fk: usize,
    c: usize,
    ridge: f64,
    bias: bool,
) -> Vec<Vec<f64>> {
    let cols = if bias { fk } else { fk - 1 };
    // A_e restricted to the fitted columns, and its Gram.
    let ae: Vec<Vec<f64>> =
        a.iter().map(|m| (0..rows).flat_map(|r| m[r * fk..r * fk + cols].iter().copied()).collect()).collect();
    let grams: Vec<Vec<f64>> = ae.iter().map(|m| at_b(m, m, rows, cols, cols)).collect();
    let mut w: Vec<Vec<f64>> = w0.to_vec();
    let mut pred = vec![0.0; rows * c];
    for (m, we) in ae.iter().zip(&w) {
        pred.iter_mut().zip(a_b(m, &we[..cols * c], rows, cols, c)).for_each(|(p, q)| *p += q);
    }
    // One sweep is exact when no row reaches two experts; otherwise sweep until the weights
    // settle (linear convergence; a few sweeps for top-2 on real routing).
    let sweeps = if a.len() == 1 { 1 } else { MAX_SWEEPS };
    for _ in 0..sweeps {
        let mut change = 0.0f64;
        let mut scale = 0.0f64;
        for k in 0..a.len() {
            let mean_diag = (0..cols).map(|i| grams[k][i * cols + i]).sum::<f64>() / cols.max(1) as f64;
            if mean_diag <= 0.0 {
                continue;
            }
            let own = a_b(&ae[k], &w[k][..cols * c], rows, cols, c);
            // The part of the target this expert is left to explain.
            let rest: Vec<f64> = target.iter().zip(&pred).zip(&own).map(|((t, p), o)| t - p + o).collect();
            let lambda = (ridge * mean_diag).max(1e-12);
            let mut g = grams[k].clone();
            for i in 0..cols {
                g[i * cols + i] += lambda;
            }
            let mut rhs = at_b(&ae[k], &rest, rows, cols, c);
            rhs.iter_mut().zip(&w0[k][..cols * c]).for_each(|(r, w)| *r += lambda * w);
            if crate::linalg::cholesky_solve(&mut g, &mut rhs, cols, c).is_err() {
                continue;
            }
            let new_own = a_b(&ae[k], &rhs, rows, cols, c);
            pred.iter_mut().zip(own.iter().zip(&new_own)).for_each(|(p, (o, n))| *p += n - o);
            for (old, new) in w[k][..cols * c].iter().zip(&rhs) {
                change = change.max((new - old).abs());
                scale = scale.max(new.abs());
            }
            w[k][..cols * c].copy_from_slice(&rhs);
        }
        if change <= 1e-10 * scale {
            break;
        }
    }
    w
}

/// Feature values (rows × kept experts × (F + 1), f64) a refit holds at most: 1 GiB.
const MAX_FEATURE_VALUES: usize = 1 << 27;

/// Sweeps of [`gauss_seidel`] at most.
const MAX_SWEEPS: usize = 64;

/// Y0 + Σ_e [Φ_e γ_e] W_e over all rows.
fn predict(feats: &Features, w: &[Vec<f64>], rows: usize, c: usize) -> Vec<f64> {
    let fk = feats.f + 1;
    let mut y = feats.y0.clone();
    for (fe, we) in feats.per_expert.iter().zip(w) {
        y.iter_mut().zip(a_b(fe, we, rows, fk, c)).for_each(|(y, p)| *y += p);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two experts that share rows (top-2 routing): block coordinate descent finds the joint
    /// least-squares solution, which a single pass over the experts does not.
    #[test]
    fn gauss_seidel_solves_overlapping_experts_jointly() {
        let (rows, fk, c) = (40, 3, 2);
        let mut s = 7u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2000) as f64 / 1000.0 - 1.0
        };
        // Every row reaches both experts, with different (routing-weighted) features.
        let a: Vec<Vec<f64>> = (0..2).map(|_| (0..rows * fk).map(|_| next()).collect()).collect();
        let truth: Vec<Vec<f64>> = (0..2).map(|_| (0..fk * c).map(|_| next()).collect()).collect();
        let mut target = vec![0.0; rows * c];
        for (ae, we) in a.iter().zip(&truth) {
            target.iter_mut().zip(a_b(ae, we, rows, fk, c)).for_each(|(t, p)| *t += p);
        }
        let w0 = vec![vec![0.0; fk * c]; 2];
        let w = gauss_seidel(&a, &target, &w0, rows, fk, c, 1e-12, true);
        for (we, te) in w.iter().zip(&truth) {
            for (x, y) in we.iter().zip(te) {
                assert!((x - y).abs() < 1e-6, "{w:?} vs {truth:?}");
            }
        }
        // Without a bias the last column stays at its start.
        let w = gauss_seidel(&a, &target, &w0, rows, fk, c, 1e-12, false);
        assert!(w.iter().all(|we| we[(fk - 1) * c..].iter().all(|&v| v == 0.0)));
    }

    /// The selector layout round-trips: weights_of then store gives the tensor back, for both
    /// axis orders.
    #[test]
    fn stacked_weights_round_trip_in_both_layouts() {
        let w = Tensor::from_f64_as(
            crate::tensor::DType::F32,
            vec![3, 4, 5],
            &(0..60).map(|v| v as f64).collect::<Vec<_>>(),
        );
        let b = Tensor::from_f64_as(
            crate::tensor::DType::F32,
            vec![3, 5],
            &(0..15).map(|v| -(v as f64)).collect::<Vec<_>>(),
        );
        let kept = [0, 2];
        let m = weights_of(&w, Some(&b), &kept, 2);
        // [F + 1, C] = [5, 5]: W[2, 1, 3] = 2·20 + 1·5 + 3 = 48, and b[2, 3] = −13.
        assert_eq!(m[1][5 + 3], 48.0);
        assert_eq!(m[1][4 * 5 + 3], -13.0);
        let (w2, b2) = store(&w, Some(&b), &kept, 2, &m);
        assert_eq!(w2.to_f64_vec(), w.to_f64_vec());
        assert_eq!(b2.unwrap().to_f64_vec(), b.to_f64_vec());
        let w = Tensor::from_f64_as(
            crate::tensor::DType::F32,
            vec![3, 5, 4],
            &(0..60).map(|v| v as f64).collect::<Vec<_>>(),
        );
        let m = weights_of(&w, Some(&b), &kept, 1);
        // Output axis 1: W[2, 3, 1] (out 3, feature 1) = 2·20 + 3·4 + 1 = 53 sits at [1, 3].
        assert_eq!(m[1][5 + 3], 53.0);
        let (w2, _) = store(&w, Some(&b), &kept, 1, &m);
        assert_eq!(w2.to_f64_vec(), w.to_f64_vec());
    }
}
