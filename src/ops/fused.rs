//! Fused attention and expert ops, and weight dequantization: shape rules for
//!
//! - ONNX `Attention` (opset 23, <https://onnx.ai/onnx/operators/onnx__Attention.html>):
//!   Q, K, V either 3-D `[B, S, H·D]` with `q_num_heads`/`kv_num_heads` attributes, or 4-D
//!   `[B, H, S, D]`; output Y like Q with V's head size; optional outputs present_key /
//!   present_value `[B, Hkv, P+T, D]` and the QK product `[B, Hq, S, P+T]`.
//! - com.microsoft `Attention` (packed QKV weight `[C, 3·H·D]` as an input; output
//!   `[B, S, v_hidden]`), `MultiHeadAttention` (output `[B, S, v_hidden]`),
//!   `GroupQueryAttention` (output `[B, S, num_heads·head_size]`) and `MoE` (output shaped
//!   like its input), as onnxruntime's ContribOperators.md defines them.
//! - `DequantizeLinear` (per-tensor and per-axis; folded when its inputs are known, so a
//!   quantized weight becomes a known f32 tensor like a Cast f16 → f32 of a weight does).
//!
//! Nothing is folded except DequantizeLinear; the attention ops never occur in shape
//! subgraphs.

use super::common::{fact, Res};
use super::{Fact, InferFn, OpCtx, FOLD_LIMIT};
use crate::tensor::{DType, Tensor};

/// Standard-domain rules of this family.
pub(crate) fn rule(op_type: &str) -> Option<InferFn> {
    Some(match op_type {
        "Attention" => onnx_attention,
        "DequantizeLinear" => dequantize_linear,
        _ => return None,
    })
}

/// com.microsoft rules of this family.
pub(crate) fn microsoft_rule(op_type: &str) -> Option<InferFn> {
    Some(match op_type {
        "Attention" => ms_attention,
        "MultiHeadAttention" => ms_multi_head_attention,
        "GroupQueryAttention" => ms_group_query_attention,
        "MoE" => ms_moe,
        _ => return None,
    })
}

fn heads_attr(ctx: &OpCtx, name: &str) -> Res<usize> {
    match ctx.op.attr(name) {
        None => Err(ctx.err(format!("needs the attribute {name} for 3-D inputs"))),
        Some(_) => match ctx.op.attr_i(name, 0) {
            h if h > 0 => Ok(h as usize),
            h => Err(ctx.err(format!("attribute {name} = {h} must be positive"))),
        },
    }
}

fn split(ctx: &OpCtx, total: usize, heads: usize, what: &str) -> Res<usize> {
    if heads == 0 || !total.is_multiple_of(heads) {
        return Err(ctx.err(format!("{what} of {total} does not split into {heads} heads")));
    }
    Ok(total / heads)
}

fn onnx_attention(ctx: &OpCtx) -> Res<Vec<Fact>> {
    for slot in 0..3 {
        ctx.require(slot)?;
    }
    let dtype = ctx.dtype(0);
    let (Some(q), Some(k), Some(v)) = (ctx.shape(0), ctx.shape(1), ctx.shape(2)) else {
        return Ok(vec![fact(dtype, None), fact(dtype, None), fact(dtype, None), fact(dtype, None)]);
    };
    if q.len() != k.len() || q.len() != v.len() || !(q.len() == 3 || q.len() == 4) {
        return Err(ctx.err(format!("Q, K, V must all be 3-D or all 4-D, got {q:?}, {k:?}, {v:?}")));
    }
    let (b, s, hq, d, hkv, t, dv, three) = if q.len() == 3 {
        let (hq, hkv) = (heads_attr(ctx, "q_num_heads")?, heads_attr(ctx, "kv_num_heads")?);
        let d = split(ctx, q[2], hq, "Q's hidden size")?;
        let dk = split(ctx, k[2], hkv, "K's hidden size")?;
        let dv = split(ctx, v[2], hkv, "V's hidden size")?;
        if d != dk {
            return Err(ctx.err(format!("Q's head size {d} differs from K's {dk}")));
        }
        (q[0], q[1], hq, d, hkv, k[1], dv, true)
    } else {
        if q[3] != k[3] || k[1] != v[1] || k[2] != v[2] {
            return Err(ctx.err(format!("Q {q:?}, K {k:?} and V {v:?} do not match")));
        }
        (q[0], q[2], q[1], q[3], k[1], k[2], v[3], false)
    };
    if hkv == 0 || hq % hkv != 0 {
        return Err(ctx.err(format!("{hq} query heads do not group over {hkv} KV heads")));
    }
    if k[0] != b || v[0] != b {
        return Err(ctx.err(format!("batch sizes of Q {q:?}, K {k:?}, V {v:?} differ")));
    }
    let past = ctx.shape(4).and_then(|p| p.get(2).copied()).unwrap_or(0);
    let total = past + t;
    let y = if three { vec![b, s, hq * dv] } else { vec![b, hq, s, dv] };
    Ok(vec![
        fact(dtype, Some(y)),
        fact(dtype, Some(vec![b, hkv, total, d])),
        fact(dtype, Some(vec![b, hkv, total, dv])),
        fact(dtype, Some(vec![b, hq, s, total])),
    ])
}

