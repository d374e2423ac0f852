//! Shape and data-movement ops: Shape, Size, Reshape, Flatten, Transpose, Squeeze,
//! Unsqueeze, Concat, Slice, Split, Gather, GatherElements, GatherND, Scatter /
//! ScatterElements / ScatterND, Expand, Tile, ConstantOfShape, Range, Identity, Dropout,
//! Constant and NonZero. These make up the shape subgraphs of exported transformers
//! (Shape → Gather → Unsqueeze → Concat → Reshape), so all of them fold when their data
//! inputs are known; folding copies element bytes, so any dtype folds without conversion.
//!
//! Opset differences handled: Reshape's shape is an attribute before opset 5 and an input
//! after, with `allowzero` from 14. Squeeze/Unsqueeze `axes` moved from attribute to input
//! at 13 (optional for Squeeze, where no axes means all size-1 dims). Slice's starts, ends,
//! axes and steps are attributes before 10 and inputs from 10 (steps new at 10). Split's
//! `split` moved from attribute to input at 13, and `num_outputs` appeared at 18 (equal
//! chunks, the last one smaller). Shape has `start`/`end` from 15. Flatten accepts negative
//! axes from 11. Dropout has `ratio` as an attribute before 12 and `ratio, training_mode`
//! inputs from 12; its mask output is Bool. Where a model mixes the forms (an input at an
//! older opset), the input wins.

use super::common::{
    broadcast, broadcast_offsets, dim_i64, fact, fact_or_value, foldable, gather_elems, norm_axes, norm_axis, numel,
    offsets, select, strides, to_dims, Arg, Nums, Res,
};
use super::{Fact, InferFn, OpCtx};
use crate::ir::Attr;
use crate::tensor::{DType, Tensor};

pub(crate) fn rule(op_type: &str) -> Option<InferFn> {
    Some(match op_type {
        "Shape" => shape_of,
        "Size" => size,
        "Reshape" => reshape,
        "Flatten" => flatten,
        "Transpose" => transpose,
        "Squeeze" => squeeze,
        "Unsqueeze" => unsqueeze,
        "Concat" => concat,
        "Slice" => slice,
        "Split" => split,
        "Gather" => gather,
        "GatherElements" => gather_elements,
        "GatherND" => gather_nd,
        "Scatter" | "ScatterElements" | "ScatterND" => scatter,
        "Expand" => expand,
        "Tile" => tile,
        "ConstantOfShape" => constant_of_shape,
        "Range" => range,
        "Identity" => identity,
        "Dropout" => dropout,
        "Constant" => constant,
        "NonZero" => non_zero,
        _ => return None,
    })
}

/// The same elements with new dims (Reshape, Flatten, Squeeze, Unsqueeze, Identity).
fn with_dims(x: &Tensor, dims: Vec<usize>) -> Option<Tensor> {
    if !foldable(&dims) {
        return None;
    }
    Tensor::new(x.dtype, dims, x.bytes.clone()).ok()
}

/// An output that keeps input 0's elements and takes `shape` (when known), folding its value.
fn relabel(ctx: &OpCtx, shape: Option<Vec<usize>>) -> Res<Fact> {
    let value = match (&shape, ctx.value(0)?) {
        (Some(s), Some(x)) => with_dims(x, s.clone()),
        _ => None,
    };
    Ok(fact_or_value(ctx.dtype(0), shape, value))
}

fn shape_of(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(Some(DType::I64), None)]);
    };
    let r = dim_i64(x.len());
    let clamp = |v: i64| (if v < 0 { v.saturating_add(r) } else { v }).clamp(0, r) as usize;
    let (start, end) = (clamp(ctx.op.attr_i("start", 0)), clamp(ctx.op.attr_i("end", r)));
    let dims: Vec<i64> = x.get(start..end.max(start)).unwrap_or(&[]).iter().map(|&d| dim_i64(d)).collect();
    Ok(vec![Fact::of_tensor(Tensor::from_i64(vec![dims.len()], &dims))])
}

fn size(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(Some(DType::I64), Some(vec![]))]);
    };
    let n = numel(x).ok_or_else(|| ctx.err(format!("of shape {x:?} overflows")))?;
    Ok(vec![Fact::of_tensor(Tensor::scalar_i64(dim_i64(n)))])
}

fn reshape(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let target = match ctx.ints_arg("shape", 1)? {
        Arg::Known(t) => t,
        Arg::Absent => return Err(ctx.err("has no target shape")),
        Arg::Unknown => return Ok(vec![fact(ctx.dtype(0), None)]),
    };
    let allowzero = ctx.op.attr_i("allowzero", 0) != 0;
    let shape = reshape_dims(ctx.shape(0), &target, allowzero).map_err(|e| ctx.err(e))?;
    Ok(vec![relabel(ctx, shape)?])
}

