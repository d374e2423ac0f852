//! Element-wise ops: unary maths and activations, broadcasting arithmetic (Add, Sub, Mul,
//! Div, Pow, Mod, PRelu, BitShift and the variadic Min, Max, Sum, Mean), comparisons and
//! logic (Equal, Greater, Less, GreaterOrEqual, LessOrEqual, And, Or, Xor, Not, IsNaN,
//! IsInf), Where, Clip, Cast and CastLike.
//!
//! Broadcasting follows numpy (multidirectional) rules for every opset: the pre-opset-7
//! `broadcast`/`axis` attributes of Add & co. are not modelled. Clip takes `min`/`max` as
//! float attributes before opset 11 and as optional inputs from opset 11 on; both forms are
//! read. Folding computes in i64 for integer and bool dtypes (integer Div truncates toward
//! zero, as ONNX specifies; Mod follows the divisor's sign unless `fmod=1`) and in f64 for
//! float dtypes, then converts to the output dtype. Comparisons and logic produce Bool.

use super::common::{broadcast, broadcast_offsets, elem, fact, fact_or_value, foldable, Nums, Res};
use super::{Fact, InferFn, OpCtx};
use crate::tensor::{DType, Tensor};

pub(crate) fn rule(op_type: &str) -> Option<InferFn> {
    Some(match op_type {
        "Abs" | "Neg" | "Sqrt" | "Exp" | "Log" | "Relu" | "Sigmoid" | "Tanh" | "Erf" | "Reciprocal" | "Floor"
        | "Ceil" | "Round" | "Sign" | "Sin" | "Cos" | "Tan" | "Asin" | "Acos" | "Atan" | "Sinh" | "Cosh" | "Asinh"
        | "Acosh" | "Atanh" | "Softplus" | "Softsign" | "LeakyRelu" | "Elu" | "Selu" | "Celu" | "HardSigmoid"
        | "HardSwish" | "Mish" | "ThresholdedRelu" | "Gelu" | "Shrink" | "Not" | "BitwiseNot" | "Trilu" => unary,
        "IsNaN" | "IsInf" => is_special,
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "PRelu" | "BitShift" | "Min" | "Max" | "Sum" | "Mean"
        | "Equal" | "Greater" | "Less" | "GreaterOrEqual" | "LessOrEqual" | "And" | "Or" | "Xor" | "BitwiseAnd"
        | "BitwiseOr" | "BitwiseXor" => nary,
        "Where" => where_,
        "Clip" => clip,
        "Cast" => cast,
        "CastLike" => cast_like,
        _ => return None,
    })
}

/// Same shape and dtype as the input; folds the common maths functions.
fn unary(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let shape = ctx.shape(0).map(<[usize]>::to_vec);
    let value = match ctx.value(0)? {
        Some(x) if ctx.op.op_type != "Trilu" => fold_unary(&ctx.op.op_type, x),
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, shape, value)])
}

fn fold_unary(op: &str, x: &Tensor) -> Option<Tensor> {
    let out = match Nums::of(x) {
        Nums::Int(v) => {
            let f: fn(i64) -> i64 = match op {
                "Neg" => i64::wrapping_neg,
                "Abs" => i64::wrapping_abs,
                "Sign" => i64::signum,
                "Relu" => |a| a.max(0),
                "Not" => |a| (a == 0) as i64,
                "BitwiseNot" => |a| !a,
                _ => return None,
            };
            Nums::Int(v.into_iter().map(f).collect())
        }
        Nums::Float(v) => {
            let f: fn(f64) -> f64 = match op {
                "Neg" => |a| -a,
                "Abs" => f64::abs,
                "Sqrt" => f64::sqrt,
                "Exp" => f64::exp,
                "Log" => f64::ln,
                "Relu" => |a| a.max(0.0),
                "Sigmoid" => |a| 1.0 / (1.0 + (-a).exp()),
                "Tanh" => f64::tanh,
                "Reciprocal" => f64::recip,
                "Floor" => f64::floor,
                "Ceil" => f64::ceil,
                "Round" => f64::round_ties_even,
                "Sign" => |a| if a == 0.0 { 0.0 } else { a.signum() },
                "Sin" => f64::sin,
                "Cos" => f64::cos,
                _ => return None,
            };
            Nums::Float(v.into_iter().map(f).collect())
        }
    };
    out.into_tensor(x.dtype, x.dims.clone()).ok()
}

