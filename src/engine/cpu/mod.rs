//! The native CPU backend: one kernel per primitive (files by primitive family), generic
//! over the float type so the same program runs in f32 (speed) and f64 (finite-difference
//! checks), and an executor that runs a range of a program's instructions over a slot
//! arena, freeing each temporary after its last reader (lifetimes from the schedule).

pub mod elementwise;
pub mod index;
pub mod layout;
pub mod matmul;
pub mod profile;
pub mod reduce;
pub mod rows;
pub mod sgemm;
pub mod window;

use std::collections::HashSet;
use std::sync::Arc;

use super::program::{Instr, Prim, Program, Slot, SlotKind};
use crate::error::{Error, Result};

/// f32 products with at least this many multiply-adds use the packed AVX2/AVX-512 kernel
/// (`sgemm`) when the CPU has it; smaller ones matrixmultiply, whose packing costs less.
const PACKED_GEMM: usize = 1 << 18;

/// The float types the CPU backend computes in.
pub trait Real:
    num_traits::Float + Send + Sync + Default + std::fmt::Debug + std::ops::AddAssign + std::iter::Sum + 'static
{
    fn c(x: f64) -> Self;
    fn to_f64c(self) -> f64;
    fn erf(self) -> Self;
    /// eˣ; in f32 a branch-free polynomial that loops vectorise ([`fast_exp`]).
    fn exp_fast(self) -> Self;
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
    #[inline]
    fn c(x: f64) -> f32 {
        x as f32
    }
    fn to_f64c(self) -> f64 {
        self as f64
    }
    #[inline]
    fn erf(self) -> f32 {
        fast_erf(self)
    }
    #[inline]
    fn exp_fast(self) -> f32 {
        fast_exp(self)
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
        if let Some(tile) = sgemm::Tile::best().filter(|_| csc == 1 && m * n * k >= PACKED_GEMM) {
            sgemm::sgemm(tile, m, k, n, a, rsa, csa, b, rsb, csb, c, rsc)
        } else {
            matrixmultiply::sgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc)
        }
    }
}

/// erf in f32 as a rational function of x on [-4, 4] (erf is ±1 to f32 precision outside),
/// with the coefficients Eigen and XLA use: only multiplies, adds and one division (no
/// `mul_add`, which is a libm call without the FMA target feature), so loops over it
/// vectorise, unlike a libm erff call. Max |error| vs libm's erff < 5e-7, i.e. 4 ulp near ±1 (tested).
#[inline]
pub fn fast_erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_473_9e-2;
    x * p / q
}

/// eˣ in f32, Cephes' expf without branches: x = n·ln 2 + r with n rounded by the 1.5·2²³
/// trick (no `floor`, a libm call on baseline x86-64), a degree-6 polynomial for eʳ and 2ⁿ
/// built in the exponent bits. Below -87 (e⁻⁸⁷ ≈ 1.6e-38, near the smallest normal) the
/// result is 0, so masked softmax logits give exact zeros; above 88 it saturates at e⁸⁸.
/// Max relative error vs libm's expf < 3e-7 on [-86, 88] (tested); between -87 and -86 the
/// results are near-subnormal and lose relative precision, as they must.
#[inline]
pub fn fast_exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4 * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    let bits = (t.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    let y = e * f32::from_bits(bits as u32);
    if underflow {
        0.0
    } else {
        y
    }
}

impl Real for f64 {
    #[inline]
    fn c(x: f64) -> f64 {
        x
    }
    fn to_f64c(self) -> f64 {
        self
    }
    #[inline]
    fn erf(self) -> f64 {
        libm::erf(self)
    }
    #[inline]
    fn exp_fast(self) -> f64 {
        self.exp()
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
/// in `keep` dies after its last reader among `instrs`, run in that (ascending) order, or
/// right away if nothing reads it.
pub fn plan_frees(prog: &Program, instrs: impl IntoIterator<Item = usize>, keep: &HashSet<Slot>) -> Vec<Vec<Slot>> {
    let mut last: Vec<Option<usize>> = vec![None; prog.slots.len()];
    for i in instrs {
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

/// Keeps freed activation buffers in the process heap for reuse (glibc only; once per
/// process). By default glibc serves allocations above its dynamic mmap threshold with
/// fresh mappings and trims freed memory at the heap's top, so every activation of a
/// forward/backward pass (megabytes each) is faulted in page by page and zeroed by the
/// kernel again. Raising the mmap threshold to 32 MiB (glibc's maximum) and the trim
/// threshold lets freed buffers be reused as they are; measured 7-10% of
/// MiniLM's forward + backward (`cargo bench --bench engine`). Buffers above 32 MiB (a
/// CNN's early feature maps over a calibration batch: EfficientNet-lite0's first stage
/// holds 24 × 32 × 112 × 112 floats) would still get fresh mappings, so direct mappings are
/// switched off as well (`M_MMAP_MAX` 0): pl on EfficientNet-lite0 spent almost as much
/// time in the kernel, zeroing pages, as computing (system 184 s, user 228 s; 243 s → 171 s
/// wall without them, the same peak memory, 8.8 GB, and the same output). Trimming is off
/// too (`M_TRIM_THRESHOLD` −1): the f64 Hessian passes over EfficientNet-lite0 free and
/// re-grow more than 1 GiB at the heap's top again and again (its im2col buffers are
/// ~700 MB in f64), and pl there went from 185 s to 145 s wall (system 101 s → 39 s; the
/// same peak memory and output). The cost is that freed memory stays with the process
/// until it exits instead of going back to the system: its peak, for a command-line run.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; it is safe to call at
            // any time, and a rejected value leaves the default in place.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
                libc::mallopt(libc::M_MMAP_MAX, 0);
            }
        });
    }
}