/// Resolves a Reshape target: 0 copies the input dim (unless `allowzero`), one -1 is
/// inferred. None when the result depends on an unknown input shape.
fn reshape_dims(input: Option<&[usize]>, target: &[i64], allowzero: bool) -> Res<Option<Vec<usize>>> {
    let mut out = Vec::with_capacity(target.len());
    let mut inferred = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if inferred.replace(i).is_some() {
                    return Err(format!("target {target:?} has more than one -1"));
                }
                out.push(1);
            }
            0 if !allowzero => match input {
                Some(x) => out.push(
                    *x.get(i).ok_or_else(|| format!("target {target:?} copies dim {i} of a rank-{} input", x.len()))?,
                ),
                None => return Ok(None),
            },
            d => out.push(usize::try_from(d).map_err(|_| format!("target {target:?} has an invalid dimension {d}"))?),
        }
    }
    let Some(x) = input else {
        return Ok(inferred.is_none().then_some(out));
    };
    let mismatch = || format!("cannot reshape {x:?} into {target:?}");
    let total = numel(x).ok_or_else(mismatch)?;
    let known = numel(&out).ok_or_else(mismatch)?;
    match inferred {
        Some(i) if known != 0 && total % known == 0 => out[i] = total / known,
        None if known == total => {}
        _ => return Err(mismatch()),
    }
    Ok(Some(out))
}

fn flatten(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(ctx.dtype(0), None)]);
    };
    // The axis may be anything in -rank..=rank.
    let (axis, r) = (ctx.op.attr_i("axis", 1), dim_i64(x.len()));
    let a = usize::try_from(if axis < 0 { axis.saturating_add(r) } else { axis })
        .ok()
        .filter(|&a| a <= x.len())
        .ok_or_else(|| ctx.err(format!("axis {axis} is out of range for rank {r}")))?;
    let (outer, inner) = (numel(&x[..a]), numel(&x[a..]));
    let (Some(outer), Some(inner)) = (outer, inner) else {
        return Err(ctx.err(format!("of shape {x:?} overflows")));
    };
    Ok(vec![relabel(ctx, Some(vec![outer, inner]))?])
}

fn transpose(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let perm: Vec<usize> = match ctx.op.attr_ints("perm") {
        Some(p) => {
            let p = to_dims(p).map_err(|e| ctx.err(format!("perm: {e}")))?;
            let mut sorted = p.clone();
            sorted.sort_unstable();
            if !sorted.iter().copied().eq(0..x.len()) {
                return Err(ctx.err(format!("perm {p:?} is not a permutation of the {} axes", x.len())));
            }
            p
        }
        None => (0..x.len()).rev().collect(),
    };
    let out: Vec<usize> = perm.iter().map(|&p| x[p]).collect();
    let value = match ctx.value(0)? {
        Some(t) if foldable(&out) => {
            let st = strides(x);
            let src = offsets(&out, &perm.iter().map(|&p| st[p]).collect::<Vec<_>>());
            Some(gather_elems(t, out.clone(), &src).map_err(|e| ctx.err(e))?)
        }
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, Some(out), value)])
}

fn squeeze(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let axes = ctx.ints_arg("axes", 1)?;
    let (Some(x), false) = (ctx.shape(0), axes == Arg::Unknown) else {
        return Ok(vec![fact(ctx.dtype(0), None)]);
    };
    let drop = match axes {
        Arg::Known(a) => {
            let a = norm_axes(&a, x.len()).map_err(|e| ctx.err(e))?;
            if let Some(&bad) = a.iter().find(|&&i| x[i] != 1) {
                return Err(ctx.err(format!("axis {bad} of shape {x:?} has size {}, not 1", x[bad])));
            }
            a
        }
        _ => (0..x.len()).filter(|&i| x[i] == 1).collect(),
    };
    let out = x.iter().enumerate().filter(|(i, _)| !drop.contains(i)).map(|(_, &d)| d).collect();
    Ok(vec![relabel(ctx, Some(out))?])
}

fn unsqueeze(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let axes = match ctx.ints_arg("axes", 1)? {
        Arg::Known(a) => a,
        Arg::Absent => return Err(ctx.err("has no axes")),
        Arg::Unknown => return Ok(vec![fact(ctx.dtype(0), None)]),
    };
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(ctx.dtype(0), None)]);
    };
    let rank = x.len() + axes.len();
    let axes = norm_axes(&axes, rank).map_err(|e| ctx.err(e))?;
    let mut dims = x.iter();
    let out =
        (0..rank).map(|i| if axes.contains(&i) { Some(1) } else { dims.next().copied() }).collect::<Option<Vec<_>>>();
    Ok(vec![relabel(ctx, out)?])
}

fn concat(ctx: &OpCtx) -> Res<Vec<Fact>> {
    let n = ctx.inputs.len();
    if n == 0 {
        return Err(ctx.err("has no inputs"));
    }
    for i in 0..n {
        ctx.require(i)?;
    }
    let dtype = (0..n).find_map(|i| ctx.dtype(i));
    let axis = match ctx.op.attr("axis") {
        Some(_) => ctx.op.attr_i("axis", 0),
        None => return Err(ctx.err("has no axis attribute")),
    };
    let shapes: Option<Vec<&[usize]>> = (0..n).map(|i| ctx.shape(i)).collect();
    let Some(shapes) = shapes else {
        return Ok(vec![fact(dtype, None)]);
    };
    let first = shapes[0];
    let a = norm_axis(axis, first.len()).map_err(|e| ctx.err(e))?;
    let mut out = first.to_vec();
    for s in &shapes[1..] {
        let compatible = s.len() == first.len() && s.iter().zip(first).enumerate().all(|(i, (x, y))| i == a || x == y);
        if !compatible {
            return Err(ctx.err(format!("inputs of shapes {first:?} and {s:?} differ off axis {a}")));
        }
        out[a] = out[a].checked_add(s[a]).ok_or_else(|| ctx.err("output size overflows"))?;
    }
    let values: Option<Vec<&Tensor>> = (0..n).map(|i| ctx.value(i)).collect::<Res<_>>()?;
    let value = match values {
        Some(vs) if foldable(&out) => {
            if let Some(v) = vs.iter().find(|v| v.dtype != vs[0].dtype) {
                return Err(ctx.err(format!("input types {} and {} differ", vs[0].dtype, v.dtype)));
            }
            // Each input contributes a run of dims[a..] elements per outer index.
            let outer = numel(&out[..a]).unwrap_or(0);
            let mut bytes = Vec::new();
            for o in 0..outer {
                for v in &vs {
                    let run = v.bytes.len() / outer.max(1);
                    bytes.extend_from_slice(v.bytes.get(o * run..(o + 1) * run).unwrap_or(&[]));
                }
            }
            Tensor::new(vs[0].dtype, out.clone(), bytes).ok()
        }
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, Some(out), value)])
}

