//! Linear algebra: MatMul (numpy `matmul` semantics: 1-D operands are promoted and the
//! promoted axis dropped again, batch dimensions broadcast), MatMulInteger (int32 result),
//! Gemm (`transA`/`transB`, C broadcast unidirectionally to M×N) and Einsum (explicit
//! `->` equations and the implicit form, with `...`, via a per-label size table).
//!
//! The shapes are the same in every opset these ops exist in (Gemm's C became optional at
//! opset 11, and the pre-7 `broadcast` attribute is ignored). Nothing here is folded: these
//! ops do not occur in shape subgraphs.

use std::collections::BTreeMap;

use super::common::{broadcast, fact, Res};
use super::{Fact, InferFn, OpCtx};
use crate::tensor::DType;

pub(crate) fn rule(op_type: &str) -> Option<InferFn> {
    Some(match op_type {
        "MatMul" | "MatMulInteger" => matmul,
        "Gemm" => gemm,
        "Einsum" => einsum,
        _ => return None,
    })
}

fn matmul(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = if ctx.op.op_type == "MatMulInteger" { Some(DType::I32) } else { ctx.dtype(0) };
    let shape = match (ctx.shape(0), ctx.shape(1)) {
        (Some(a), Some(b)) => Some(matmul_shape(a, b).map_err(|e| ctx.err(e))?),
        _ => None,
    };
    Ok(vec![fact(dtype, shape)])
}

/// Output shape of `matmul(a, b)`.
pub(crate) fn matmul_shape(a: &[usize], b: &[usize]) -> Res<Vec<usize>> {
    let (Some((&k_a, a_rest)), Some((&n, b_rest))) = (a.split_last(), b.split_last()) else {
        return Err("operands must have rank 1 or more".into());
    };
    // 1-D `a` is a row vector [1, k]; 1-D `b` a column vector [k, 1].
    let (m, a_batch) = match a_rest.split_last() {
        Some((&m, batch)) => (Some(m), batch),
        None => (None, a_rest),
    };
    let (k_b, n, b_batch) = match b_rest.split_last() {
        Some((&k, batch)) => (k, Some(n), batch),
        None => (n, None, b_rest),
    };
    if k_a != k_b {
        return Err(format!("inner dimensions {k_a} and {k_b} differ (shapes {a:?} and {b:?})"));
    }
    let mut out = broadcast(&[a_batch, b_batch]).map_err(|e| format!("batch dimensions: {e}"))?;
    out.extend(m);
    out.extend(n);
    Ok(out)
}

fn gemm(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(0);
    let (Some(a), Some(b)) = (ctx.shape(0), ctx.shape(1)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let (&[a0, a1], &[b0, b1]) = (a, b) else {
        return Err(ctx.err(format!("needs 2-D A and B, got shapes {a:?} and {b:?}")));
    };
    let (m, k_a) = if ctx.op.attr_i("transA", 0) != 0 { (a1, a0) } else { (a0, a1) };
    let (k_b, n) = if ctx.op.attr_i("transB", 0) != 0 { (b1, b0) } else { (b0, b1) };
    if k_a != k_b {
        return Err(ctx.err(format!("inner dimensions {k_a} and {k_b} differ (A {a:?}, B {b:?})")));
    }
    if let Some(c) = ctx.shape(2) {
        if c.len() > 2 || broadcast(&[c, &[m, n]]).ok().as_deref() != Some(&[m, n][..]) {
            return Err(ctx.err(format!("C of shape {c:?} does not broadcast to [{m}, {n}]")));
        }
    }
    Ok(vec![fact(dtype, Some(vec![m, n]))])
}

/// One operand (or the output) of an Einsum equation: its labels, with the position of
/// `...` among them if it has one.
struct Term {
    labels: Vec<char>,
    ellipsis: Option<usize>,
}

impl Term {
    fn parse(s: &str) -> Res<Term> {
        let mut labels = Vec::new();
        let mut ellipsis = None;
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("...") {
                if ellipsis.replace(labels.len()).is_some() {
                    return Err(format!("term '{s}' has two ellipses"));
                }
                rest = &rest[3..];
            } else if c.is_ascii_alphabetic() {
                labels.push(c);
                rest = &rest[1..];
            } else {
                return Err(format!("term '{s}' has an invalid character '{c}'"));
            }
        }
        Ok(Term { labels, ellipsis })
    }
}

