//! Packed f32 GEMM for x86-64 with AVX2 + FMA, in BLIS's structure: B is packed into
//! KC × 16 column panels (shared by the threads), each thread packs its MC × KC block of A
//! into 6-row panels, and a 6 × 16 register tile (12 ymm accumulators, 2 B loads and
//! 6 broadcasts per k) multiplies them. matrixmultiply's 8 × 8 tile needs 9 loads per
//! 8 FMAs and stalls on the load ports; this tile is FMA-bound. Threads split the rows of C
//! in whole blocks (rayon), so each element is summed in the same order whatever the thread
//! count: results do not depend on it.
//!
//! Used for f32 products big enough to amortise the packing when the CPU has AVX2 and FMA
//! (detected at run time); everything else goes to matrixmultiply.

use rayon::prelude::*;

const MR: usize = 6;
const NR: usize = 16;
const KC: usize = 256;
const MC: usize = 96;
const NC: usize = 3072;

/// Whether this CPU runs the kernel (AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[derive(Clone, Copy)]
struct Ptr<T>(T);
// SAFETY: the pointers are only dereferenced inside the bounds the caller guarantees, and
// threads write disjoint row blocks of C.
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}
impl<T: Copy> Ptr<T> {
    // A method, so closures capture the wrapper and not its (non-Send) field.
    fn get(self) -> T {
        self.0
    }
}

thread_local! {
    static PACK_A: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// C = A·B with A m × k (element (i, p) at a[i·rsa + p·csa]), B k × n (b[p·rsb + j·csb]) and
/// C m × n row-major with row stride rsc (overwritten).
///
/// # Safety
/// The strides must describe matrices inside the allocations behind the pointers, C must not
/// overlap A or B, and `available()` must be true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
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
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            std::ptr::write_bytes(c.offset(i as isize * rsc), 0, n);
        }
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // At least one row block per thread.
    let mc = MC.min((m.div_ceil(threads)).div_ceil(MR) * MR).max(MR);
    let blocks = m.div_ceil(mc);
    let (ap, bp, cp) = (Ptr(a), Ptr(b), Ptr(c));
    let mut packed_b: Vec<f32> = Vec::new();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let panels = nc.div_ceil(NR);
        // Equal depth blocks (k = 384: 192 + 192, not 256 + 128).
        let kblock = k.div_ceil(k.div_ceil(KC));
        for pc in (0..k).step_by(kblock) {
            let kc = kblock.min(k - pc);
            packed_b.resize(panels * kc * NR, 0.0);
            packed_b.par_chunks_mut(kc * NR).enumerate().for_each(|(j, panel)| {
                let j0 = jc + j * NR;
                let cols = NR.min(jc + nc - j0);
                // SAFETY: rows pc..pc+kc and columns j0..j0+cols lie inside B.
                unsafe { pack::<NR>(panel, bp.get(), csb, rsb, j0, cols, pc, kc) };
            });
            let pb = Ptr(packed_b.as_ptr());
            let accumulate = pc > 0;
            let run = |blk: usize| {
                let ic = blk * mc;
                let mcb = mc.min(m - ic);
                PACK_A.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    let apanels = mcb.div_ceil(MR);
                    buf.resize(apanels * kc * MR, 0.0);
                    for (i, panel) in buf.chunks_mut(kc * MR).enumerate() {
                        let i0 = ic + i * MR;
                        // SAFETY: rows i0..i0+rows and columns pc..pc+kc lie inside A.
                        unsafe { pack::<MR>(panel, ap.get(), rsa, csa, i0, MR.min(ic + mcb - i0), pc, kc) };
                    }
                    for j in 0..panels {
                        let j0 = jc + j * NR;
                        let cols = NR.min(jc + nc - j0);
                        for i in 0..apanels {
                            let i0 = ic + i * MR;
                            let rows = MR.min(ic + mcb - i0);
                            // SAFETY: the panels hold kc·MR and kc·NR values; the C tile
                            // (rows × cols at (i0, j0)) is inside C and in this thread's block.
                            unsafe {
                                kernel(
                                    kc,
                                    buf.as_ptr().add(i * kc * MR),
                                    pb.get().add(j * kc * NR),
                                    cp.get().offset(i0 as isize * rsc + j0 as isize),
                                    rsc,
                                    rows,
                                    cols,
                                    accumulate,
                                )
                            };
                        }
                    }
                });
            };
            if blocks > 1 {
                (0..blocks).into_par_iter().for_each(run);
            } else {
                run(0);
            }
        }
    }
}