/// The first index and element count of a Slice along an axis of size `dim`, with starts
/// and ends clamped as ONNX specifies (so i64 sentinels work) and negative steps.
fn slice_range(dim: usize, start: i64, end: i64, step: i64) -> Res<(i128, usize)> {
    if step == 0 {
        return Err("step 0 is invalid".into());
    }
    let d = dim as i128;
    if d == 0 {
        return Ok((0, 0));
    }
    let wrap = |v: i64| if v < 0 { v as i128 + d } else { v as i128 };
    let (s, e, st) = (wrap(start), wrap(end), step as i128);
    let (s, count) = if st > 0 {
        let (s, e) = (s.clamp(0, d), e.clamp(0, d));
        (s, if e > s { (e - s + st - 1) / st } else { 0 })
    } else {
        let (s, e) = (s.clamp(0, d - 1), e.clamp(-1, d - 1));
        (s, if s > e { (s - e - st - 1) / -st } else { 0 })
    };
    Ok((s, usize::try_from(count).unwrap_or(0)))
}

fn slice(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let unknown = || Ok(vec![fact(dtype, None)]);
    let arg = |name: &str, slot: usize| ctx.ints_arg(name, slot);
    let (starts, ends, axes, steps) = (arg("starts", 1)?, arg("ends", 2)?, arg("axes", 3)?, arg("steps", 4)?);
    if [&starts, &ends, &axes, &steps].contains(&&Arg::Unknown) {
        return unknown();
    }
    let (Some(starts), Some(ends)) = (starts.known(), ends.known()) else {
        return Err(ctx.err("needs starts and ends"));
    };
    let Some(x) = ctx.shape(0) else {
        return unknown();
    };
    let n = starts.len();
    let axes = axes.known().unwrap_or_else(|| (0..dim_i64(n)).collect());
    let steps = steps.known().unwrap_or_else(|| vec![1; n]);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return Err(ctx.err(format!(
            "has {n} starts, {} ends, {} axes and {} steps",
            ends.len(),
            axes.len(),
            steps.len()
        )));
    }
    norm_axes(&axes, x.len()).map_err(|e| ctx.err(e))?;
    let mut picks: Vec<(i128, i128, usize)> = x.iter().map(|&d| (0, 1, d)).collect();
    for i in 0..n {
        let a = norm_axis(axes[i], x.len()).map_err(|e| ctx.err(e))?;
        let (first, count) = slice_range(x[a], starts[i], ends[i], steps[i]).map_err(|e| ctx.err(e))?;
        picks[a] = (first, steps[i] as i128, count);
    }
    let out: Vec<usize> = picks.iter().map(|p| p.2).collect();
    let value = match ctx.value(0)? {
        Some(t) if foldable(&out) => {
            let lists: Vec<Vec<usize>> =
                picks.iter().map(|&(f, st, c)| (0..c).map(|k| (f + k as i128 * st) as usize).collect()).collect();
            Some(select(t, &lists).map_err(|e| ctx.err(e))?)
        }
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, Some(out), value)])
}

fn split(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let sizes = ctx.ints_arg("split", 1)?;
    let num_outputs = ctx.op.attr("num_outputs").map(|_| ctx.attr_usize("num_outputs", 0)).transpose()?;
    if let Some(n) = num_outputs.filter(|&n| n > MAX_OUTPUTS) {
        return Err(ctx.err(format!("num_outputs={n} is implausibly large")));
    }
    let count = match (&sizes, num_outputs) {
        (Arg::Known(s), _) => Some(s.len()),
        (_, Some(n)) => Some(n),
        _ => None,
    };
    let (Some(x), Some(count)) = (ctx.shape(0), count) else {
        // Without sizes or num_outputs the output count is the node's, which a rule cannot see.
        return Ok(vec![fact(dtype, None); count.unwrap_or(0)]);
    };
    let a = norm_axis(ctx.op.attr_i("axis", 0), x.len()).map_err(|e| ctx.err(e))?;
    let d = x[a];
    let sizes = match sizes {
        Arg::Known(s) => {
            let s = to_dims(&s).map_err(|e| ctx.err(format!("split: {e}")))?;
            if s.iter().try_fold(0usize, |acc, &v| acc.checked_add(v)) != Some(d) {
                return Err(ctx.err(format!("sizes {s:?} do not add up to {d}")));
            }
            s
        }
        Arg::Unknown => return Ok(vec![fact(dtype, None); count]),
        Arg::Absent if count == 0 => return Err(ctx.err("num_outputs=0 is invalid")),
        Arg::Absent => {
            let chunk = d.div_ceil(count);
            let last = chunk
                .checked_mul(count - 1)
                .and_then(|used| d.checked_sub(used))
                .ok_or_else(|| ctx.err(format!("cannot split {d} into {count} chunks")))?;
            let mut s = vec![chunk; count - 1];
            s.push(last);
            s
        }
    };
    let value = ctx.value(0)?;
    let mut facts = Vec::with_capacity(sizes.len());
    let mut offset = 0;
    for len in sizes {
        let mut out = x.to_vec();
        out[a] = len;
        let folded = match value {
            Some(t) if foldable(&out) => {
                let mut picks: Vec<Vec<usize>> = x.iter().map(|&n| (0..n).collect()).collect();
                picks[a] = (offset..offset + len).collect();
                Some(select(t, &picks).map_err(|e| ctx.err(e))?)
            }
            _ => None,
        };
        facts.push(fact_or_value(dtype, Some(out), folded));
        offset += len;
    }
    Ok(facts)
}