fn einsum(ctx: &OpCtx) -> Res<Vec<Fact>> {
    let equation = ctx.op.attr_str("equation").ok_or_else(|| ctx.err("has no 'equation' attribute"))?;
    let eq: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms = lhs.split(',').map(Term::parse).collect::<Res<Vec<_>>>().map_err(|e| ctx.err(e))?;
    if terms.len() != ctx.inputs.len() {
        return Err(ctx.err(format!(
            "equation '{equation}' has {} operands but the node has {} inputs",
            terms.len(),
            ctx.inputs.len()
        )));
    }
    for i in 0..terms.len() {
        ctx.require(i)?;
    }
    let dtype = ctx.dtype(0);
    let shapes: Option<Vec<&[usize]>> = (0..terms.len()).map(|i| ctx.shape(i)).collect();
    let Some(shapes) = shapes else {
        return Ok(vec![fact(dtype, None)]);
    };
    einsum_shape(&terms, &shapes, rhs)
        .map(|s| vec![fact(dtype, Some(s))])
        .map_err(|e| ctx.err(format!("'{equation}': {e}")))
}

/// Output shape of an Einsum: every label gets one size over all operands (1 broadcasts),
/// the ellipsis dimensions broadcast across operands.
fn einsum_shape(terms: &[Term], shapes: &[&[usize]], rhs: Option<&str>) -> Res<Vec<usize>> {
    let mut sizes: BTreeMap<char, usize> = BTreeMap::new();
    let mut counts: BTreeMap<char, usize> = BTreeMap::new();
    let mut ellipsis_shapes: Vec<&[usize]> = Vec::new();
    for (i, (t, &s)) in terms.iter().zip(shapes).enumerate() {
        let n_ell = match t.ellipsis {
            Some(_) => s.len().checked_sub(t.labels.len()),
            None => (s.len() == t.labels.len()).then_some(0),
        }
        .ok_or_else(|| format!("operand {i} has rank {} but its term has {} labels", s.len(), t.labels.len()))?;
        let at = t.ellipsis.unwrap_or(t.labels.len());
        ellipsis_shapes.push(&s[at..at + n_ell]);
        let label_dims = s[..at].iter().chain(&s[at + n_ell..]);
        for (&c, &d) in t.labels.iter().zip(label_dims) {
            *counts.entry(c).or_default() += 1;
            let e = sizes.entry(c).or_insert(d);
            if *e == 1 {
                *e = d;
            } else if d != 1 && d != *e {
                return Err(format!("label '{c}' has sizes {} and {d}", *e));
            }
        }
    }
    let ell = broadcast(&ellipsis_shapes)?;
    let out = match rhs {
        Some(r) => Term::parse(r)?,
        None => {
            // Implicit form: the labels that occur once, in alphabetical order.
            let labels: Vec<char> = counts.iter().filter(|&(_, &n)| n == 1).map(|(&c, _)| c).collect();
            Term { labels, ellipsis: terms.iter().any(|t| t.ellipsis.is_some()).then_some(0) }
        }
    };
    let mut shape = Vec::with_capacity(out.labels.len() + ell.len());
    for (j, c) in out.labels.iter().enumerate() {
        if out.ellipsis == Some(j) {
            shape.extend(&ell);
        }
        shape.push(*sizes.get(c).ok_or_else(|| format!("output label '{c}' does not occur in any operand"))?);
    }
    if out.ellipsis == Some(out.labels.len()) {
        shape.extend(&ell);
    } else if out.ellipsis.is_none() && ell.iter().any(|&d| d != 1) {
        return Err("the output drops the '...' dimensions".into());
    }
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::super::common::tests::{infer, op, shaped, unknown};
    use super::*;
    use crate::ir::Attr;

    fn mm(a: &[usize], b: &[usize]) -> Res<Vec<Fact>> {
        infer(&op("MatMul", vec![]), vec![shaped(DType::F32, a), shaped(DType::F32, b)], 13)
    }

    #[test]
    fn matmul_broadcasts_batch_dims() {
        assert_eq!(mm(&[8, 1, 128, 64], &[12, 64, 32]).unwrap()[0].shape, Some(vec![8, 12, 128, 32]));
        assert_eq!(mm(&[2, 384, 768], &[768, 3072]).unwrap()[0].shape, Some(vec![2, 384, 3072]));
        assert_eq!(mm(&[5], &[3, 5, 7]).unwrap()[0].shape, Some(vec![3, 7]));
        assert_eq!(mm(&[3, 5], &[5]).unwrap()[0].shape, Some(vec![3]));
        assert_eq!(mm(&[5], &[5]).unwrap()[0].shape, Some(vec![]));
        let e = mm(&[1, 384], &[512, 10]).unwrap_err();
        assert!(e.starts_with("MatMul inner dimensions 384 and 512 differ"), "{e}");
        assert!(mm(&[2, 3, 4], &[5, 4, 6]).is_err());
        assert!(mm(&[], &[3]).is_err());
        let r = infer(&op("MatMul", vec![]), vec![unknown(), shaped(DType::F32, &[4, 4])], 13).unwrap();
        assert_eq!(r[0].shape, None);
    }

    #[test]
    fn gemm_transposes() {
        let g = op("Gemm", vec![("transB", Attr::Int(1))]);
        let r = infer(
            &g,
            vec![shaped(DType::F32, &[4, 512]), shaped(DType::F32, &[1000, 512]), shaped(DType::F32, &[1000])],
            13,
        )
        .unwrap();
        assert_eq!(r[0].shape, Some(vec![4, 1000]));
        assert!(infer(&g, vec![shaped(DType::F32, &[4, 512]), shaped(DType::F32, &[512, 1000])], 13).is_err());
        assert!(infer(
            &g,
            vec![shaped(DType::F32, &[4, 512]), shaped(DType::F32, &[10, 512]), shaped(DType::F32, &[7])],
            13
        )
        .is_err());
        let ta = op("Gemm", vec![("transA", Attr::Int(1))]);
        let r = infer(&ta, vec![shaped(DType::F32, &[3, 4]), shaped(DType::F32, &[3, 5])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![4, 5]));
    }

    fn es(eq: &str, shapes: &[&[usize]]) -> Res<Vec<usize>> {
        let o = op("Einsum", vec![("equation", Attr::String(eq.as_bytes().to_vec()))]);
        let r = infer(&o, shapes.iter().map(|s| shaped(DType::F32, s)).collect(), 12)?;
        Ok(r[0].shape.clone().unwrap())
    }

    #[test]
    fn einsum_forms() {
        assert_eq!(es("bij,bjk->bik", &[&[2, 3, 4], &[2, 4, 5]]).unwrap(), vec![2, 3, 5]);
        assert_eq!(es("ij,jk->ik", &[&[3, 4], &[4, 5]]).unwrap(), vec![3, 5]);
        assert_eq!(es("bsd,edh->bseh", &[&[2, 7, 16], &[4, 16, 8]]).unwrap(), vec![2, 7, 4, 8]);
        assert_eq!(es("ij,jk", &[&[3, 4], &[4, 5]]).unwrap(), vec![3, 5]);
        assert_eq!(es("...ij,...jk->...ik", &[&[6, 3, 4], &[4, 5]]).unwrap(), vec![6, 3, 5]);
        assert_eq!(es("ii->i", &[&[3, 3]]).unwrap(), vec![3]);
        assert!(es("ij,jk->ik", &[&[3, 4], &[5, 5]]).unwrap_err().contains("label 'j'"));
        assert!(es("ij->ix", &[&[3, 4]]).is_err());
        assert!(es("ijk->i", &[&[3, 4]]).is_err());
        assert!(es("ij,jk->ik", &[&[3, 4]]).is_err());
    }
}
