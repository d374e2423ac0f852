//! Per-op rules, keyed by ONNX op type: shape/dtype inference and constant folding.
//!
//! One file per op family (as tract does). A rule sees the op and, per input slot, what is
//! known about that input (a [`Fact`]); it returns one fact per output. Values that are
//! small and fully known (shape subgraphs: Shape → Gather → Unsqueeze → Concat → Reshape,
//! Range, ConstantOfShape, …) are folded, so shapes that depend on them become concrete.
//! An op type without a rule is opaque: its outputs have unknown shapes, and unit
//! discovery leaves anything touching it unprunable — never a crash.
//!
//! Contract for callers of a rule: it returns one fact per output slot, in slot order.
//! Optional trailing outputs (MaxPool indices, Dropout mask, BatchNormalization statistics,
//! LayerNormalization mean) always get a fact, so a rule may return more facts than the node
//! has outputs — the extra ones are to be ignored. A rule returns fewer facts only when the
//! number of outputs cannot be told from the op alone (Split with neither sizes nor
//! `num_outputs`); missing facts mean "unknown". An unknown input shape gives facts with
//! shape None, never an error; inconsistent inputs give an `Err` whose message starts with
//! the op type (the caller adds the node's name).

mod common;
mod conv;
mod elementwise;
mod fused;
mod linalg;
mod reduce;
mod shape;

use crate::ir::Op;
use crate::tensor::{DType, Tensor};

/// What is known about a value at compile time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fact {
    pub dtype: Option<DType>,
    pub shape: Option<Vec<usize>>,
    /// Full contents, when known (weights, constants, folded shape arithmetic).
    pub value: Option<Tensor>,
}

impl Fact {
    pub fn of_tensor(t: Tensor) -> Fact {
        Fact { dtype: Some(t.dtype), shape: Some(t.dims.clone()), value: Some(t) }
    }
    pub fn shaped(dtype: Option<DType>, shape: Vec<usize>) -> Fact {
        Fact { dtype, shape: Some(shape), value: None }
    }
}

/// Folded results larger than this many elements are not kept (only shapes are).
pub const FOLD_LIMIT: usize = 1 << 16;

/// Everything a rule may look at.
pub struct OpCtx<'a> {
    pub op: &'a Op,
    /// One entry per input slot; None where the optional input is omitted.
    pub inputs: &'a [Option<Fact>],
    /// Opset version of the op's domain.
    pub opset: i64,
}

pub type InferFn = fn(&OpCtx) -> Result<Vec<Fact>, String>;

/// Looks up the inference rule for an op type in a domain ("" or "ai.onnx" = standard).
pub fn rule(domain: &str, op_type: &str) -> Option<InferFn> {
    if domain == "com.microsoft" {
        return fused::microsoft_rule(op_type);
    }
    if !matches!(domain, "" | "ai.onnx") {
        return None;
    }
    elementwise::rule(op_type)
        .or_else(|| fused::rule(op_type))
        .or_else(|| linalg::rule(op_type))
        .or_else(|| conv::rule(op_type))
        .or_else(|| shape::rule(op_type))
        .or_else(|| reduce::rule(op_type))
}

#[cfg(test)]
mod tests {
    use super::common::tests::op;
    use super::*;
    use crate::ir::Attr;

    const OPS: &[&str] = &[
        "Abs",
        "Neg",
        "Sqrt",
        "Exp",
        "Relu",
        "Sign",
        "Not",
        "Round",
        "Trilu",
        "IsNaN",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Mod",
        "PRelu",
        "BitShift",
        "Min",
        "Max",
        "Sum",
        "Mean",
        "Equal",
        "Greater",
        "LessOrEqual",
        "And",
        "Xor",
        "BitwiseAnd",
        "Where",
        "Clip",
        "Cast",
        "CastLike",
        "MatMul",
        "MatMulInteger",
        "Gemm",
        "Einsum",
        "Conv",
        "ConvInteger",
        "ConvTranspose",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "BatchNormalization",
        "LayerNormalization",
        "InstanceNormalization",
        "Pad",
        "Resize",
        "Upsample",
        "Shape",
        "Size",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Slice",
        "Split",
        "Gather",
        "GatherElements",
        "GatherND",
        "ScatterElements",
        "Expand",
        "Tile",
        "ConstantOfShape",
        "Range",
        "Identity",
        "Dropout",
        "Constant",
        "NonZero",
        "ReduceMean",
        "ReduceSum",
        "ReduceProd",
        "ReduceL2",
        "ReduceLogSumExp",
        "ArgMax",
        "TopK",
        "Softmax",
        "LogSoftmax",
        "CumSum",
        "Attention",
        "DequantizeLinear",
    ];