/// IsNaN / IsInf: same shape, Bool.
fn is_special(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    Ok(vec![fact(Some(DType::Bool), ctx.shape(0).map(<[usize]>::to_vec))])
}

/// A broadcasting binary operation, as folding applies it element by element.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Mod { fmod: bool },
    Min,
    Max,
    PRelu,
    Eq,
    Gt,
    Lt,
    Ge,
    Le,
    And,
    Or,
    Xor,
    BitAnd,
    BitOr,
    BitXor,
}

impl BinOp {
    /// The operation an op type folds with (Sum and Mean fold as additions); None for an
    /// op that is only shape-inferred.
    fn of(ctx: &OpCtx) -> Option<BinOp> {
        Some(match ctx.op.op_type.as_str() {
            "Add" | "Sum" | "Mean" => BinOp::Add,
            "Sub" => BinOp::Sub,
            "Mul" => BinOp::Mul,
            "Div" => BinOp::Div,
            "Pow" => BinOp::Pow,
            "Mod" => BinOp::Mod { fmod: ctx.op.attr_i("fmod", 0) != 0 },
            "Min" => BinOp::Min,
            "Max" => BinOp::Max,
            "PRelu" => BinOp::PRelu,
            "Equal" => BinOp::Eq,
            "Greater" => BinOp::Gt,
            "Less" => BinOp::Lt,
            "GreaterOrEqual" => BinOp::Ge,
            "LessOrEqual" => BinOp::Le,
            "And" => BinOp::And,
            "Or" => BinOp::Or,
            "Xor" => BinOp::Xor,
            "BitwiseAnd" => BinOp::BitAnd,
            "BitwiseOr" => BinOp::BitOr,
            "BitwiseXor" => BinOp::BitXor,
            _ => return None,
        })
    }

    fn bool_result(self) -> bool {
        use BinOp::*;
        matches!(self, Eq | Gt | Lt | Ge | Le | And | Or | Xor)
    }

    /// Integer semantics; None where the result is undefined (division by zero).
    fn int(self, a: i64, b: i64) -> Option<i64> {
        use BinOp::*;
        Some(match self {
            Add => a.wrapping_add(b),
            Sub => a.wrapping_sub(b),
            Mul => a.wrapping_mul(b),
            Div => a.checked_div(b)?,
            Pow => match u32::try_from(b) {
                Ok(e) => a.wrapping_pow(e),
                Err(_) => (a as f64).powf(b as f64) as i64,
            },
            Mod { fmod } => {
                let r = a.checked_rem(b)?;
                if !fmod && r != 0 && (r < 0) != (b < 0) {
                    r + b
                } else {
                    r
                }
            }
            Min => a.min(b),
            Max => a.max(b),
            PRelu => {
                if a < 0 {
                    a.wrapping_mul(b)
                } else {
                    a
                }
            }
            Eq => (a == b) as i64,
            Gt => (a > b) as i64,
            Lt => (a < b) as i64,
            Ge => (a >= b) as i64,
            Le => (a <= b) as i64,
            And => (a != 0 && b != 0) as i64,
            Or => (a != 0 || b != 0) as i64,
            Xor => ((a != 0) != (b != 0)) as i64,
            BitAnd => a & b,
            BitOr => a | b,
            BitXor => a ^ b,
        })
    }

