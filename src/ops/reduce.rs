//! Reductions and ops along an axis: ReduceMean / Sum / Max / Min / Prod / L1 / L2 /
//! SumSquare / LogSumExp, ArgMax / ArgMin, TopK, Softmax / LogSoftmax / Hardmax and CumSum.
//!
//! Opset differences: Reduce* take `axes` as an attribute until the opset that moved it to
//! an optional input — 13 for ReduceSum, 18 for the others — which also added
//! `noop_with_empty_axes` (no axes then means "identity" instead of "reduce everything");
//! both forms are read (an input wins). TopK's `k` is an attribute before opset 10 and an
//! input after. Softmax & co. default to `axis=1` (and coerce to 2-D, which keeps the shape)
//! before opset 13 and to `axis=-1` from 13. ArgMax / ArgMin gained `select_last_index` at
//! 12, which changes values only. Reductions fold when the input is known and small (in i64
//! for integer dtypes, f64 for floats); ArgMax, TopK, Softmax and CumSum are not folded.

use super::common::{fact, fact_or_value, foldable, norm_axes, norm_axis, numel, offsets, strides, Arg, Nums, Res};
use super::{Fact, InferFn, OpCtx};
use crate::tensor::{DType, Tensor};

pub(crate) fn rule(op_type: &str) -> Option<InferFn> {
    Some(match op_type {
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
        | "ReduceSumSquare" | "ReduceLogSumExp" => reduce,
        "ArgMax" | "ArgMin" => arg_extreme,
        "TopK" => top_k,
        "Softmax" | "LogSoftmax" | "Hardmax" => softmax,
        "CumSum" => cum_sum,
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Reducer {
    Sum,
    Prod,
    Max,
    Min,
    Mean,
    L1,
    L2,
    SumSquare,
    LogSumExp,
}

impl Reducer {
    fn of(op_type: &str) -> Option<Reducer> {
        Some(match op_type {
            "ReduceSum" => Reducer::Sum,
            "ReduceProd" => Reducer::Prod,
            "ReduceMax" => Reducer::Max,
            "ReduceMin" => Reducer::Min,
            "ReduceMean" => Reducer::Mean,
            "ReduceL1" => Reducer::L1,
            "ReduceL2" => Reducer::L2,
            "ReduceSumSquare" => Reducer::SumSquare,
            "ReduceLogSumExp" => Reducer::LogSumExp,
            _ => return None,
        })
    }

    /// Reduces `t` over `axes` into a tensor of `keep` dims (the reduced axes set to 1).
    fn fold(self, t: &Tensor, axes: &[usize], keep: &[usize]) -> Option<Tensor> {
        let n_out = numel(keep)?;
        let mut st = strides(keep);
        for &a in axes {
            *st.get_mut(a)? = 0;
        }
        let dest = offsets(&t.dims, &st);
        let count = t.numel().checked_div(n_out).unwrap_or(0);
        use Reducer::*;
        let nums = match Nums::of(t) {
            Nums::Int(v) if !matches!(self, L2 | LogSumExp) => {
                let init = match self {
                    Prod => 1,
                    Max => i64::MIN,
                    Min => i64::MAX,
                    _ => 0,
                };
                let mut acc = vec![init; n_out];
                for (&x, &o) in v.iter().zip(&dest) {
                    let a = acc.get_mut(o)?;
                    *a = match self {
                        Prod => a.wrapping_mul(x),
                        Max => (*a).max(x),
                        Min => (*a).min(x),
                        L1 => a.wrapping_add(x.wrapping_abs()),
                        SumSquare => a.wrapping_add(x.wrapping_mul(x)),
                        _ => a.wrapping_add(x),
                    };
                }
                if self == Mean {
                    let c = i64::try_from(count).ok().filter(|&c| c > 0)?;
                    acc.iter_mut().for_each(|a| *a /= c);
                }
                Nums::Int(acc)
            }
            _ => {
                let init = match self {
                    Prod => 1.0,
                    Max => f64::NEG_INFINITY,
                    Min => f64::INFINITY,
                    _ => 0.0,
                };
                let mut acc = vec![init; n_out];
                for (x, &o) in t.to_f64_vec().into_iter().zip(&dest) {
                    let a = acc.get_mut(o)?;
                    *a = match self {
                        Prod => *a * x,
                        Max => a.max(x),
                        Min => a.min(x),
                        L1 => *a + x.abs(),
                        L2 | SumSquare => *a + x * x,
                        LogSumExp => *a + x.exp(),
                        Sum | Mean => *a + x,
                    };
                }
                let finish: fn(f64, f64) -> f64 = match self {
                    Mean => |a, c| a / c,
                    L2 => |a, _| a.sqrt(),
                    LogSumExp => |a, _| a.ln(),
                    _ => |a, _| a,
                };
                Nums::Float(acc.into_iter().map(|a| finish(a, count as f64)).collect())
            }
        };
        nums.into_tensor(t.dtype, keep.to_vec()).ok()
    }
}

fn reduce(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let axes = ctx.ints_arg("axes", 1)?;
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let axes = match axes {
        Arg::Known(a) if !a.is_empty() => norm_axes(&a, x.len()).map_err(|e| ctx.err(e))?,
        Arg::Known(_) | Arg::Absent if ctx.op.attr_i("noop_with_empty_axes", 0) != 0 => {
            let value = ctx.value(0)?.filter(|t| foldable(&t.dims)).cloned();
            return Ok(vec![fact_or_value(dtype, Some(x.to_vec()), value)]);
        }
        Arg::Known(_) | Arg::Absent => (0..x.len()).collect(),
        Arg::Unknown => return Ok(vec![fact(dtype, None)]),
    };
    let keep: Vec<usize> = x.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let out = if ctx.op.attr_i("keepdims", 1) != 0 {
        keep.clone()
    } else {
        x.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
    };
    let value = match (ctx.value(0)?, Reducer::of(&ctx.op.op_type)) {
        (Some(t), Some(r)) if foldable(&t.dims) => {
            r.fold(t, &axes, &keep).and_then(|v| Tensor::new(v.dtype, out.clone(), v.bytes).ok())
        }
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, Some(out), value)])
}

/// The input's shape with `axis` dropped or (keepdims) set to `size`.
fn along_axis(x: &[usize], axis: usize, keep: bool, size: usize) -> Vec<usize> {
    let mut out = x.to_vec();
    if keep {
        out[axis] = size;
    } else {
        out.remove(axis);
    }
    out
}

fn arg_extreme(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(Some(DType::I64), None)]);
    };
    let a = norm_axis(ctx.op.attr_i("axis", 0), x.len()).map_err(|e| ctx.err(e))?;
    let keep = ctx.op.attr_i("keepdims", 1) != 0;
    Ok(vec![fact(Some(DType::I64), Some(along_axis(x, a, keep, 1)))])
}