/// Packs `lines` lines (rows of A, or columns of B) starting at line `l0`, over depth
/// `d0..d0 + kc`, into a panel of `W` lines per depth step (zero-padded up to `W`). Element
/// (line l, depth d) is at src[l·ls + d·ds].
#[allow(clippy::too_many_arguments)]
unsafe fn pack<const W: usize>(
    panel: &mut [f32],
    src: *const f32,
    ls: isize,
    ds: isize,
    l0: usize,
    lines: usize,
    d0: usize,
    kc: usize,
) {
    if lines < W {
        panel.fill(0.0);
    }
    if ls == 1 {
        for d in 0..kc {
            let s = src.offset(l0 as isize + (d0 + d) as isize * ds);
            panel[d * W..d * W + lines].copy_from_slice(std::slice::from_raw_parts(s, lines));
        }
    } else {
        for l in 0..lines {
            let s = src.offset((l0 + l) as isize * ls + d0 as isize * ds);
            for d in 0..kc {
                panel[d * W + l] = *s.offset(d as isize * ds);
            }
        }
    }
}

/// C tile (rows × cols at c, row stride rsc) = (accumulate ? C : 0) + Σ_p a[p]ᵀ b[p] over the
/// packed panels a (kc × 6) and b (kc × 16).
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: isize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        kernel_avx2(kc, a, b, c, rsc, rows, cols, accumulate)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kc, a, b, c, rsc, rows, cols, accumulate);
        unreachable!("sgemm::available() is false off x86-64")
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: isize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    // The C tile is read (or written) after the loop: start fetching it now.
    for r in 0..rows {
        let p = c.offset(r as isize * rsc) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(p);
        _mm_prefetch::<_MM_HINT_T0>(p.add(60));
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    // A macro, not a closure, so the step is straight-line code at any opt-level.
    macro_rules! step {
        ($a:expr, $b:expr) => {{
            let b0 = _mm256_loadu_ps($b);
            let b1 = _mm256_loadu_ps($b.add(8));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*$a.add(r));
                row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                row[1] = _mm256_fmadd_ps(x, b1, row[1]);
            }
        }};
    }
    for _ in 0..kc / 2 {
        step!(a, b);
        step!(a.add(MR), b.add(NR));
        a = a.add(2 * MR);
        b = b.add(2 * NR);
    }
    if kc % 2 == 1 {
        step!(a, b);
    }
    if rows == MR && cols == NR {
        for (r, row) in acc.iter().enumerate() {
            let p = c.offset(r as isize * rsc);
            let (mut v0, mut v1) = (row[0], row[1]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
            }
            _mm256_storeu_ps(p, v0);
            _mm256_storeu_ps(p.add(8), v1);
        }
    } else {
        let mut tile = [0f32; MR * NR];
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR), row[0]);
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR + 8), row[1]);
        }
        for r in 0..rows {
            let p = c.offset(r as isize * rsc);
            for j in 0..cols {
                let v = tile[r * NR + j];
                *p.add(j) = if accumulate { *p.add(j) + v } else { v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += x as f64 * y as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    /// Every transpose combination, on sizes that are not multiples of the tile or block
    /// sizes (and ones spanning several KC and MC blocks), against an f64 reference.
    #[test]
    fn matches_a_naive_product_on_ragged_shapes() {
        if !available() {
            eprintln!("no AVX2/FMA: the packed kernel is not used on this CPU");
            return;
        }
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, k, n) in &[(1, 1, 1), (7, 5, 17), (13, 300, 33), (200, 517, 45), (6, 16, 16), (97, 1, 250)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
                let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
                let mut c = vec![f32::NAN; m * n];
                unsafe { sgemm(m, k, n, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, c.as_mut_ptr(), n as isize) };
                let want = naive(m, k, n, &a, ta, &b, tb);
                for (i, (x, y)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (*x as f64 - y).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6,
                        "{m}x{k}x{n} ta={ta} tb={tb}: element {i}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// A row stride wider than n leaves the gaps alone.
    #[test]
    fn writes_only_the_product_into_a_strided_c() {
        if !available() {
            return;
        }
        let (m, k, n, ld) = (9, 4, 20, 23);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.25).collect();
        let b: Vec<f32> = (0..k * n).map(|i| 1.0 - i as f32 * 0.125).collect();
        let mut c = vec![-7.0f32; m * ld];
        unsafe { sgemm(m, k, n, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, c.as_mut_ptr(), ld as isize) };
        let want = naive(m, k, n, &a, false, &b, false);
        for i in 0..m {
            for j in 0..ld {
                let x = c[i * ld + j] as f64;
                if j < n {
                    assert!((x - want[i * n + j]).abs() < 1e-4, "({i}, {j}): {x} vs {}", want[i * n + j]);
                } else {
                    assert_eq!(x, -7.0, "({i}, {j}) is outside the product");
                }
            }
        }
    }
}