fn ms_attention(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(0);
    let (Some(x), Some(w)) = (ctx.shape(0), ctx.shape(1)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let (&[b, s, c], &[wc, total]) = (x, w) else {
        return Err(ctx.err(format!("needs input [B, S, C] and weights [C, 3·hidden], got {x:?} and {w:?}")));
    };
    if wc != c {
        return Err(ctx.err(format!("weights {w:?} do not match input {x:?}")));
    }
    let v_hidden = match ctx.op.attr_ints("qkv_hidden_sizes") {
        Some([q, k, v])
            if *q > 0
                && *k > 0
                && *v > 0
                && q.checked_add(*k).and_then(|s| s.checked_add(*v)) == Some(total as i64) =>
        {
            *v as usize
        }
        Some(h) => return Err(ctx.err(format!("qkv_hidden_sizes {h:?} do not add up to {total}"))),
        None if total % 3 == 0 => total / 3,
        None => return Err(ctx.err(format!("packed weight width {total} is not 3·hidden"))),
    };
    let heads = heads_attr(ctx, "num_heads")?;
    split(ctx, v_hidden, heads, "V's hidden size")?;
    Ok(vec![fact(dtype, Some(vec![b, s, v_hidden])), fact(dtype, None)])
}

fn ms_multi_head_attention(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let heads = heads_attr(ctx, "num_heads")?;
    let (Some(q), v) = (ctx.shape(0), ctx.shape(2)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let y = match (q, v) {
        (&[b, s, _], Some(&[_, _, hv])) => {
            split(ctx, hv, heads, "V's hidden size")?;
            vec![b, s, hv]
        }
        // Packed QKV [B, S, H, 3, D] or V given as a past state: not analysed further.
        _ => return Ok(vec![fact(dtype, None)]),
    };
    Ok(vec![fact(dtype, Some(y)), fact(dtype, None), fact(dtype, None), fact(dtype, None)])
}

fn ms_group_query_attention(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let heads = heads_attr(ctx, "num_heads")?;
    let kv = heads_attr(ctx, "kv_num_heads")?;
    let Some(q) = ctx.shape(0) else { return Ok(vec![fact(dtype, None)]) };
    let &[b, s, c] = q else {
        return Err(ctx.err(format!("query must be [B, S, hidden], got {q:?}")));
    };
    // Unpacked: query holds num_heads·head_size; packed: (num_heads + 2·kv_num_heads)·head_size.
    let d = if ctx.input(1).is_some() {
        split(ctx, c, heads, "the query's hidden size")?
    } else {
        let parts =
            kv.checked_mul(2).and_then(|k| k.checked_add(heads)).ok_or_else(|| ctx.err("head counts overflow"))?;
        split(ctx, c, parts, "the packed QKV width")?
    };
    Ok(vec![fact(dtype, Some(vec![b, s, heads * d])), fact(dtype, None), fact(dtype, None), fact(dtype, None)])
}

fn ms_moe(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    ctx.require(2)?;
    Ok(vec![fact(ctx.dtype(0), ctx.shape(0).map(<[usize]>::to_vec))])
}

fn dequantize_linear(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(1).or(Some(DType::F32));
    let shape = ctx.shape(0).map(<[usize]>::to_vec);
    let folded = fold_dequantize(ctx)?;
    Ok(vec![match folded {
        Some(t) => Fact::of_tensor(t),
        None => fact(dtype, shape),
    }])
}

/// (x − zero_point) · scale, per tensor or per axis (no blocked quantization).
fn fold_dequantize(ctx: &OpCtx) -> Res<Option<Tensor>> {
    let (Some(x), Some(scale)) = (ctx.value(0)?, ctx.value(1)?) else { return Ok(None) };
    if x.numel() > FOLD_LIMIT || ctx.op.attr_i("block_size", 0) != 0 {
        return Ok(None);
    }
    let zp = ctx.value(2)?;
    let rank = x.dims.len() as i64;
    let axis = ctx.op.attr_i("axis", 1);
    let axis = if axis < 0 { axis + rank } else { axis };
    let (xs, ss) = (x.to_f64_vec(), scale.to_f64_vec());
    let zs = zp.map(Tensor::to_f64_vec);
    let per_axis = ss.len() > 1;
    let (stride, extent) = if per_axis {
        let a = usize::try_from(axis).ok().filter(|&a| a < x.dims.len()).ok_or_else(|| ctx.err("axis out of range"))?;
        if x.dims[a] != ss.len() || zs.as_ref().is_some_and(|z| z.len() != ss.len()) {
            return Err(ctx.err(format!("{} scales for axis {a} of shape {:?}", ss.len(), x.dims)));
        }
        (x.dims[a + 1..].iter().product::<usize>(), ss.len())
    } else {
        (1, 1)
    };
    let out: Vec<f32> = xs
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let c = if per_axis { (i / stride) % extent } else { 0 };
            let z = zs.as_ref().and_then(|z| z.get(c).copied()).unwrap_or(0.0);
            ((q - z) * ss.get(c).copied().unwrap_or(1.0)) as f32
        })
        .collect();
    Ok(Some(Tensor::from_f32(x.dims.clone(), &out)))
}