/// Bound on Split's `num_outputs`, so a malformed attribute cannot allocate without limit.
const MAX_OUTPUTS: usize = 1 << 16;

fn gather(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(0);
    let (Some(x), Some(ind)) = (ctx.shape(0), ctx.shape(1)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let a = norm_axis(ctx.op.attr_i("axis", 0), x.len()).map_err(|e| ctx.err(e))?;
    let out: Vec<usize> = x[..a].iter().chain(ind).chain(&x[a + 1..]).copied().collect();
    let Some(indices) = ctx.ints(1)? else {
        return Ok(vec![fact(dtype, Some(out))]);
    };
    let d = dim_i64(x[a]);
    let indices = indices
        .iter()
        .map(|&i| {
            let j = if i < 0 { i.saturating_add(d) } else { i };
            usize::try_from(j)
                .ok()
                .filter(|&j| j < x[a])
                .ok_or_else(|| ctx.err(format!("index {i} is out of range for axis {a} of size {d}")))
        })
        .collect::<Res<Vec<_>>>()?;
    let value = match ctx.value(0)? {
        Some(t) if foldable(&out) => {
            let mut picks: Vec<Vec<usize>> = x.iter().map(|&n| (0..n).collect()).collect();
            picks[a] = indices;
            // Picking the flattened indices along `a` lays the elements out in `out`'s order.
            with_dims(&select(t, &picks).map_err(|e| ctx.err(e))?, out.clone())
        }
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, Some(out), value)])
}

fn gather_elements(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(0);
    let (Some(x), Some(ind)) = (ctx.shape(0), ctx.shape(1)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    if x.len() != ind.len() {
        return Err(ctx.err(format!("data of shape {x:?} and indices of shape {ind:?} differ in rank")));
    }
    norm_axis(ctx.op.attr_i("axis", 0), x.len()).map_err(|e| ctx.err(e))?;
    Ok(vec![fact(dtype, Some(ind.to_vec()))])
}

fn gather_nd(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(0);
    let (Some(x), Some(ind)) = (ctx.shape(0), ctx.shape(1)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let b = ctx.attr_usize("batch_dims", 0)?;
    let Some((&k, lead)) = ind.split_last() else {
        return Err(ctx.err("indices must have rank 1 or more"));
    };
    let tail = b.checked_add(k).and_then(|t| x.get(t..)).ok_or_else(|| {
        ctx.err(format!("indices of shape {ind:?} index too many dims of data {x:?} (batch_dims {b})"))
    })?;
    Ok(vec![fact(dtype, Some(lead.iter().chain(tail).copied().collect()))])
}

fn scatter(ctx: &OpCtx) -> Res<Vec<Fact>> {
    for i in 0..3 {
        ctx.require(i)?;
    }
    Ok(vec![fact(ctx.dtype(0), ctx.shape(0).map(<[usize]>::to_vec))])
}

fn expand(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(0);
    let (Some(x), Some(target)) = (ctx.shape(0), ctx.ints(1)?) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let target = to_dims(&target).map_err(|e| ctx.err(e))?;
    let out = broadcast(&[x, &target]).map_err(|e| ctx.err(e))?;
    let value = match ctx.value(0)? {
        Some(t) if foldable(&out) => {
            Some(gather_elems(t, out.clone(), &broadcast_offsets(&out, x)).map_err(|e| ctx.err(e))?)
        }
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, Some(out), value)])
}

fn tile(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(0);
    let (Some(x), Some(reps)) = (ctx.shape(0), ctx.ints(1)?) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let reps = to_dims(&reps).map_err(|e| ctx.err(format!("repeats: {e}")))?;
    if reps.len() != x.len() {
        return Err(ctx.err(format!("has {} repeats for rank {}", reps.len(), x.len())));
    }
    let out = x
        .iter()
        .zip(&reps)
        .map(|(&d, &r)| d.checked_mul(r))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ctx.err("output size overflows"))?;
    let value = match ctx.value(0)? {
        Some(t) if foldable(&out) => {
            let picks: Vec<Vec<usize>> = out.iter().zip(x).map(|(&o, &d)| (0..o).map(|j| j % d).collect()).collect();
            Some(select(t, &picks).map_err(|e| ctx.err(e))?)
        }
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, Some(out), value)])
}

