//! The lowered program: a straight-line list of primitive instructions over numbered slots.
//!
//! Every ONNX op is lowered (see `lower.rs`) to a handful of primitives — elementwise unary
//! and binary ops with broadcasting, reductions, batched matmul, im2col/col2im and pooling,
//! index ops and layout ops — and the backward program (`autodiff.rs`) is written in the
//! same primitives, so each primitive has one CPU kernel and one WGSL kernel, whatever the
//! ONNX op or the direction. Shapes are concrete: a program is built for one batch shape.
//! Slots hold row-major tensors; integer and boolean values are carried in the float type
//! (exact below 2^24 in f32, which covers token ids and indices of the supported models).

use crate::ir::Id;

pub type Slot = usize;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Recip,
    Erf,
    Tanh,
    Sigmoid,
    Relu,
    Abs,
    Floor,
    Ceil,
    /// Truncation toward zero: a float → integer Cast.
    Trunc,
    /// 1 where x != 0: a Cast to bool.
    NonZero,
    Not,
    /// 1 where x is NaN.
    IsNaN,
    /// 1 where x is +∞ (when the first flag is set) or −∞ (when the second is).
    IsInf(bool, bool),
    /// a·x + b.
    Affine(f32, f32),
    Clip(f32, f32),
    /// max(0, min(1, a·x + b)).
    HardSigmoid(f32, f32),
    /// x·Φ(x) = 0.5·x·(1 + erf(x/√2)): exact GELU, one pass instead of the five ops
    /// exporters write (and their backward).
    Gelu,
}

