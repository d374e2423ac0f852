//! The native CPU backend: one kernel per primitive (files by primitive family), generic
//! over the float type so the same program runs in f32 (speed) and f64 (finite-difference
//! checks), and an executor that runs a range of a program's instructions over a slot
//! arena, freeing each temporary after its last reader (lifetimes from the schedule).

pub mod elementwise;
pub mod index;
pub mod layout;
pub mod matmul;
pub mod reduce;
pub mod window;

use std::collections::HashSet;
use std::sync::Arc;

use super::program::{Instr, Prim, Program, Slot, SlotKind};
use crate::error::{Error, Result};

/// The float types the CPU backend computes in.
pub trait Real:
    num_traits::Float + Send + Sync + Default + std::fmt::Debug + std::ops::AddAssign + std::iter::Sum + 'static
{
    fn c(x: f64) -> Self;
    fn to_f64c(self) -> f64;
    fn erf(self) -> Self;
    fn from_bool(b: bool) -> Self {
        if b {
            Self::one()
        } else {
            Self::zero()
        }
    }
    /// C = A·B for strided row-major views (C overwritten).
    ///
    /// # Safety
    /// The pointers and strides must describe matrices inside live allocations.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Real for f32 {
    fn c(x: f64) -> f32 {
        x as f32
    }
    fn to_f64c(self) -> f64 {
        self as f64
    }
    fn erf(self) -> f32 {
        libm::erff(self)
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc)
    }
}

impl Real for f64 {
    fn c(x: f64) -> f64 {
        x
    }
    fn to_f64c(self) -> f64 {
        self
    }
    fn erf(self) -> f64 {
        libm::erf(self)
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc)
    }
}

/// For each instruction index, the temporaries to free after it runs: every temporary not
/// in `keep` dies after its last reader among `instrs` (or right away if nothing reads it).
pub fn plan_frees(prog: &Program, instrs: std::ops::Range<usize>, keep: &HashSet<Slot>) -> Vec<Vec<Slot>> {
    let mut last: Vec<Option<usize>> = vec![None; prog.slots.len()];
    for i in instrs.clone() {
        let ins = &prog.instrs[i];
        last[ins.out] = last[ins.out].max(Some(i));
        for &s in &ins.ins {
            last[s] = Some(i);
        }
    }
    let mut frees = vec![Vec::new(); prog.instrs.len()];
    for (s, l) in last.iter().enumerate() {
        if let Some(i) = l {
            if prog.slots[s].kind == SlotKind::Temp && !keep.contains(&s) {
                frees[*i].push(s);
            }
        }
    }
    frees
}

/// Slot storage of one run.
pub struct Arena<T> {
    pub bufs: Vec<Option<Arc<Vec<T>>>>,
}

impl<T: Real> Arena<T> {
    pub fn new(prog: &Program) -> Arena<T> {
        Arena { bufs: vec![None; prog.slots.len()] }
    }

    pub fn get(&self, s: Slot) -> Option<&[T]> {
        self.bufs.get(s).and_then(|b| b.as_ref().map(|v| v.as_slice()))
    }

    pub fn set(&mut self, s: Slot, v: Vec<T>) {
        self.set_shared(s, Arc::new(v));
    }

    /// Stores a buffer shared with the caller (weights are not copied per run).
    pub fn set_shared(&mut self, s: Slot, v: Arc<Vec<T>>) {
        if self.bufs.len() <= s {
            self.bufs.resize(s + 1, None);
        }
        self.bufs[s] = Some(v);
    }

