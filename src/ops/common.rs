//! Helpers shared by every op family: reading inputs and attributes from an [`OpCtx`]
//! (including arguments that moved from an attribute to an input in a later opset), axis
//! normalisation, numpy broadcasting, checked shape arithmetic, and the dtype-agnostic
//! element gathers constant folding is built on (elements are copied as bytes, so folding a
//! Slice or Transpose never converts values).
//!
//! Nothing here panics on malformed input: every index derived from a model is checked and
//! every product of dimensions is computed with overflow checks.

use std::fmt::Display;

use super::{Fact, OpCtx, FOLD_LIMIT};
use crate::tensor::{DType, Tensor};

pub(crate) type Res<T> = Result<T, String>;

/// An argument that may be given (as an attribute or a constant input), given but not
/// known at compile time (a dynamic input), or absent.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Arg<T> {
    Absent,
    Unknown,
    Known(T),
}

impl<T> Arg<T> {
    /// The value when known; None when absent or unknown.
    pub(crate) fn known(self) -> Option<T> {
        match self {
            Arg::Known(v) => Some(v),
            Arg::Absent | Arg::Unknown => None,
        }
    }
}

impl<'a> OpCtx<'a> {
    /// An error message about this op: "`OpType` `msg`".
    pub(crate) fn err(&self, msg: impl Display) -> String {
        format!("{} {msg}", self.op.op_type)
    }

    /// The fact at input `slot`; None when the slot is absent or the optional input omitted.
    pub(crate) fn input(&self, slot: usize) -> Option<&'a Fact> {
        self.inputs.get(slot).and_then(Option::as_ref)
    }

    /// The fact at input `slot`, failing when that required input is missing.
    pub(crate) fn require(&self, slot: usize) -> Res<&'a Fact> {
        self.input(slot).ok_or_else(|| self.err(format!("is missing its required input {slot}")))
    }

    pub(crate) fn dtype(&self, slot: usize) -> Option<DType> {
        let f = self.input(slot)?;
        f.value.as_ref().map(|v| v.dtype).or(f.dtype)
    }

    /// Shape of input `slot`: the known value's dims, else the fact's shape.
    pub(crate) fn shape(&self, slot: usize) -> Option<&'a [usize]> {
        let f = self.input(slot)?;
        f.value.as_ref().map(|v| v.dims.as_slice()).or(f.shape.as_deref())
    }

    /// Known contents of input `slot`, checked for a byte count matching its dims (so the
    /// tensor's element accessors cannot go out of bounds).
    pub(crate) fn value(&self, slot: usize) -> Res<Option<&'a Tensor>> {
        let Some(t) = self.input(slot).and_then(|f| f.value.as_ref()) else {
            return Ok(None);
        };
        let expected = numel(&t.dims).and_then(|n| n.checked_mul(t.dtype.size()));
        if expected != Some(t.bytes.len()) {
            return Err(self.err(format!(
                "input {slot} holds {} bytes, which does not match a {} tensor of shape {:?}",
                t.bytes.len(),
                t.dtype,
                t.dims
            )));
        }
        Ok(Some(t))
    }

    /// Known contents of input `slot` as integers.
    pub(crate) fn ints(&self, slot: usize) -> Res<Option<Vec<i64>>> {
        Ok(self.value(slot)?.map(Tensor::to_i64_vec))
    }

    /// Known contents of input `slot`, which must hold exactly one element (a scalar or a
    /// one-element 1-D tensor), as an integer.
    pub(crate) fn scalar_i64(&self, slot: usize) -> Res<Option<i64>> {
        match self.ints(slot)? {
            None => Ok(None),
            Some(v) if v.len() == 1 => Ok(Some(v[0])),
            Some(v) => Err(self.err(format!("input {slot} must hold one element, not {}", v.len()))),
        }
    }

    /// An integer list given either as input `slot` (newer opsets) or as attribute `attr`
    /// (older ones). The input wins when both are present, so a model whose opset import
    /// disagrees with the form it uses still works.
    pub(crate) fn ints_arg(&self, attr: &str, slot: usize) -> Res<Arg<Vec<i64>>> {
        if self.input(slot).is_some() {
            return Ok(match self.ints(slot)? {
                Some(v) => Arg::Known(v),
                None => Arg::Unknown,
            });
        }
        Ok(match self.op.attr_ints(attr) {
            Some(v) => Arg::Known(v.to_vec()),
            None => Arg::Absent,
        })
    }

    /// Reads an integer attribute that must be non-negative and fit a usize.
    pub(crate) fn attr_usize(&self, name: &str, default: usize) -> Res<usize> {
        match self.op.attr(name) {
            None => Ok(default),
            Some(_) => {
                let v = self.op.attr_i(name, 0);
                usize::try_from(v).map_err(|_| self.err(format!("attribute {name}={v} must be non-negative")))
            }
        }
    }
}