/// Slot storage of one run.
pub struct Arena<T> {
    pub bufs: Vec<Option<Arc<Vec<T>>>>,
}

impl<T: Real> Arena<T> {
    pub fn new(prog: &Program) -> Arena<T> {
        keep_freed_buffers();
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
        let profile = profile::enabled();
        for i in instrs {
            let t0 = profile.then(std::time::Instant::now);
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
            } else if let Some(out) = self.try_inplace(prog, ins, &frees[i]) {
                self.bufs[ins.out] = Some(Arc::new(out));
            } else {
                let out = exec(prog, ins, &self.bufs).map_err(|m| {
                    Error::Other(format!("engine: {} in node '{}' failed: {m}", ins.prim.name(), ins.node))
                })?;
                debug_assert_eq!(out.len(), prog.slots[ins.out].numel(), "{} of node {}", ins.prim.name(), ins.node);
                self.bufs[ins.out] = Some(Arc::new(out));
            }
            if let Some(t0) = t0 {
                profile::record(prog, ins, t0.elapsed());
            }
            for &s in &frees[i] {
                self.bufs[s] = None;
            }
        }
        Ok(())
    }

    /// Unary, UnaryGrad and Binary overwrite an operand that dies at this instruction (one
    /// with the output's shape, read once here, its buffer not shared with another slot or
    /// the caller) instead of allocating a new buffer.
    fn try_inplace(&mut self, prog: &Program, ins: &Instr, dying: &[Slot]) -> Option<Vec<T>> {
        if !matches!(ins.prim, Prim::Unary(_) | Prim::UnaryGrad(_) | Prim::Binary(_)) {
            return None;
        }
        let out_shape = prog.shape(ins.out);
        let k = (0..ins.ins.len()).find(|&k| {
            let s = ins.ins[k];
            dying.contains(&s)
                && ins.ins.iter().filter(|&&t| t == s).count() == 1
                && prog.shape(s) == out_shape
                && self.bufs[s].as_ref().is_some_and(|a| Arc::strong_count(a) == 1 && Arc::weak_count(a) == 0)
        })?;
        let s = ins.ins[k];
        let mut buf = match Arc::try_unwrap(self.bufs[s].take()?) {
            Ok(v) => v,
            Err(shared) => {
                self.bufs[s] = Some(shared);
                return None;
            }
        };
        let other = (ins.ins.len() == 2).then(|| {
            let o = ins.ins[1 - k];
            (self.bufs[o].as_ref().expect("inputs materialised").as_slice(), prog.shape(o))
        });
        elementwise::inplace(&ins.prim, &mut buf, k, other, out_shape);
        Some(buf)
    }
}

/// The length of a shape's last axis (1 for a scalar).
fn last(shape: &[usize]) -> usize {
    shape.last().copied().unwrap_or(1)
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
        Prim::Rows(op) => rows::rows(*op, x(0), last(sh(0))),
        Prim::RowsGrad(op) => rows::rows_grad(*op, x(0), x(1), last(sh(0))),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_erf_matches_libm() {
        let mut worst = 0f32;
        for i in -8000..=8000 {
            let x = i as f32 * 1e-3;
            worst = worst.max((super::fast_erf(x) - libm::erff(x)).abs());
        }
        assert!(worst < 5e-7, "max |fast_erf - erff| = {worst:e}");
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0f32;
        // Where results are normal floats (below -86 they approach the subnormal range,
        // where any f32 exp loses relative precision).
        for i in -86_000..=87_900 {
            let x = i as f32 * 1e-3;
            let e = libm::expf(x);
            worst = worst.max(((super::fast_exp(x) - e) / e).abs());
        }
        assert!(worst < 3e-7, "max relative |fast_exp - expf| = {worst:e}");
        assert_eq!(super::fast_exp(-200.0), 0.0);
        assert_eq!(super::fast_exp(f32::NEG_INFINITY), 0.0);
        assert!(super::fast_exp(f32::NAN).is_nan());
    }
}