    /// A small deterministic generator (xorshift), so the test needs no extra crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<T: Clone>(&mut self, v: &[T]) -> T {
            v[self.below(v.len())].clone()
        }
        fn int(&mut self) -> i64 {
            self.pick(&[-3, -2, -1, 0, 0, 1, 1, 2, 3, 4, 7, i64::MIN, i64::MAX, -9223372036854775807, 1 << 40])
        }
        fn ints(&mut self) -> Vec<i64> {
            (0..self.below(5)).map(|_| self.int()).collect()
        }
        fn dims(&mut self) -> Vec<usize> {
            (0..self.below(5)).map(|_| self.pick(&[0, 1, 1, 2, 3, 4])).collect()
        }
        fn tensor(&mut self) -> Tensor {
            let dims = self.dims();
            let n = dims.iter().product::<usize>();
            match self.below(4) {
                0 => Tensor::from_f32(
                    dims,
                    &(0..n).map(|_| self.pick(&[-2.5, 0.0, 1.0, 3.0, f32::NAN, f32::INFINITY])).collect::<Vec<_>>(),
                ),
                1 => Tensor::from_i64_as(DType::Bool, dims, &(0..n).map(|_| self.below(2) as i64).collect::<Vec<_>>()),
                2 => Tensor { dtype: DType::I64, dims, bytes: vec![0; self.below(9)] },
                _ => Tensor::from_i64(dims, &(0..n).map(|_| self.int()).collect::<Vec<_>>()),
            }
        }
        fn fact(&mut self) -> Option<Fact> {
            match self.below(6) {
                0 => None,
                1 => Some(Fact::default()),
                2 => Some(Fact::shaped(Some(self.pick(&[DType::F32, DType::I64, DType::Bool])), self.dims())),
                _ => Some(Fact::of_tensor(self.tensor())),
            }
        }
        fn attr(&mut self) -> (&'static str, Attr) {
            let name = self.pick(&[
                "axis",
                "axes",
                "perm",
                "keepdims",
                "kernel_shape",
                "strides",
                "pads",
                "dilations",
                "group",
                "auto_pad",
                "ceil_mode",
                "to",
                "split",
                "num_outputs",
                "start",
                "end",
                "transA",
                "transB",
                "equation",
                "value",
                "allowzero",
                "k",
                "output_shape",
                "output_padding",
                "batch_dims",
                "scales",
                "fmod",
                "shape",
                "starts",
                "ends",
                "noop_with_empty_axes",
                "stash_type",
                "min",
                "value_ints",
            ]);
            let value = match name {
                "auto_pad" => Attr::String(self.pick(&["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "X"]).into()),
                "equation" => {
                    Attr::String(self.pick(&["ij,jk->ik", "...i,i", "ab->ba", "i...->...", "a,,b", "é->"]).into())
                }
                "value" => Attr::Tensor(self.tensor()),
                "scales" => Attr::Floats(vec![1.0, f32::NAN, -2.0, 1e30]),
                "min" => Attr::Float(-1.0),
                _ if self.below(2) == 0 => Attr::Int(self.int()),
                _ => Attr::Ints(self.ints()),
            };
            (name, value)
        }
    }

    /// Malformed models must give errors, never panics: every rule on random inputs.
    #[test]
    fn rules_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for &op_type in OPS {
            let f = rule("", op_type).unwrap_or_else(|| panic!("no rule for {op_type}"));
            for _ in 0..3000 {
                let attrs: Vec<(&str, Attr)> = (0..rng.below(5)).map(|_| rng.attr()).collect();
                let o = op(op_type, attrs);
                let inputs: Vec<Option<Fact>> = (0..rng.below(6)).map(|_| rng.fact()).collect();
                let opset = rng.pick(&[1, 7, 11, 13, 18]);
                let _ = f(&OpCtx { op: &o, inputs: &inputs, opset });
            }
        }
        assert!(rule("com.microsoft", "Attention").is_some());
        assert!(rule("com.microsoft", "NoSuchOp").is_none());
        assert!(rule("org.example", "Attention").is_none());
        assert!(rule("", "NoSuchOp").is_none());
    }
}