/// A fact with no known value.
pub(crate) fn fact(dtype: Option<DType>, shape: Option<Vec<usize>>) -> Fact {
    Fact { dtype, shape, value: None }
}

/// The fact for an output whose value may have been folded: with the value when there is
/// one, else just dtype and shape.
pub(crate) fn fact_or_value(dtype: Option<DType>, shape: Option<Vec<usize>>, value: Option<Tensor>) -> Fact {
    match value {
        Some(t) => Fact::of_tensor(t),
        None => fact(dtype, shape),
    }
}

/// Number of elements, None on overflow.
pub(crate) fn numel(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Whether a result of this shape is small enough to fold. Every dim is bounded too, so
/// per-axis index lists stay small even for empty results such as `[0, 1 << 50]`.
pub(crate) fn foldable(dims: &[usize]) -> bool {
    numel(dims).is_some_and(|n| n <= FOLD_LIMIT) && dims.iter().all(|&d| d <= FOLD_LIMIT)
}

/// Converts integer dimensions (e.g. a folded shape tensor) to sizes; negatives are errors.
pub(crate) fn to_dims(v: &[i64]) -> Res<Vec<usize>> {
    v.iter().map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is negative"))).collect()
}

/// Converts a size to i64 for arithmetic with signed attributes.
pub(crate) fn dim_i64(d: usize) -> i64 {
    i64::try_from(d).unwrap_or(i64::MAX)
}

/// Normalises an axis in `-rank..rank` to `0..rank`.
pub(crate) fn norm_axis(axis: i64, rank: usize) -> Res<usize> {
    let r = dim_i64(rank);
    let a = if axis < 0 { axis.saturating_add(r) } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

/// Normalises a list of axes, rejecting duplicates; the result is sorted.
pub(crate) fn norm_axes(axes: &[i64], rank: usize) -> Res<Vec<usize>> {
    let mut out = axes.iter().map(|&a| norm_axis(a, rank)).collect::<Res<Vec<_>>>()?;
    out.sort_unstable();
    if out.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("axes {axes:?} contain a duplicate"));
    }
    Ok(out)
}

/// Numpy (multidirectional) broadcasting of several shapes.
pub(crate) fn broadcast(shapes: &[&[usize]]) -> Res<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (o, &d) in out[off..].iter_mut().zip(s.iter()) {
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                let list: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
                return Err(format!("cannot broadcast shapes {}", list.join(" and ")));
            }
        }
    }
    Ok(out)
}

/// Row-major strides of `dims` (saturating, so huge empty shapes cannot overflow).
pub(crate) fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(dims[i + 1]);
    }
    s
}