fn top_k(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let k = if ctx.input(1).is_some() { ctx.scalar_i64(1)? } else { ctx.op.attr("k").map(|_| ctx.op.attr_i("k", 0)) };
    let (Some(x), Some(k)) = (ctx.shape(0), k) else {
        return Ok(vec![fact(dtype, None), fact(Some(DType::I64), None)]);
    };
    let a = norm_axis(ctx.op.attr_i("axis", -1), x.len()).map_err(|e| ctx.err(e))?;
    let k = usize::try_from(k)
        .ok()
        .filter(|&k| k <= x[a])
        .ok_or_else(|| ctx.err(format!("k={k} is out of range for axis {a} of size {}", x[a])))?;
    let out = along_axis(x, a, true, k);
    Ok(vec![fact(dtype, Some(out.clone())), fact(Some(DType::I64), Some(out))])
}

fn softmax(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let shape = ctx.shape(0);
    if let Some(x) = shape {
        let default = if ctx.opset < 13 { 1 } else { -1 };
        norm_axis(ctx.op.attr_i("axis", default), x.len()).map_err(|e| ctx.err(e))?;
    }
    Ok(vec![fact(ctx.dtype(0), shape.map(<[usize]>::to_vec))])
}

fn cum_sum(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let shape = ctx.shape(0);
    if let (Some(x), Some(axis)) = (shape, ctx.scalar_i64(1)?) {
        norm_axis(axis, x.len()).map_err(|e| ctx.err(e))?;
    }
    Ok(vec![fact(ctx.dtype(0), shape.map(<[usize]>::to_vec))])
}

#[cfg(test)]
mod tests {
    use super::super::common::tests::{floats, infer, ints, op, shaped, unknown};
    use super::*;
    use crate::ir::Attr;