impl UnaryOp {
    /// Whether the op has a (non-zero almost everywhere) derivative.
    pub fn differentiable(self) -> bool {
        !matches!(
            self,
            UnaryOp::Floor
                | UnaryOp::Ceil
                | UnaryOp::Trunc
                | UnaryOp::NonZero
                | UnaryOp::Not
                | UnaryOp::IsNaN
                | UnaryOp::IsInf(..)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    Equal,
    Less,
    Greater,
    LessEq,
    GreaterEq,
    And,
    Or,
    Xor,
    /// b · a^(b-1): the derivative of Pow in its base.
    PowGrad,
}

impl BinaryOp {
    pub fn differentiable(self) -> bool {
        matches!(self, BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Pow)
    }
}

/// Row-wise ops over the last axis, fused (each row is read and written in one kernel,
/// instead of the reduce / broadcast / elementwise chain they decompose into).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowOp {
    /// (x − mean) / sqrt(var + eps), with the population variance: LayerNormalization
    /// before its scale and bias.
    Normalize(f32),
    /// exp(x − max) / Σ exp(x − max).
    Softmax,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

/// 2-D window geometry shared by im2col, col2im and pooling (NCHW; 1-D convs are lowered
/// with H = 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// Padding at the start of each spatial axis (the end padding follows from the
    /// output size).
    pub pad: [usize; 2],
    /// Input [N, C, H, W] and output spatial size [OH, OW].
    pub input: [usize; 4],
    pub output: [usize; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    /// Average; `count_pad` counts padded positions in the divisor.
    Avg {
        count_pad: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Prim {
    /// ins [x]
    Unary(UnaryOp),
    /// ins [x, dy] → dy · f'(x)
    UnaryGrad(UnaryOp),
    /// ins [a, b], numpy broadcasting to the output shape.
    Binary(BinaryOp),
    /// ins [cond, a, b]
    Where,
    /// ins [x]; the output keeps the reduced axes with size 1.
    Reduce { op: ReduceOp, axes: Vec<usize> },
    /// ins [x] broadcast (Expand) to the output shape.
    Broadcast,
    /// ins [a, b]: a [..., M, K] (or [..., K, M] when ta) times b [..., K, N] (or [..., N, K]
    /// when tb); batch dimensions broadcast.
    MatMul { ta: bool, tb: bool },
    /// ins [x], same elements in a new shape (Reshape, Flatten, Squeeze, Unsqueeze, copies).
    Copy,
    /// ins [x]
    Transpose { perm: Vec<usize> },
    /// ins [x]; output element i along each axis reads x at start + i·step.
    Slice { starts: Vec<usize>, steps: Vec<isize> },
    /// ins [x]; the adjoint of Slice (and constant Pad): the output is `fill` except at
    /// start + i·step, which receives x[i].
    Embed { starts: Vec<usize>, steps: Vec<isize>, fill: f32 },
    /// ins [x0, x1, ...]
    Concat { axis: usize },
    /// ins [data, indices]
    Gather { axis: usize },
    /// ins [indices, dy] → zeros of the data shape with dy added at the gathered rows.
    GatherGrad { axis: usize },
    /// ins [data, indices]
    GatherElements { axis: usize },
    /// ins [data, indices, updates]; `add` accumulates instead of replacing.
    ScatterElements { axis: usize, add: bool },
    /// ins [x] → indices (keepdims shape) as floats.
    ArgMax { axis: usize, select_last: bool, min: bool },
    /// ins [x] → indices of the k largest (or smallest) along axis, sorted.
    TopKIndices { axis: usize, k: usize, largest: bool },
    /// ins [x [N,C,H,W]] → columns [C·kh·kw, N, OH·OW].
    Im2Col(Window),
    /// ins [cols] → x: the adjoint of Im2Col (overlaps accumulate).
    Col2Im(Window),
    /// ins [x] → [N, C, OH, OW]
    Pool(PoolKind, Window),
    /// ins [x, dy] → dx
    PoolGrad(PoolKind, Window),
    /// ins [x] → the op over each row of the last axis.
    Rows(RowOp),
    /// ins [x, dy] for Normalize (its input), [y, dy] for Softmax (its output) → dx.
    RowsGrad(RowOp),
}

impl Prim {
    /// A short name for errors, profiles and kernel lookup.
    pub fn name(&self) -> &'static str {
        match self {
            Prim::Unary(_) => "unary",
            Prim::UnaryGrad(_) => "unary_grad",
            Prim::Binary(_) => "binary",
            Prim::Where => "where",
            Prim::Reduce { .. } => "reduce",
            Prim::Broadcast => "broadcast",
            Prim::MatMul { .. } => "matmul",
            Prim::Copy => "copy",
            Prim::Transpose { .. } => "transpose",
            Prim::Slice { .. } => "slice",
            Prim::Embed { .. } => "embed",
            Prim::Concat { .. } => "concat",
            Prim::Gather { .. } => "gather",
            Prim::GatherGrad { .. } => "gather_grad",
            Prim::GatherElements { .. } => "gather_elements",
            Prim::ScatterElements { .. } => "scatter_elements",
            Prim::ArgMax { .. } => "argmax",
            Prim::TopKIndices { .. } => "topk_indices",
            Prim::Im2Col(_) => "im2col",
            Prim::Col2Im(_) => "col2im",
            Prim::Pool(..) => "pool",
            Prim::PoolGrad(..) => "pool_grad",
            Prim::Rows(_) => "rows",
            Prim::RowsGrad(_) => "rows_grad",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Instr {
    pub prim: Prim,
    pub ins: Vec<Slot>,
    pub out: Slot,
    /// The ONNX node this came from (for errors and profiles).
    pub node: String,
    /// Gradients do not flow through this instruction (the max subtracted in Softmax).
    pub stop_grad: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SlotKind {
    /// Fed at run time: a graph input (by name) or a cotangent seed.
    Input(String),
    /// A weight of the model, by IR value id; its data is the default.
    Param(Id),
    Const(Vec<f64>),
    Temp,
}

#[derive(Clone, Debug)]
pub struct SlotInfo {
    pub shape: Vec<usize>,
    pub kind: SlotKind,
    pub name: String,
}

impl SlotInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A straight-line program. `instrs` are in execution order.
#[derive(Clone, Debug, Default)]
pub struct Program {
    pub slots: Vec<SlotInfo>,
    pub instrs: Vec<Instr>,
}

impl Program {
    pub fn add_slot(&mut self, shape: Vec<usize>, kind: SlotKind, name: impl Into<String>) -> Slot {
        self.slots.push(SlotInfo { shape, kind, name: name.into() });
        self.slots.len() - 1
    }

    pub fn shape(&self, s: Slot) -> &[usize] {
        &self.slots[s].shape
    }

    /// Appends an instruction writing a new temporary slot of `shape`.
    pub fn push(&mut self, prim: Prim, ins: Vec<Slot>, shape: Vec<usize>, node: &str) -> Slot {
        let out = self.add_slot(shape, SlotKind::Temp, String::new());
        self.instrs.push(Instr { prim, ins, out, node: node.to_string(), stop_grad: false });
        out
    }

    pub fn constant(&mut self, shape: Vec<usize>, data: Vec<f64>) -> Slot {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        self.add_slot(shape, SlotKind::Const(data), "const")
    }

    pub fn scalar(&mut self, v: f64) -> Slot {
        self.constant(vec![], vec![v])
    }

    /// Reshape (a copy; reshapes are rare and cheap next to the matmuls).
    pub fn reshape(&mut self, x: Slot, shape: Vec<usize>, node: &str) -> Slot {
        if self.shape(x) == shape.as_slice() {
            return x;
        }
        debug_assert_eq!(self.slots[x].numel(), shape.iter().product::<usize>());
        self.push(Prim::Copy, vec![x], shape, node)
    }

    pub fn unary(&mut self, op: UnaryOp, x: Slot, node: &str) -> Slot {
        let s = self.shape(x).to_vec();
        self.push(Prim::Unary(op), vec![x], s, node)
    }

    pub fn binary(&mut self, op: BinaryOp, a: Slot, b: Slot, node: &str) -> Slot {
        let s = broadcast_shapes(self.shape(a), self.shape(b)).expect("shapes broadcast");
        self.push(Prim::Binary(op), vec![a, b], s, node)
    }

    /// Sum of `g` down to `shape` (the adjoint of broadcasting).
    pub fn sum_to(&mut self, g: Slot, shape: &[usize], node: &str) -> Slot {
        let gs = self.shape(g).to_vec();
        if gs == shape {
            return g;
        }
        let off = gs.len() - shape.len();
        let axes: Vec<usize> = (0..gs.len()).filter(|&i| gs[i] != 1 && (i < off || shape[i - off] == 1)).collect();
        let r = if axes.is_empty() {
            g
        } else {
            let mut rs = gs.clone();
            for &a in &axes {
                rs[a] = 1;
            }
            self.push(Prim::Reduce { op: ReduceOp::Sum, axes }, vec![g], rs, node)
        };
        self.reshape(r, shape.to_vec(), node)
    }
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Row-major strides of `shape`, with 0 where a dimension is broadcast to `out`
/// (`shape` right-aligned against `out`).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let off = out.len() - shape.len();
    let mut st = vec![0; out.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        st[i + off] = if shape[i] == 1 && out[i + off] != 1 { 0 } else { acc };
        acc *= shape[i];
    }
    st
}

pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * shape[i + 1];
    }
    st
}
