//! Packed f32 GEMM for x86-64, in BLIS's structure: B is packed into KC × NR column panels
//! (shared by the threads), each thread packs its MC × KC block of A into MR-row panels,
//! and an MR × NR register tile multiplies them. Two tiles, chosen at run time:
//! - AVX-512F: 12 × 32 (24 zmm accumulators, 2 B loads and 12 broadcasts per k). On CPUs
//!   with full-width 512-bit FMA units (AMD Zen 5, Intel server cores) it does twice the
//!   work per instruction of the AVX2 tile.
//! - AVX2 + FMA: 6 × 16 (12 ymm accumulators, 2 B loads and 6 broadcasts per k).
//!   matrixmultiply's 8 × 8 tile needs 9 loads per 8 FMAs and stalls on the load ports;
//!   this tile is FMA-bound.
//!
//! Both sum every element of C in the same order (one FMA per depth step, depth blocks of
//! the same size, block results added to C in order), so they give the same bits, and
//! threads split the rows of C in whole blocks (rayon), so results depend neither on the
//! thread count nor on which tile the CPU runs.
//!
//! Used for f32 products big enough to amortise the packing when the CPU has AVX2 and FMA
//! (detected at run time); everything else goes to matrixmultiply.

use rayon::prelude::*;

const KC: usize = 256;
const MC: usize = 96;
const NC: usize = 3072;

/// A register tile of the packed GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// 6 × 16, AVX2 + FMA.
    Avx2,
    /// 12 × 32, AVX-512F.
    Avx512,
}

impl Tile {
    /// Whether this CPU can run the tile.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static AVX2: OnceLock<bool> = OnceLock::new();
            static AVX512: OnceLock<bool> = OnceLock::new();
            let avx2 = *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
            match self {
                Tile::Avx2 => avx2,
                Tile::Avx512 => avx2 && *AVX512.get_or_init(|| is_x86_feature_detected!("avx512f")),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// The widest tile this CPU runs, if any. `PLPRUNE_GEMM_TILE=avx2` keeps the AVX2 tile
    /// on an AVX-512 CPU (to compare the two).
    pub fn best() -> Option<Tile> {
        use std::sync::OnceLock;
        static BEST: OnceLock<Option<Tile>> = OnceLock::new();
        *BEST.get_or_init(|| {
            let narrow = std::env::var("PLPRUNE_GEMM_TILE").is_ok_and(|v| v.eq_ignore_ascii_case("avx2"));
            [Tile::Avx512, Tile::Avx2].into_iter().find(|t| t.supported() && !(narrow && *t == Tile::Avx512))
        })
    }
}

/// Whether this CPU runs the packed GEMM (AVX2 and FMA).
pub fn available() -> bool {
    Tile::Avx2.supported()
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
/// C m × n row-major with row stride rsc (overwritten), on `tile` (`Tile::best()` in use).
///
/// # Safety
/// The strides must describe matrices inside the allocations behind the pointers, C must not
/// overlap A or B, and `tile.supported()` must be true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    tile: Tile,
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
    #[cfg(target_arch = "x86_64")]
    match tile {
        Tile::Avx2 => drive::<6, 16>(kernel_avx2, m, k, n, a, rsa, csa, b, rsb, csb, c, rsc),
        Tile::Avx512 => drive::<12, 32>(kernel_avx512, m, k, n, a, rsa, csa, b, rsb, csb, c, rsc),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (tile, m, k, n, a, rsa, csa, b, rsb, csb, c, rsc);
        unreachable!("sgemm::available() is false off x86-64")
    }
}

/// An MR × NR tile kernel: C tile (rows × cols at c, row stride rsc) = (accumulate ? C : 0)
/// + Σ_p a[p]ᵀ b[p] over the packed panels a (kc × MR) and b (kc × NR).
type Kernel = unsafe fn(usize, *const f32, *const f32, *mut f32, isize, usize, usize, bool);

#[allow(clippy::too_many_arguments)]
unsafe fn drive<const MR: usize, const NR: usize>(
    kernel: Kernel,
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

/// One depth step of a tile: two `$w`-lane vectors of B, and per row of A one broadcast and
/// two FMAs into that row's accumulators.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_step {
    ($acc:ident, $a:expr, $b:expr, $w:expr, $load:ident, $set1:ident, $fma:ident) => {{
        let b0 = $load($b);
        let b1 = $load($b.add($w));
        for (r, row) in $acc.iter_mut().enumerate() {
            let x = $set1(*$a.add(r));
            row[0] = $fma(x, b0, row[0]);
            row[1] = $fma(x, b1, row[1]);
        }
    }};
}

/// The part both tiles share, on `$w`-lane vectors: prefetch the C tile (read or written
/// after the loop), then the sums Σ_p a[p]ᵀ b[p] over the packed panels, one FMA per element
/// per depth step, two steps a pass. Evaluates to the `$mr` × 2 accumulators. A macro, not
/// a function, so each kernel compiles it with its own target features, as straight-line
/// code at any opt-level.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_sums {
    ($kc:expr, $a:expr, $b:expr, $c:expr, $rsc:expr, $rows:expr, $mr:expr, $w:expr,
     $zero:ident, $load:ident, $set1:ident, $fma:ident) => {{
        for r in 0..$rows {
            let p = $c.offset(r as isize * $rsc) as *const i8;
            // 2·$w floats a row: every cache line it touches when unaligned.
            let mut off = 0;
            while off < 8 * $w {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off));
                off += 64;
            }
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(8 * $w - 4));
        }
        let mut acc = [[$zero(); 2]; $mr];
        let (mut a, mut b) = ($a, $b);
        for _ in 0..$kc / 2 {
            tile_step!(acc, a, b, $w, $load, $set1, $fma);
            tile_step!(acc, a.add($mr), b.add(2 * $w), $w, $load, $set1, $fma);
            a = a.add(2 * $mr);
            b = b.add(4 * $w);
        }
        if $kc % 2 == 1 {
            tile_step!(acc, a, b, $w, $load, $set1, $fma);
        }
        acc
    }};
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
    const MR: usize = 6;
    const NR: usize = 16;
    let acc =
        tile_sums!(kc, a, b, c, rsc, rows, MR, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps);
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