/// Calls `f` with every multi-index of `dims` in row-major order.
pub(crate) fn for_each_index(dims: &[usize], mut f: impl FnMut(&[usize])) {
    if dims.contains(&0) {
        return;
    }
    let mut idx = vec![0usize; dims.len()];
    loop {
        f(&idx);
        let mut a = dims.len();
        loop {
            if a == 0 {
                return;
            }
            a -= 1;
            idx[a] += 1;
            if idx[a] < dims[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

/// For every element of a tensor of shape `dims` (row-major), the flat offset
/// `sum(index[a] * strides[a])` into some source tensor.
pub(crate) fn offsets(dims: &[usize], strides: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(numel(dims).unwrap_or(0).min(FOLD_LIMIT));
    for_each_index(dims, |idx| {
        out.push(idx.iter().zip(strides).fold(0usize, |acc, (&i, &s)| acc.saturating_add(i.saturating_mul(s))))
    });
    out
}

/// For each element of the broadcast shape `out`, the flat index of the element of a tensor
/// of shape `inp` it comes from (`inp` must broadcast to `out`).
pub(crate) fn broadcast_offsets(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let off = out.len().saturating_sub(inp.len());
    let in_strides = strides(inp);
    let eff: Vec<usize> = (0..out.len())
        .map(|i| match i.checked_sub(off).and_then(|j| inp.get(j).map(|&d| (j, d))) {
            Some((j, d)) if d != 1 => in_strides[j],
            _ => 0,
        })
        .collect();
    offsets(out, &eff)
}

/// Bytes of element `i` of `t`.
pub(crate) fn elem(t: &Tensor, i: usize) -> Res<&[u8]> {
    let es = t.dtype.size();
    i.checked_mul(es)
        .and_then(|start| t.bytes.get(start..start.checked_add(es)?))
        .ok_or_else(|| format!("element {i} is out of range for a tensor of shape {:?}", t.dims))
}

/// A tensor of shape `dims` whose element k is element `idx[k]` of `t` (bytes copied, so
/// any dtype works unchanged).
pub(crate) fn gather_elems(t: &Tensor, dims: Vec<usize>, idx: &[usize]) -> Res<Tensor> {
    let mut bytes = Vec::with_capacity(idx.len() * t.dtype.size());
    for &i in idx {
        bytes.extend_from_slice(elem(t, i)?);
    }
    Tensor::new(t.dtype, dims, bytes).map_err(|e| e.to_string())
}

/// Picks the indices `picks[a]` along every axis `a` of `t` (an outer product of index
/// lists): the folding of Slice, Split, Tile and Gather.
pub(crate) fn select(t: &Tensor, picks: &[Vec<usize>]) -> Res<Tensor> {
    if picks.len() != t.rank() {
        return Err(format!("cannot select {} axes from a tensor of rank {}", picks.len(), t.rank()));
    }
    for (a, p) in picks.iter().enumerate() {
        if let Some(&bad) = p.iter().find(|&&i| i >= t.dims[a]) {
            return Err(format!("index {bad} is out of range for axis {a} of size {}", t.dims[a]));
        }
    }
    let st = strides(&t.dims);
    let dims: Vec<usize> = picks.iter().map(Vec::len).collect();
    let mut idx = Vec::with_capacity(numel(&dims).unwrap_or(0).min(FOLD_LIMIT));
    for_each_index(&dims, |m| idx.push(m.iter().enumerate().map(|(a, &i)| picks[a][i] * st[a]).sum()));
    gather_elems(t, dims, &idx)
}

/// A tensor's contents as integers or floats, by its dtype: the two domains folding
/// computes in (i64 for integer and bool dtypes, f64 for float dtypes).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Nums {
    Int(Vec<i64>),
    Float(Vec<f64>),
}

impl Nums {
    pub(crate) fn of(t: &Tensor) -> Nums {
        if t.dtype.is_float() {
            Nums::Float(t.to_f64_vec())
        } else {
            Nums::Int(t.to_i64_vec())
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Nums::Int(v) => v.len(),
            Nums::Float(v) => v.len(),
        }
    }

    /// Builds a tensor of `dtype` and `dims` (which must hold `len()` elements).
    pub(crate) fn into_tensor(self, dtype: DType, dims: Vec<usize>) -> Res<Tensor> {
        if numel(&dims) != Some(self.len()) {
            return Err(format!("{} values do not fill shape {dims:?}", self.len()));
        }
        Ok(match self {
            Nums::Int(v) => Tensor::from_i64_as(dtype, dims, &v),
            Nums::Float(v) => Tensor::from_f64_as(dtype, dims, &v),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ir::{Attr, Op};

    /// An op for tests.
    pub(crate) fn op(op_type: &str, attrs: Vec<(&str, Attr)>) -> Op {
        Op {
            name: "n".into(),
            op_type: op_type.into(),
            domain: String::new(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            origin: None,
        }
    }

    /// Runs the registered rule for `op` on `inputs` at `opset`.
    pub(crate) fn infer(op: &Op, inputs: Vec<Option<Fact>>, opset: i64) -> Res<Vec<Fact>> {
        let f = super::super::rule("", &op.op_type).expect("rule registered");
        f(&OpCtx { op, inputs: &inputs, opset })
    }

    pub(crate) fn shaped(dtype: DType, dims: &[usize]) -> Option<Fact> {
        Some(Fact::shaped(Some(dtype), dims.to_vec()))
    }

    pub(crate) fn ints(dims: &[usize], v: &[i64]) -> Option<Fact> {
        Some(Fact::of_tensor(Tensor::from_i64(dims.to_vec(), v)))
    }

    pub(crate) fn floats(dims: &[usize], v: &[f32]) -> Option<Fact> {
        Some(Fact::of_tensor(Tensor::from_f32(dims.to_vec(), v)))
    }

    pub(crate) fn unknown() -> Option<Fact> {
        Some(Fact::default())
    }

    #[test]
    fn broadcasting() {
        assert_eq!(broadcast(&[&[2, 1, 3], &[4, 1]]).unwrap(), vec![2, 4, 3]);
        assert_eq!(broadcast(&[&[0], &[1]]).unwrap(), vec![0]);
        assert_eq!(broadcast(&[&[], &[5]]).unwrap(), vec![5]);
        assert!(broadcast(&[&[2, 3], &[4]]).unwrap_err().contains("cannot broadcast"));
        assert_eq!(broadcast_offsets(&[2, 3], &[3]), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(broadcast_offsets(&[2, 3], &[2, 1]), vec![0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn axes() {
        assert_eq!(norm_axis(-1, 3).unwrap(), 2);
        assert!(norm_axis(3, 3).is_err());
        assert!(norm_axis(i64::MIN, 3).is_err());
        assert_eq!(norm_axes(&[2, -3], 3).unwrap(), vec![0, 2]);
        assert!(norm_axes(&[1, -2], 3).is_err());
    }

    #[test]
    fn select_and_offsets() {
        let t = Tensor::from_i64(vec![2, 3], &[0, 1, 2, 3, 4, 5]);
        let s = select(&t, &[vec![1, 0], vec![2]]).unwrap();
        assert_eq!((s.dims.clone(), s.to_i64_vec()), (vec![2, 1], vec![5, 2]));
        assert!(select(&t, &[vec![2], vec![0]]).is_err());
        assert_eq!(numel(&[usize::MAX, 2]), None);
        assert!(!foldable(&[1 << 20]));
        assert!(strides(&[0, usize::MAX, 4]).len() == 3);
    }

    #[test]
    fn malformed_value_is_an_error() {
        let bad = Fact::of_tensor(Tensor { dtype: DType::I64, dims: vec![3], bytes: vec![0; 8] });
        let o = op("Shape", vec![]);
        let inputs = [Some(bad)];
        let ctx = OpCtx { op: &o, inputs: &inputs, opset: 13 };
        assert!(ctx.value(0).is_err());
    }
}