fn constant_of_shape(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let fill = match ctx.op.attr("value") {
        Some(Attr::Tensor(t)) if t.numel() == 1 && t.bytes.len() == t.dtype.size() => t.clone(),
        Some(Attr::Tensor(t)) => return Err(ctx.err(format!("value must hold one element, not shape {:?}", t.dims))),
        _ => Tensor::zeros(DType::F32, vec![1]),
    };
    let Some(dims) = ctx.ints(0)? else {
        return Ok(vec![fact(Some(fill.dtype), None)]);
    };
    let out = to_dims(&dims).map_err(|e| ctx.err(e))?;
    if !foldable(&out) {
        return Ok(vec![fact(Some(fill.dtype), Some(out))]);
    }
    let n = numel(&out).unwrap_or(0);
    let t = Tensor::new(fill.dtype, out, fill.bytes.repeat(n)).map_err(|e| ctx.err(e))?;
    Ok(vec![Fact::of_tensor(t)])
}

fn range(ctx: &OpCtx) -> Res<Vec<Fact>> {
    for i in 0..3 {
        ctx.require(i)?;
    }
    let dtype = ctx.dtype(0);
    let mut scalars = Vec::with_capacity(3);
    for i in 0..3 {
        match ctx.value(i)? {
            Some(t) if t.numel() == 1 => scalars.push(t),
            Some(t) => return Err(ctx.err(format!("input {i} must be a scalar, not shape {:?}", t.dims))),
            None => return Ok(vec![fact(dtype, None)]),
        }
    }
    let (start, limit, delta) = (scalars[0], scalars[1], scalars[2]);
    let dtype = start.dtype;
    let count = if dtype.is_float() {
        let (s, l, d) = (start.get_f64(0), limit.get_f64(0), delta.get_f64(0));
        let n = ((l - s) / d).ceil().max(0.0);
        if d == 0.0 || !n.is_finite() || n > usize::MAX as f64 {
            return Err(ctx.err(format!("from {s} to {l} by {d} is invalid")));
        }
        n as usize
    } else {
        let (s, l, d) = (start.get_i64(0) as i128, limit.get_i64(0) as i128, delta.get_i64(0) as i128);
        if d == 0 {
            return Err(ctx.err("delta 0 is invalid"));
        }
        let n = ((l - s) + d - d.signum()) / d;
        usize::try_from(n.max(0)).map_err(|_| ctx.err("output size overflows"))?
    };
    if !foldable(&[count]) {
        return Ok(vec![fact(Some(dtype), Some(vec![count]))]);
    }
    let nums = if dtype.is_float() {
        let (s, d) = (start.get_f64(0), delta.get_f64(0));
        Nums::Float((0..count).map(|k| s + k as f64 * d).collect())
    } else {
        let (s, d) = (start.get_i64(0), delta.get_i64(0));
        Nums::Int((0..count).map(|k| s.wrapping_add((k as i64).wrapping_mul(d))).collect())
    };
    Ok(vec![Fact::of_tensor(nums.into_tensor(dtype, vec![count]).map_err(|e| ctx.err(e))?)])
}

fn identity(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    Ok(vec![relabel(ctx, ctx.shape(0).map(<[usize]>::to_vec))?])
}

fn dropout(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let shape = ctx.shape(0).map(<[usize]>::to_vec);
    // Folds as the identity only when it is known not to be in training mode.
    let inference = match ctx.input(2) {
        None => true,
        Some(_) => ctx.value(2)?.is_some_and(|t| t.numel() == 1 && t.get_i64(0) == 0),
    };
    let y = if inference { relabel(ctx, shape.clone())? } else { fact(ctx.dtype(0), shape.clone()) };
    Ok(vec![y, fact(Some(DType::Bool), shape)])
}

fn constant(ctx: &OpCtx) -> Res<Vec<Fact>> {
    let op = ctx.op;
    let t = match (
        op.attr("value"),
        op.attr("value_float"),
        op.attr("value_floats"),
        op.attr("value_int"),
        op.attr("value_ints"),
    ) {
        (Some(Attr::Tensor(t)), ..) => {
            Tensor::new(t.dtype, t.dims.clone(), t.bytes.clone()).map_err(|e| ctx.err(format!("value: {e}")))?
        }
        (Some(_), ..) => return Ok(vec![Fact::default()]),
        (_, Some(Attr::Float(f)), ..) => Tensor::from_f32(vec![], &[*f]),
        (_, _, Some(Attr::Floats(f)), ..) => Tensor::from_f32(vec![f.len()], f),
        (_, _, _, Some(Attr::Int(i)), _) => Tensor::scalar_i64(*i),
        (_, _, _, _, Some(Attr::Ints(v))) => Tensor::from_i64(vec![v.len()], v),
        _ => {
            return match (op.attr("value_string"), op.attr("value_strings"), op.attr("sparse_value")) {
                (Some(_), ..) => Ok(vec![fact(None, Some(vec![]))]),
                (_, Some(Attr::Strings(s)), _) => Ok(vec![fact(None, Some(vec![s.len()]))]),
                (_, _, Some(_)) => Ok(vec![Fact::default()]),
                _ => Err(ctx.err("has no value attribute")),
            }
        }
    };
    Ok(vec![Fact::of_tensor(t)])
}

fn non_zero(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    Ok(vec![fact(Some(DType::I64), None)])
}

#[cfg(test)]
mod tests {
    use super::super::common::tests::{floats, infer, ints, op, shaped, unknown};
    use super::*;