    fn float(self, a: f64, b: f64) -> Option<f64> {
        use BinOp::*;
        let t = |c: bool| if c { 1.0 } else { 0.0 };
        Some(match self {
            Add => a + b,
            Sub => a - b,
            Mul => a * b,
            Div => a / b,
            Pow => a.powf(b),
            Mod { fmod } => {
                let r = a % b;
                if !fmod && r != 0.0 && (r < 0.0) != (b < 0.0) {
                    r + b
                } else {
                    r
                }
            }
            Min => a.min(b),
            Max => a.max(b),
            PRelu => {
                if a < 0.0 {
                    a * b
                } else {
                    a
                }
            }
            Eq => t(a == b),
            Gt => t(a > b),
            Lt => t(a < b),
            Ge => t(a >= b),
            Le => t(a <= b),
            And => t(a != 0.0 && b != 0.0),
            Or => t(a != 0.0 || b != 0.0),
            Xor => t((a != 0.0) != (b != 0.0)),
            BitAnd | BitOr | BitXor => return None,
        })
    }
}

/// Broadcasting n-ary ops (binary ones check for exactly two inputs).
fn nary(ctx: &OpCtx) -> Res<Vec<Fact>> {
    let variadic = matches!(ctx.op.op_type.as_str(), "Min" | "Max" | "Sum" | "Mean");
    let n = ctx.inputs.len();
    if (variadic && n == 0) || (!variadic && n != 2) {
        return Err(ctx.err(format!("takes {} inputs, not {n}", if variadic { "one or more" } else { "two" })));
    }
    for i in 0..n {
        ctx.require(i)?;
    }
    let same_types = !matches!(ctx.op.op_type.as_str(), "Pow" | "PRelu");
    let in_dtype = common_dtype(ctx, &(0..n).collect::<Vec<_>>(), same_types)?;
    let op = BinOp::of(ctx);
    let out_dtype = if op.is_some_and(BinOp::bool_result) { Some(DType::Bool) } else { in_dtype };

    let shapes: Option<Vec<&[usize]>> = (0..n).map(|i| ctx.shape(i)).collect();
    let Some(shapes) = shapes else {
        return Ok(vec![fact(out_dtype, None)]);
    };
    let shape = broadcast(&shapes).map_err(|e| ctx.err(e))?;

    let value = match (op, out_dtype) {
        (Some(op), Some(dt)) if foldable(&shape) => {
            let values: Option<Vec<&Tensor>> = (0..n).map(|i| ctx.value(i)).collect::<Res<_>>()?;
            values.and_then(|v| fold_nary(op, &v, &shape, dt, ctx.op.op_type == "Mean"))
        }
        _ => None,
    };
    Ok(vec![fact_or_value(out_dtype, Some(shape), value)])
}

/// Checks that the inputs at `slots` agree on their dtype (when `strict`) and returns it.
fn common_dtype(ctx: &OpCtx, slots: &[usize], strict: bool) -> Res<Option<DType>> {
    let mut found: Option<DType> = None;
    for &i in slots {
        match (found, ctx.dtype(i)) {
            (None, d) => found = d,
            (Some(a), Some(b)) if strict && a != b => {
                return Err(ctx.err(format!("input types {a} and {b} differ")));
            }
            _ => {}
        }
    }
    Ok(found)
}

/// Folds `op` over `values` broadcast to `shape`, left to right.
fn fold_nary(op: BinOp, values: &[&Tensor], shape: &[usize], dtype: DType, mean: bool) -> Option<Tensor> {
    let first = values.first()?;
    let float = first.dtype.is_float();
    let maps: Vec<Vec<usize>> = values.iter().map(|v| broadcast_offsets(shape, &v.dims)).collect();
    let len = maps.first().map_or(0, Vec::len);
    let nums = if float {
        let vals: Vec<Vec<f64>> = values.iter().map(|v| v.to_f64_vec()).collect();
        let mut out = Vec::with_capacity(len);
        for k in 0..len {
            let mut acc = *vals[0].get(maps[0][k])?;
            for (v, m) in vals.iter().zip(&maps).skip(1) {
                acc = op.float(acc, *v.get(m[k])?)?;
            }
            out.push(if mean { acc / values.len() as f64 } else { acc });
        }
        Nums::Float(out)
    } else {
        let vals: Vec<Vec<i64>> = values.iter().map(|v| v.to_i64_vec()).collect();
        let mut out = Vec::with_capacity(len);
        for k in 0..len {
            let mut acc = *vals[0].get(maps[0][k])?;
            for (v, m) in vals.iter().zip(&maps).skip(1) {
                acc = op.int(acc, *v.get(m[k])?)?;
            }
            out.push(if mean { acc / values.len() as i64 } else { acc });
        }
        Nums::Int(out)
    };
    nums.into_tensor(dtype, shape.to_vec()).ok()
}