#[cfg(test)]
mod tests {
    use super::super::common::tests::op;
    use super::*;
    use crate::ir::Attr;

    fn shaped(s: &[usize]) -> Option<Fact> {
        Some(Fact::shaped(Some(DType::F32), s.to_vec()))
    }

    #[test]
    fn attention_shapes() {
        let o = op("Attention", vec![("q_num_heads", Attr::Int(4)), ("kv_num_heads", Attr::Int(2))]);
        let ins = vec![shaped(&[2, 5, 16]), shaped(&[2, 5, 8]), shaped(&[2, 5, 8])];
        let f = onnx_attention(&OpCtx { op: &o, inputs: &ins, opset: 23 }).unwrap();
        assert_eq!(f[0].shape, Some(vec![2, 5, 16]));
        let o = op("Attention", vec![]);
        let ins = vec![shaped(&[2, 4, 5, 4]), shaped(&[2, 2, 7, 4]), shaped(&[2, 2, 7, 6])];
        let f = onnx_attention(&OpCtx { op: &o, inputs: &ins, opset: 23 }).unwrap();
        assert_eq!(f[0].shape, Some(vec![2, 4, 5, 6]));
        let ins = vec![shaped(&[2, 3, 5, 4]), shaped(&[2, 2, 7, 4]), shaped(&[2, 2, 7, 6])];
        assert!(onnx_attention(&OpCtx { op: &o, inputs: &ins, opset: 23 }).is_err());
    }

    #[test]
    fn dequantize_folds_per_axis() {
        let o = op("DequantizeLinear", vec![("axis", Attr::Int(1))]);
        let x = Tensor::from_i64_as(DType::I8, vec![2, 2], &[1, -2, 3, 4]);
        let s = Tensor::from_f32(vec![2], &[0.5, 2.0]);
        let ins = vec![Some(Fact::of_tensor(x)), Some(Fact::of_tensor(s))];
        let f = dequantize_linear(&OpCtx { op: &o, inputs: &ins, opset: 23 }).unwrap();
        assert_eq!(f[0].value.as_ref().unwrap().to_f64_vec(), vec![0.5, -4.0, 1.5, 8.0]);
    }

    /// Malformed models give errors, never panics.
    #[test]
    fn rules_never_panic_on_odd_shapes() {
        let shapes: &[&[usize]] = &[&[], &[0], &[2, 5, 16], &[2, 4, 5, 4], &[1, 1, 1], &[3, 0, 7, 2]];
        for name in ["Attention", "MultiHeadAttention", "GroupQueryAttention", "MoE"] {
            let f = microsoft_rule(name).unwrap();
            for &a in shapes {
                for &b in shapes {
                    for heads in [0, 1, 3, 4] {
                        let o = op(name, vec![("num_heads", Attr::Int(heads)), ("kv_num_heads", Attr::Int(2))]);
                        let ins = vec![shaped(a), shaped(b), shaped(b)];
                        let _ = f(&OpCtx { op: &o, inputs: &ins, opset: 1 });
                        let o = op(name, vec![("q_num_heads", Attr::Int(heads)), ("kv_num_heads", Attr::Int(2))]);
                        let _ = onnx_attention(&OpCtx { op: &o, inputs: &ins, opset: 23 });
                    }
                }
            }
        }
    }
}