    /// Runs `instrs` in order, materialising constants on first use and freeing per `frees`.
    pub fn run(&mut self, prog: &Program, instrs: std::ops::Range<usize>, frees: &[Vec<Slot>]) -> Result<()> {
        if self.bufs.len() < prog.slots.len() {
            self.bufs.resize(prog.slots.len(), None);
        }
        for i in instrs {
            let ins = &prog.instrs[i];
            for &s in &ins.ins {
                if self.bufs[s].is_none() {
                    match &prog.slots[s].kind {
                        SlotKind::Const(d) => self.bufs[s] = Some(Arc::new(d.iter().map(|&x| T::c(x)).collect())),
                        k => {
                            return Err(Error::Other(format!(
                                "engine: slot {s} ({k:?} '{}') read by {} of node '{}' has no value",
                                prog.slots[s].name,
                                ins.prim.name(),
                                ins.node
                            )))
                        }
                    }
                }
            }
            if ins.prim == Prim::Copy {
                // A reshape shares the buffer.
                self.bufs[ins.out] = self.bufs[ins.ins[0]].clone();
            } else {
                let out = exec(prog, ins, &self.bufs).map_err(|m| {
                    Error::Other(format!("engine: {} in node '{}' failed: {m}", ins.prim.name(), ins.node))
                })?;
                debug_assert_eq!(out.len(), prog.slots[ins.out].numel(), "{} of node {}", ins.prim.name(), ins.node);
                self.bufs[ins.out] = Some(Arc::new(out));
            }
            for &s in &frees[i] {
                self.bufs[s] = None;
            }
        }
        Ok(())
    }
}

/// Runs one instruction on the CPU.
pub fn exec<T: Real>(prog: &Program, ins: &Instr, bufs: &[Option<Arc<Vec<T>>>]) -> std::result::Result<Vec<T>, String> {
    let x = |k: usize| -> &[T] { bufs[ins.ins[k]].as_ref().expect("inputs materialised").as_slice() };
    let sh = |k: usize| -> &[usize] { prog.shape(ins.ins[k]) };
    let out_shape = prog.shape(ins.out);
    Ok(match &ins.prim {
        Prim::Unary(op) => elementwise::unary(*op, x(0)),
        Prim::UnaryGrad(op) => elementwise::unary_grad(*op, x(0), x(1)),
        Prim::Binary(op) => elementwise::binary(*op, x(0), sh(0), x(1), sh(1), out_shape),
        Prim::Where => elementwise::where_((x(0), sh(0)), (x(1), sh(1)), (x(2), sh(2)), out_shape),
        Prim::Reduce { op, axes } => reduce::reduce(*op, x(0), sh(0), axes),
        Prim::Broadcast => elementwise::broadcast(x(0), sh(0), out_shape),
        Prim::MatMul { ta, tb } => matmul::matmul(x(0), sh(0), x(1), sh(1), *ta, *tb, out_shape),
        Prim::Copy => x(0).to_vec(),
        Prim::Transpose { perm } => layout::transpose(x(0), sh(0), perm),
        Prim::Slice { starts, steps } => layout::slice(x(0), sh(0), starts, steps, out_shape),
        Prim::Embed { starts, steps, fill } => layout::embed(x(0), sh(0), starts, steps, T::c(*fill as f64), out_shape),
        Prim::Concat { axis } => {
            let parts: Vec<(&[T], &[usize])> = (0..ins.ins.len()).map(|k| (x(k), sh(k))).collect();
            layout::concat(&parts, *axis, out_shape)
        }
        Prim::Gather { axis } => index::gather(x(0), sh(0), x(1), *axis)?,
        Prim::GatherGrad { axis } => index::gather_grad(x(0), x(1), out_shape, *axis)?,
        Prim::GatherElements { axis } => index::gather_elements(x(0), sh(0), x(1), sh(1), *axis)?,
        Prim::ScatterElements { axis, add } => index::scatter_elements(x(0), sh(0), x(1), sh(1), x(2), *axis, *add)?,
        Prim::ArgMax { axis, select_last, min } => index::argmax(x(0), sh(0), *axis, *select_last, *min),
        Prim::TopKIndices { axis, k, largest } => index::topk_indices(x(0), sh(0), *axis, *k, *largest),
        Prim::Im2Col(w) => window::im2col(x(0), w),
        Prim::Col2Im(w) => window::col2im(x(0), w),
        Prim::Pool(kind, w) => window::pool(*kind, x(0), w),
        Prim::PoolGrad(kind, w) => window::pool_grad(*kind, x(0), x(1), w),
    })
}