/// Where(condition, X, Y): broadcast of all three, dtype of X/Y.
fn where_(ctx: &OpCtx) -> Res<Vec<Fact>> {
    for i in 0..3 {
        ctx.require(i)?;
    }
    let dtype = common_dtype(ctx, &[1, 2], true)?;
    let (Some(c), Some(x), Some(y)) = (ctx.shape(0), ctx.shape(1), ctx.shape(2)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let shape = broadcast(&[c, x, y]).map_err(|e| ctx.err(e))?;
    let mut value = None;
    if let (true, Some(c), Some(x), Some(y)) = (foldable(&shape), ctx.value(0)?, ctx.value(1)?, ctx.value(2)?) {
        let (mc, mx, my) = (
            broadcast_offsets(&shape, &c.dims),
            broadcast_offsets(&shape, &x.dims),
            broadcast_offsets(&shape, &y.dims),
        );
        let mut bytes = Vec::with_capacity(mc.len() * x.dtype.size());
        for k in 0..mc.len() {
            let picked = if c.get_i64(mc[k]) != 0 { elem(x, mx[k])? } else { elem(y, my[k])? };
            bytes.extend_from_slice(picked);
        }
        value = Tensor::new(x.dtype, shape.clone(), bytes).ok();
    }
    Ok(vec![fact_or_value(dtype, Some(shape), value)])
}

/// Clip: same shape; bounds from inputs 1/2 (opset 11+) or attributes min/max (before).
fn clip(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let shape = ctx.shape(0).map(<[usize]>::to_vec);
    let bound = |slot: usize, attr: &str| -> Res<Option<Option<f64>>> {
        // Some(None): no bound; None: a bound exists but is unknown.
        if ctx.input(slot).is_some() {
            return Ok(match ctx.value(slot)? {
                Some(t) if t.numel() == 1 => Some(Some(t.get_f64(0))),
                Some(t) => return Err(ctx.err(format!("bound input {slot} must be a scalar, not shape {:?}", t.dims))),
                None => None,
            });
        }
        Ok(Some(ctx.op.attr(attr).map(|_| ctx.op.attr_f(attr, 0.0) as f64)))
    };
    let (lo, hi) = (bound(1, "min")?, bound(2, "max")?);
    let value = match (ctx.value(0)?, lo, hi) {
        (Some(x), Some(lo), Some(hi)) => {
            let clamp = |v: f64| {
                let v = lo.map_or(v, |l| v.max(l));
                hi.map_or(v, |h| v.min(h))
            };
            let nums = match Nums::of(x) {
                Nums::Float(v) => Nums::Float(v.into_iter().map(clamp).collect()),
                Nums::Int(v) => Nums::Int(
                    v.into_iter()
                        .map(|a| {
                            let a = lo.map_or(a, |l| a.max(l as i64));
                            hi.map_or(a, |h| a.min(h as i64))
                        })
                        .collect(),
                ),
            };
            nums.into_tensor(x.dtype, x.dims.clone()).ok()
        }
        _ => None,
    };
    Ok(vec![fact_or_value(dtype, shape, value)])
}

/// Cast: same shape, dtype from `to` (None for types the tool does not model, e.g. string).
fn cast(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let code = ctx.op.attr_i("to", -1);
    if code == -1 {
        return Err(ctx.err("has no 'to' attribute"));
    }
    let to = i32::try_from(code).ok().and_then(DType::from_onnx);
    cast_to(ctx, to)
}

/// CastLike: same shape as input 0, dtype of input 1.
fn cast_like(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    cast_to(ctx, ctx.dtype(1))
}

fn cast_to(ctx: &OpCtx, to: Option<DType>) -> Res<Vec<Fact>> {
    let shape = ctx.shape(0).map(<[usize]>::to_vec);
    let value = match (to, ctx.value(0)?) {
        (Some(to), Some(x)) if foldable(&x.dims) => Some(x.cast(to)),
        _ => None,
    };
    Ok(vec![fact_or_value(to, shape, value)])
}

#[cfg(test)]
mod tests {
    use super::super::common::tests::{floats, infer, ints, op, shaped, unknown};
    use super::*;
    use crate::ir::Attr;

    #[test]
    fn broadcast_add_and_mismatch() {
        let r =
            infer(&op("Add", vec![]), vec![shaped(DType::F32, &[2, 1, 3]), shaped(DType::F32, &[4, 3])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 4, 3]));
        assert_eq!(r[0].dtype, Some(DType::F32));
        let e = infer(&op("Mul", vec![]), vec![shaped(DType::F32, &[2, 3]), shaped(DType::F32, &[4])], 13).unwrap_err();
        assert!(e.starts_with("Mul cannot broadcast shapes [2, 3] and [4]"), "{e}");
        let e = infer(&op("Add", vec![]), vec![shaped(DType::F32, &[2]), shaped(DType::I64, &[2])], 13).unwrap_err();
        assert!(e.contains("differ"), "{e}");
        let r = infer(&op("Add", vec![]), vec![unknown(), shaped(DType::F32, &[4])], 13).unwrap();
        assert_eq!(r[0], fact(Some(DType::F32), None));
    }

    #[test]
    fn integer_arithmetic_folds() {
        let a = ints(&[4], &[7, -7, 7, -7]);
        let b = ints(&[4], &[2, 2, -2, -2]);
        let div = infer(&op("Div", vec![]), vec![a.clone(), b.clone()], 13).unwrap();
        assert_eq!(div[0].value.as_ref().unwrap().to_i64_vec(), vec![3, -3, -3, 3]);
        let m = infer(&op("Mod", vec![]), vec![a.clone(), b.clone()], 13).unwrap();
        assert_eq!(m[0].value.as_ref().unwrap().to_i64_vec(), vec![1, 1, -1, -1]);
        let m = infer(&op("Mod", vec![("fmod", Attr::Int(1))]), vec![a.clone(), b.clone()], 13).unwrap();
        assert_eq!(m[0].value.as_ref().unwrap().to_i64_vec(), vec![1, -1, 1, -1]);
        let mul = infer(&op("Mul", vec![]), vec![a.clone(), ints(&[], &[3])], 13).unwrap();
        assert_eq!(mul[0].value.as_ref().unwrap().to_i64_vec(), vec![21, -21, 21, -21]);
        let by_zero = infer(&op("Div", vec![]), vec![a.clone(), ints(&[], &[0])], 13).unwrap();
        assert_eq!(by_zero[0].value, None);
        assert_eq!(by_zero[0].shape, Some(vec![4]));
        let mx = infer(&op("Max", vec![]), vec![a.clone(), b, ints(&[1], &[0])], 13).unwrap();
        assert_eq!(mx[0].value.as_ref().unwrap().to_i64_vec(), vec![7, 2, 7, 0]);
        let neg = infer(&op("Neg", vec![]), vec![a], 13).unwrap();
        assert_eq!(neg[0].value.as_ref().unwrap().to_i64_vec(), vec![-7, 7, -7, 7]);
    }

    #[test]
    fn float_folds_and_comparisons() {
        let x = floats(&[3], &[4.0, 9.0, -1.0]);
        let s = infer(&op("Sqrt", vec![]), vec![floats(&[2], &[4.0, 9.0])], 13).unwrap();
        assert_eq!(s[0].value.as_ref().unwrap().to_f32_vec(), vec![2.0, 3.0]);
        let a = infer(&op("Abs", vec![]), vec![x.clone()], 13).unwrap();
        assert_eq!(a[0].value.as_ref().unwrap().to_f32_vec(), vec![4.0, 9.0, 1.0]);
        let g = infer(&op("Greater", vec![]), vec![x.clone(), floats(&[], &[0.0])], 13).unwrap();
        let g = g[0].value.as_ref().unwrap();
        assert_eq!((g.dtype, g.to_i64_vec()), (DType::Bool, vec![1, 1, 0]));
        let e = infer(&op("Equal", vec![]), vec![ints(&[2], &[1, 2]), ints(&[2], &[1, 3])], 13).unwrap();
        assert_eq!(e[0].value.as_ref().unwrap().to_i64_vec(), vec![1, 0]);
        let bools = |v: &[i64]| Some(Fact::of_tensor(Tensor::from_i64_as(DType::Bool, vec![v.len()], v)));
        let n = infer(&op("Not", vec![]), vec![bools(&[1, 0])], 13).unwrap();
        assert_eq!(n[0].value.as_ref().unwrap().to_i64_vec(), vec![0, 1]);
        let o = infer(&op("Or", vec![]), vec![bools(&[1, 0]), bools(&[0, 0])], 13).unwrap();
        assert_eq!(o[0].value.as_ref().unwrap().to_i64_vec(), vec![1, 0]);
        let mean = infer(&op("Mean", vec![]), vec![x.clone(), floats(&[1], &[2.0])], 13).unwrap();
        assert_eq!(mean[0].value.as_ref().unwrap().to_f32_vec(), vec![3.0, 5.5, 0.5]);
    }

    #[test]
    fn where_broadcasts_and_folds() {
        let c = Some(Fact::of_tensor(Tensor::from_i64_as(DType::Bool, vec![2, 1], &[1, 0])));
        let r = infer(&op("Where", vec![]), vec![c.clone(), ints(&[3], &[1, 2, 3]), ints(&[], &[-1])], 13).unwrap();
        let v = r[0].value.as_ref().unwrap();
        assert_eq!(v.dims, vec![2, 3]);
        assert_eq!(v.to_i64_vec(), vec![1, 2, 3, -1, -1, -1]);
        let r = infer(
            &op("Where", vec![]),
            vec![shaped(DType::Bool, &[4, 1]), shaped(DType::F32, &[5]), shaped(DType::F32, &[1])],
            13,
        )
        .unwrap();
        assert_eq!(r[0].shape, Some(vec![4, 5]));
        assert!(infer(
            &op("Where", vec![]),
            vec![shaped(DType::Bool, &[4]), shaped(DType::F32, &[5]), shaped(DType::F32, &[1])],
            13
        )
        .is_err());
    }

    #[test]
    fn clip_both_forms() {
        let x = floats(&[3], &[-2.0, 0.5, 9.0]);
        let r = infer(&op("Clip", vec![]), vec![x.clone(), floats(&[], &[0.0]), floats(&[], &[6.0])], 13).unwrap();
        assert_eq!(r[0].value.as_ref().unwrap().to_f32_vec(), vec![0.0, 0.5, 6.0]);
        let r = infer(&op("Clip", vec![("min", Attr::Float(-1.0))]), vec![x.clone()], 6).unwrap();
        assert_eq!(r[0].value.as_ref().unwrap().to_f32_vec(), vec![-1.0, 0.5, 9.0]);
        let r = infer(&op("Clip", vec![]), vec![x, None, Some(Fact::default())], 13).unwrap();
        assert_eq!((r[0].shape.clone(), r[0].value.is_none()), (Some(vec![3]), true));
    }

    #[test]
    fn cast_and_cast_like() {
        let r = infer(&op("Cast", vec![("to", Attr::Int(7))]), vec![floats(&[2], &[1.7, -2.5])], 13).unwrap();
        let v = r[0].value.as_ref().unwrap();
        assert_eq!((v.dtype, v.to_i64_vec()), (DType::I64, vec![1, -2]));
        let r = infer(&op("CastLike", vec![]), vec![ints(&[1], &[3]), shaped(DType::F16, &[1])], 15).unwrap();
        assert_eq!(r[0].value.as_ref().unwrap().dtype, DType::F16);
        let r = infer(&op("Cast", vec![("to", Attr::Int(8))]), vec![shaped(DType::F32, &[2])], 13).unwrap();
        assert_eq!(r[0], fact(None, Some(vec![2])));
    }
}