    #[test]
    fn reduce_axes_attribute_opset13() {
        let m = op("ReduceMean", vec![("axes", Attr::Ints(vec![-1]))]);
        let r = infer(&m, vec![shaped(DType::F32, &[2, 7, 768])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 7, 1]));
        let m = op("ReduceMax", vec![("axes", Attr::Ints(vec![0, 2])), ("keepdims", Attr::Int(0))]);
        assert_eq!(infer(&m, vec![shaped(DType::F32, &[2, 7, 768])], 13).unwrap()[0].shape, Some(vec![7]));
        let all =
            infer(&op("ReduceL2", vec![("keepdims", Attr::Int(0))]), vec![floats(&[2], &[3.0, 4.0])], 13).unwrap();
        assert_eq!(all[0].value.as_ref().unwrap().to_f32_vec(), vec![5.0]);
        assert!(infer(
            &op("ReduceMean", vec![("axes", Attr::Ints(vec![3]))]),
            vec![shaped(DType::F32, &[2, 7, 768])],
            13
        )
        .is_err());
        // ReduceSum already takes axes as an input at opset 13.
        let s =
            infer(&op("ReduceSum", vec![]), vec![ints(&[2, 3], &[1, 2, 3, 4, 5, 6]), ints(&[1], &[1])], 13).unwrap();
        assert_eq!((s[0].shape.clone(), s[0].value.as_ref().unwrap().to_i64_vec()), (Some(vec![2, 1]), vec![6, 15]));
    }

    #[test]
    fn reduce_axes_input_opset18() {
        let x = ints(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let p = op("ReduceProd", vec![("keepdims", Attr::Int(0))]);
        let r = infer(&p, vec![x.clone(), ints(&[1], &[0])], 18).unwrap();
        assert_eq!(r[0].value.as_ref().unwrap().to_i64_vec(), vec![4, 10, 18]);
        let r = infer(&p, vec![x.clone()], 18).unwrap();
        assert_eq!((r[0].shape.clone(), r[0].value.as_ref().unwrap().to_i64_vec()), (Some(vec![]), vec![720]));
        let noop = op("ReduceSum", vec![("noop_with_empty_axes", Attr::Int(1))]);
        let r = infer(&noop, vec![x.clone(), ints(&[0], &[])], 18).unwrap();
        assert_eq!(r[0].value.as_ref().unwrap().to_i64_vec(), vec![1, 2, 3, 4, 5, 6]);
        let r =
            infer(&op("ReduceMean", vec![]), vec![shaped(DType::F32, &[2, 3, 4]), ints(&[2], &[1, 2])], 18).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 1, 1]));
        let r = infer(&op("ReduceMean", vec![]), vec![shaped(DType::F32, &[2, 3, 4]), unknown()], 18).unwrap();
        assert_eq!(r[0].shape, None);
        let r = infer(&op("ReduceMin", vec![]), vec![x, ints(&[1], &[-1])], 18).unwrap();
        assert_eq!(r[0].value.as_ref().unwrap().to_i64_vec(), vec![1, 4]);
    }

    #[test]
    fn arg_top_k_softmax_cumsum() {
        let x = shaped(DType::F32, &[4, 10]);
        let r = infer(
            &op("ArgMax", vec![("axis", Attr::Int(1)), ("select_last_index", Attr::Int(1))]),
            vec![x.clone()],
            13,
        )
        .unwrap();
        assert_eq!(r[0], fact(Some(DType::I64), Some(vec![4, 1])));
        let r = infer(&op("ArgMin", vec![("keepdims", Attr::Int(0))]), vec![x.clone()], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![10]));
        let r = infer(&op("TopK", vec![]), vec![x.clone(), ints(&[1], &[3])], 11).unwrap();
        assert_eq!(r[0], fact(Some(DType::F32), Some(vec![4, 3])));
        assert_eq!(r[1], fact(Some(DType::I64), Some(vec![4, 3])));
        let r = infer(&op("TopK", vec![("k", Attr::Int(2)), ("axis", Attr::Int(0))]), vec![x.clone()], 1).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 10]));
        assert!(infer(&op("TopK", vec![]), vec![x.clone(), ints(&[1], &[11])], 11).is_err());
        let r = infer(&op("Softmax", vec![]), vec![x.clone()], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![4, 10]));
        assert!(infer(&op("Softmax", vec![("axis", Attr::Int(2))]), vec![x.clone()], 13).is_err());
        let r = infer(&op("CumSum", vec![]), vec![x.clone(), ints(&[], &[1])], 14).unwrap();
        assert_eq!(r[0].shape, Some(vec![4, 10]));
        assert!(infer(&op("CumSum", vec![]), vec![x, ints(&[], &[2])], 14).is_err());
    }
}