/// The 12 × 32 AVX-512 tile: the same sums in the same order as [`kernel_avx2`] (one FMA
/// per depth step per element, C added after the loop), four times the elements per pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512(
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
    const MR: usize = 12;
    let acc =
        tile_sums!(kc, a, b, c, rsc, rows, MR, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps);
    // Column masks of the two halves (all ones for a full tile).
    let lanes = |from: usize| -> __mmask16 {
        let n = cols.saturating_sub(from).min(16);
        if n == 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    };
    let (k0, k1) = (lanes(0), lanes(16));
    for (r, row) in acc.iter().enumerate().take(rows) {
        let p = c.offset(r as isize * rsc);
        let (mut v0, mut v1) = (row[0], row[1]);
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, p));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, p.wrapping_add(16)));
        }
        _mm512_mask_storeu_ps(p, k0, v0);
        _mm512_mask_storeu_ps(p.wrapping_add(16), k1, v1);
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

    fn rnd_fn(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    /// The tiles this CPU runs (none off x86-64 or without AVX2 + FMA, where the packed
    /// GEMM is not used).
    fn tiles() -> Vec<Tile> {
        let t: Vec<Tile> = [Tile::Avx2, Tile::Avx512].into_iter().filter(|t| t.supported()).collect();
        if t.len() < 2 {
            eprintln!("tiles this CPU runs: {t:?} (the others are not tested here)");
        }
        t
    }

    /// A·B on `tile` for row-major A (m × k) and B (k × n), into a C of row stride `ld`
    /// filled with `fill` first.
    #[allow(clippy::too_many_arguments)]
    fn row_major(tile: Tile, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], ld: usize, fill: f32) -> Vec<f32> {
        let mut c = vec![fill; m * ld];
        // SAFETY: the strides describe a, b and c, and the caller checked tile.supported().
        unsafe {
            sgemm(tile, m, k, n, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, c.as_mut_ptr(), ld as isize)
        };
        c
    }

    const SHAPES: [(usize, usize, usize); 8] =
        [(1, 1, 1), (7, 5, 17), (13, 300, 33), (200, 517, 45), (6, 16, 16), (12, 32, 32), (97, 1, 250), (30, 40, 70)];

    /// Every transpose combination, on sizes that are not multiples of the tile or block
    /// sizes (and ones spanning several KC and MC blocks), against an f64 reference, on
    /// every tile the CPU runs.
    #[test]
    fn matches_a_naive_product_on_ragged_shapes() {
        let mut rnd = rnd_fn(7);
        for tile in tiles() {
            for &(m, k, n) in &SHAPES {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
                    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
                    let mut c = vec![f32::NAN; m * n];
                    unsafe {
                        sgemm(tile, m, k, n, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, c.as_mut_ptr(), n as isize)
                    };
                    let want = naive(m, k, n, &a, ta, &b, tb);
                    for (i, (x, y)) in c.iter().zip(&want).enumerate() {
                        assert!(
                            (*x as f64 - y).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6,
                            "{tile:?} {m}x{k}x{n} ta={ta} tb={tb}: element {i}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX-512 tile sums in the AVX2 tile's order: the same bits, so results do not
    /// depend on which CPU ran them (shapes spanning several depth blocks included).
    #[test]
    fn the_tiles_give_the_same_bits() {
        if !Tile::Avx512.supported() {
            eprintln!("no AVX-512F: only the AVX2 tile runs on this CPU");
            return;
        }
        let mut rnd = rnd_fn(11);
        for &(m, k, n) in SHAPES.iter().chain(&[(131, 700, 97), (2048 / 8, 1536, 384 / 4)]) {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let (x, y) = (
                row_major(Tile::Avx2, m, k, n, &a, &b, n, f32::NAN),
                row_major(Tile::Avx512, m, k, n, &a, &b, n, f32::NAN),
            );
            for (i, (x, y)) in x.iter().zip(&y).enumerate() {
                assert_eq!(x.to_bits(), y.to_bits(), "{m}x{k}x{n}: element {i}: {x} vs {y}");
            }
        }
    }

    /// A row stride wider than n leaves the gaps alone, also when C is accumulated over
    /// several depth blocks.
    #[test]
    fn writes_only_the_product_into_a_strided_c() {
        for tile in tiles() {
            for (m, k, n, ld) in [(9, 4, 20, 23), (13, 600, 37, 41)] {
                let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.25).collect();
                let b: Vec<f32> = (0..k * n).map(|i| 1.0 - (i % 17) as f32 * 0.125).collect();
                let c = row_major(tile, m, k, n, &a, &b, ld, -7.0);
                let want = naive(m, k, n, &a, false, &b, false);
                for i in 0..m {
                    for j in 0..ld {
                        let x = c[i * ld + j] as f64;
                        if j < n {
                            let w = want[i * n + j];
                            assert!((x - w).abs() < 1e-4 * w.abs().max(1.0), "{tile:?} ({i}, {j}): {x} vs {w}");
                        } else {
                            assert_eq!(x, -7.0, "{tile:?} ({i}, {j}) is outside the product");
                        }
                    }
                }
            }
        }
    }
}