    fn val(f: &Fact) -> Vec<i64> {
        f.value.as_ref().expect("folded").to_i64_vec()
    }

    /// BERT's mask/head reshaping: Shape → Gather → Unsqueeze → Concat → Reshape with -1.
    #[test]
    fn bert_shape_subgraph() {
        let x = shaped(DType::F32, &[2, 128, 768]);
        let shape = infer(&op("Shape", vec![]), vec![x.clone()], 13).unwrap();
        assert_eq!(val(&shape[0]), vec![2, 128, 768]);
        let batch =
            infer(&op("Gather", vec![("axis", Attr::Int(0))]), vec![Some(shape[0].clone()), ints(&[], &[0])], 13)
                .unwrap();
        assert_eq!((batch[0].shape.clone(), val(&batch[0])), (Some(vec![]), vec![2]));
        let seq = infer(&op("Gather", vec![]), vec![Some(shape[0].clone()), ints(&[], &[-2])], 13).unwrap();
        assert_eq!(val(&seq[0]), vec![128]);
        let unsq =
            |f: &Fact| infer(&op("Unsqueeze", vec![]), vec![Some(f.clone()), ints(&[1], &[0])], 13).unwrap().remove(0);
        let (b, s) = (unsq(&batch[0]), unsq(&seq[0]));
        assert_eq!(b.shape, Some(vec![1]));
        let cat = infer(
            &op("Concat", vec![("axis", Attr::Int(0))]),
            vec![Some(b), Some(s), ints(&[1], &[12]), ints(&[1], &[-1])],
            13,
        )
        .unwrap();
        assert_eq!(val(&cat[0]), vec![2, 128, 12, -1]);
        let r = infer(&op("Reshape", vec![]), vec![x.clone(), Some(cat[0].clone())], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 128, 12, 64]));
        assert_eq!(r[0].dtype, Some(DType::F32));
        // Reshape with 0 (copy) and -1, and the errors.
        let r = infer(&op("Reshape", vec![]), vec![x.clone(), ints(&[3], &[0, 0, -1])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 128, 768]));
        let r = infer(
            &op("Reshape", vec![("allowzero", Attr::Int(1))]),
            vec![shaped(DType::F32, &[0, 4]), ints(&[2], &[4, 0])],
            14,
        )
        .unwrap();
        assert_eq!(r[0].shape, Some(vec![4, 0]));
        assert!(infer(&op("Reshape", vec![]), vec![x.clone(), ints(&[2], &[-1, 7])], 13).is_err());
        assert!(infer(&op("Reshape", vec![]), vec![x.clone(), ints(&[2], &[-1, -1])], 13).is_err());
        assert!(infer(&op("Reshape", vec![]), vec![x.clone(), ints(&[2], &[5, 5])], 13).is_err());
        let r = infer(&op("Reshape", vec![]), vec![unknown(), ints(&[2], &[4, 5])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![4, 5]));
        let r = infer(&op("Reshape", vec![("shape", Attr::Ints(vec![-1]))]), vec![ints(&[2, 2], &[1, 2, 3, 4])], 4)
            .unwrap();
        assert_eq!((r[0].shape.clone(), val(&r[0])), (Some(vec![4]), vec![1, 2, 3, 4]));
    }

    #[test]
    fn shape_start_end_and_size() {
        let x = shaped(DType::F32, &[2, 3, 4, 5]);
        let s =
            infer(&op("Shape", vec![("start", Attr::Int(1)), ("end", Attr::Int(-1))]), vec![x.clone()], 15).unwrap();
        assert_eq!(val(&s[0]), vec![3, 4]);
        let s =
            infer(&op("Shape", vec![("start", Attr::Int(-10)), ("end", Attr::Int(10))]), vec![x.clone()], 15).unwrap();
        assert_eq!(val(&s[0]), vec![2, 3, 4, 5]);
        let s = infer(&op("Shape", vec![("start", Attr::Int(3)), ("end", Attr::Int(1))]), vec![x.clone()], 15).unwrap();
        assert_eq!(s[0].shape, Some(vec![0]));
        assert_eq!(val(&infer(&op("Size", vec![]), vec![x], 13).unwrap()[0]), vec![120]);
    }

    #[test]
    fn slice_sentinels_and_steps() {
        let x = ints(&[2, 5], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let big = 9223372036854775807;
        // x[:, 1:] with the INT64_MAX sentinel.
        let r =
            infer(&op("Slice", vec![]), vec![x.clone(), ints(&[1], &[1]), ints(&[1], &[big]), ints(&[1], &[1])], 13)
                .unwrap();
        assert_eq!((r[0].shape.clone(), val(&r[0])), (Some(vec![2, 4]), vec![1, 2, 3, 4, 6, 7, 8, 9]));
        // x[:, ::-2] with -INT64_MAX as the end.
        let r = infer(
            &op("Slice", vec![]),
            vec![x.clone(), ints(&[1], &[-1]), ints(&[1], &[-big]), ints(&[1], &[-1]), ints(&[1], &[-2])],
            13,
        )
        .unwrap();
        assert_eq!(val(&r[0]), vec![4, 2, 0, 9, 7, 5]);
        // x[-1:, :-1] with default axes; i64::MIN start clamps to 0.
        let r = infer(&op("Slice", vec![]), vec![x.clone(), ints(&[2], &[-1, i64::MIN]), ints(&[2], &[big, -1])], 13)
            .unwrap();
        assert_eq!(val(&r[0]), vec![5, 6, 7, 8]);
        // Empty result and the attribute form of opset 1.
        let r = infer(&op("Slice", vec![]), vec![x.clone(), ints(&[1], &[3]), ints(&[1], &[1]), ints(&[1], &[1])], 13)
            .unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 0]));
        let a = op(
            "Slice",
            vec![("starts", Attr::Ints(vec![1])), ("ends", Attr::Ints(vec![2])), ("axes", Attr::Ints(vec![0]))],
        );
        assert_eq!(val(&infer(&a, vec![x.clone()], 1).unwrap()[0]), vec![5, 6, 7, 8, 9]);
        assert!(infer(
            &op("Slice", vec![]),
            vec![x.clone(), ints(&[1], &[0]), ints(&[1], &[1]), ints(&[1], &[0]), ints(&[1], &[0])],
            13
        )
        .is_err());
        assert!(infer(&op("Slice", vec![]), vec![x.clone(), ints(&[1], &[0]), ints(&[1], &[1]), ints(&[1], &[2])], 13)
            .is_err());
        let r = infer(&op("Slice", vec![]), vec![x, ints(&[1], &[0]), unknown(), ints(&[1], &[0])], 13).unwrap();
        assert_eq!(r[0].shape, None);
    }

    #[test]
    fn squeeze_unsqueeze_both_opsets() {
        let x = ints(&[1, 3, 1], &[7, 8, 9]);
        let attr = op("Squeeze", vec![("axes", Attr::Ints(vec![0]))]);
        assert_eq!(infer(&attr, vec![x.clone()], 11).unwrap()[0].shape, Some(vec![3, 1]));
        let r = infer(&op("Squeeze", vec![]), vec![x.clone(), ints(&[1], &[-1])], 13).unwrap();
        assert_eq!((r[0].shape.clone(), val(&r[0])), (Some(vec![1, 3]), vec![7, 8, 9]));
        assert_eq!(infer(&op("Squeeze", vec![]), vec![x.clone()], 13).unwrap()[0].shape, Some(vec![3]));
        assert!(infer(&op("Squeeze", vec![]), vec![x.clone(), ints(&[1], &[1])], 13).is_err());
        let u = op("Unsqueeze", vec![("axes", Attr::Ints(vec![0, -1]))]);
        assert_eq!(infer(&u, vec![x.clone()], 11).unwrap()[0].shape, Some(vec![1, 1, 3, 1, 1]));
        let r = infer(&op("Unsqueeze", vec![]), vec![shaped(DType::F32, &[3, 4]), ints(&[2], &[1, 3])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![3, 1, 4, 1]));
        assert!(infer(&op("Unsqueeze", vec![]), vec![x.clone()], 13).is_err());
        assert!(infer(&op("Unsqueeze", vec![]), vec![x, ints(&[1], &[5])], 13).is_err());
    }

    #[test]
    fn transpose_flatten_concat() {
        let x = ints(&[2, 3], &[0, 1, 2, 3, 4, 5]);
        let r = infer(&op("Transpose", vec![]), vec![x.clone()], 13).unwrap();
        assert_eq!((r[0].shape.clone(), val(&r[0])), (Some(vec![3, 2]), vec![0, 3, 1, 4, 2, 5]));
        let p = op("Transpose", vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
        assert_eq!(
            infer(&p, vec![shaped(DType::F32, &[2, 7, 12, 64])], 13).unwrap()[0].shape,
            Some(vec![2, 12, 7, 64])
        );
        assert!(infer(&p, vec![shaped(DType::F32, &[2, 7, 12])], 13).is_err());
        let f = infer(&op("Flatten", vec![]), vec![shaped(DType::F32, &[2, 512, 1, 1])], 13).unwrap();
        assert_eq!(f[0].shape, Some(vec![2, 512]));
        let f = infer(&op("Flatten", vec![("axis", Attr::Int(0))]), vec![x.clone()], 13).unwrap();
        assert_eq!(f[0].shape, Some(vec![1, 6]));
        let f = infer(&op("Flatten", vec![("axis", Attr::Int(-1))]), vec![x.clone()], 13).unwrap();
        assert_eq!(f[0].shape, Some(vec![2, 3]));
        let c = op("Concat", vec![("axis", Attr::Int(1))]);
        let r = infer(&c, vec![x.clone(), ints(&[2, 1], &[9, 9])], 13).unwrap();
        assert_eq!(val(&r[0]), vec![0, 1, 2, 9, 3, 4, 5, 9]);
        assert!(infer(&c, vec![x.clone(), ints(&[1, 1], &[9])], 13).is_err());
        assert!(infer(&op("Concat", vec![]), vec![x], 13).is_err());
    }

    #[test]
    fn split_forms() {
        let x = ints(&[6], &[0, 1, 2, 3, 4, 5]);
        let r = infer(&op("Split", vec![]), vec![x.clone(), ints(&[2], &[2, 4])], 13).unwrap();
        assert_eq!((val(&r[0]), val(&r[1])), (vec![0, 1], vec![2, 3, 4, 5]));
        let r = infer(&op("Split", vec![("split", Attr::Ints(vec![3, 3]))]), vec![x.clone()], 11).unwrap();
        assert_eq!(r.len(), 2);
        let r = infer(&op("Split", vec![("num_outputs", Attr::Int(4))]), vec![x.clone()], 18).unwrap();
        assert_eq!(r.iter().map(|f| f.shape.clone().unwrap()[0]).collect::<Vec<_>>(), vec![2, 2, 2, 0]);
        assert!(infer(&op("Split", vec![]), vec![x.clone(), ints(&[2], &[2, 2])], 13).is_err());
        assert!(infer(&op("Split", vec![]), vec![x], 13).unwrap().is_empty());
    }

    #[test]
    fn gather_variants() {
        let x = shaped(DType::F32, &[30522, 768]);
        let r = infer(&op("Gather", vec![]), vec![x.clone(), shaped(DType::I64, &[2, 128])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 128, 768]));
        assert!(infer(&op("Gather", vec![]), vec![x, ints(&[1], &[30522])], 13).is_err());
        let t = ints(&[2, 3], &[0, 1, 2, 3, 4, 5]);
        let r =
            infer(&op("Gather", vec![("axis", Attr::Int(1))]), vec![t.clone(), ints(&[2, 1], &[-1, 0])], 13).unwrap();
        assert_eq!((r[0].shape.clone(), val(&r[0])), (Some(vec![2, 2, 1]), vec![2, 0, 5, 3]));
        let r = infer(
            &op("GatherElements", vec![("axis", Attr::Int(1))]),
            vec![t.clone(), shaped(DType::I64, &[2, 5])],
            13,
        )
        .unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 5]));
        let r = infer(&op("GatherND", vec![]), vec![shaped(DType::F32, &[4, 5, 6]), shaped(DType::I64, &[3, 2])], 13)
            .unwrap();
        assert_eq!(r[0].shape, Some(vec![3, 6]));
    }

    #[test]
    fn expand_tile_constant_of_shape_range() {
        let r = infer(&op("Expand", vec![]), vec![ints(&[3, 1], &[1, 2, 3]), ints(&[3], &[2, 1, 2])], 13).unwrap();
        assert_eq!((r[0].shape.clone(), val(&r[0])), (Some(vec![2, 3, 2]), vec![1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3]));
        assert!(infer(&op("Expand", vec![]), vec![shaped(DType::F32, &[3]), ints(&[1], &[4])], 13).is_err());
        let r = infer(&op("Tile", vec![]), vec![ints(&[2], &[1, 2]), ints(&[1], &[3])], 13).unwrap();
        assert_eq!(val(&r[0]), vec![1, 2, 1, 2, 1, 2]);
        let r = infer(&op("ConstantOfShape", vec![]), vec![ints(&[2], &[2, 3])], 13).unwrap();
        let v = r[0].value.as_ref().unwrap();
        assert_eq!((v.dtype, v.dims.clone(), v.to_f32_vec()), (DType::F32, vec![2, 3], vec![0.0; 6]));
        let one = op("ConstantOfShape", vec![("value", Attr::Tensor(Tensor::from_i64(vec![1], &[1])))]);
        let r = infer(&one, vec![ints(&[1], &[3])], 13).unwrap();
        assert_eq!(val(&r[0]), vec![1, 1, 1]);
        let r = infer(&one, vec![ints(&[0], &[])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![]));
        assert!(infer(&one, vec![ints(&[1], &[-3])], 13).is_err());
        let r = infer(&op("Range", vec![]), vec![ints(&[], &[0]), ints(&[], &[10]), ints(&[], &[3])], 13).unwrap();
        assert_eq!(val(&r[0]), vec![0, 3, 6, 9]);
        let r = infer(&op("Range", vec![]), vec![ints(&[], &[5]), ints(&[], &[0]), ints(&[], &[-2])], 13).unwrap();
        assert_eq!(val(&r[0]), vec![5, 3, 1]);
        let r = infer(&op("Range", vec![]), vec![floats(&[], &[0.0]), floats(&[], &[1.0]), floats(&[], &[0.25])], 13)
            .unwrap();
        assert_eq!(r[0].value.as_ref().unwrap().to_f32_vec(), vec![0.0, 0.25, 0.5, 0.75]);
        assert!(infer(&op("Range", vec![]), vec![ints(&[], &[0]), ints(&[], &[1]), ints(&[], &[0])], 13).is_err());
        let r =
            infer(&op("Range", vec![]), vec![ints(&[], &[0]), shaped(DType::I64, &[]), ints(&[], &[1])], 13).unwrap();
        assert_eq!(r[0], fact(Some(DType::I64), None));
    }

    #[test]
    fn identity_dropout_constant() {
        let x = ints(&[2], &[4, 5]);
        assert_eq!(val(&infer(&op("Identity", vec![]), vec![x.clone()], 13).unwrap()[0]), vec![4, 5]);
        let d = infer(&op("Dropout", vec![]), vec![x], 13).unwrap();
        assert_eq!(val(&d[0]), vec![4, 5]);
        assert_eq!(d[1], fact(Some(DType::Bool), Some(vec![2])));
        let c = infer(&op("Constant", vec![("value_ints", Attr::Ints(vec![1, 2]))]), vec![], 13).unwrap();
        assert_eq!(val(&c[0]), vec![1, 2]);
        let bad = Tensor { dtype: DType::F32, dims: vec![4], bytes: vec![0; 3] };
        assert!(infer(&op("Constant", vec![("value", Attr::Tensor(bad))]), vec![], 13).is_err());
        assert!(infer(&op("Constant", vec![]), vec![], 13).is_err());
    }
}
