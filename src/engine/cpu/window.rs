//! CPU kernels of the window primitives: im2col (a convolution's input unfolded to columns
//! [C·kh·kw, N, OH·OW], so the convolution is a matmul), col2im (its adjoint, overlapping
//! windows accumulate), and 2-D max/average pooling with its gradient. Padded positions
//! read as 0 in im2col and are skipped by pooling.

use rayon::prelude::*;

use super::Real;
use crate::engine::program::{PoolKind, Window};

/// Input coordinate of output position `o` and kernel tap `k` on axis `ax`, if inside.
#[inline]
fn coord(w: &Window, ax: usize, o: usize, k: usize) -> Option<usize> {
    let i = (o * w.stride[ax] + k * w.dilation[ax]) as isize - w.pad[ax] as isize;
    if i >= 0 && (i as usize) < w.input[2 + ax] {
        Some(i as usize)
    } else {
        None
    }
}

/// The output positions `lo..hi` on axis `ax` whose input coordinate for kernel tap `k`
/// is inside the input (a contiguous run; empty when none is), and that coordinate at `lo`.
fn valid_run(w: &Window, ax: usize, k: usize) -> (usize, usize, usize) {
    let (s, off) = (w.stride[ax] as isize, (k * w.dilation[ax]) as isize - w.pad[ax] as isize);
    let (len, out) = (w.input[2 + ax] as isize, w.output[ax] as isize);
    // o·s + off ∈ [0, len)  ⇔  o ∈ [⌈−off / s⌉, ⌊(len − 1 − off) / s⌋].
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let hi = if len - 1 - off < 0 { 0 } else { ((len - 1 - off) / s + 1).min(out) };
    let lo = lo.min(hi);
    (lo as usize, hi as usize, (lo * s + off).max(0) as usize)
}

pub fn im2col<T: Real>(x: &[T], w: &Window) -> Vec<T> {
    let [n, c, h, wd] = w.input;
    let [kh, kw] = w.kernel;
    let [oh, ow] = w.output;
    let l = oh * ow;
    let total = c * kh * kw * n * l;
    if total == 0 {
        return Vec::new();
    }
    // Every element is written below (padding as 0), so the buffer is not zeroed first.
    let mut out: Vec<T> = Vec::with_capacity(total);
    let sx = w.stride[1];
    out.spare_capacity_mut()[..total].par_chunks_mut(n * l).enumerate().for_each(|(row, dst)| {
        let ch = row / (kh * kw);
        let ki = (row / kw) % kh;
        let kj = row % kw;
        let (x0, x1, ix0) = valid_run(w, 1, kj);
        for b in 0..n {
            let src = &x[(b * c + ch) * h * wd..(b * c + ch + 1) * h * wd];
            for y in 0..oh {
                let d = &mut dst[b * l + y * ow..b * l + (y + 1) * ow];
                let iy = coord(w, 0, y, ki).filter(|_| x0 < x1);
                let Some(iy) = iy else {
                    d.iter_mut().for_each(|o| {
                        o.write(T::zero());
                    });
                    continue;
                };
                let (head, rest) = d.split_at_mut(x0);
                let (mid, tail) = rest.split_at_mut(x1 - x0);
                head.iter_mut().chain(tail).for_each(|o| {
                    o.write(T::zero());
                });
                let line = &src[iy * wd + ix0..];
                if sx == 1 {
                    mid.iter_mut().zip(line).for_each(|(o, &v)| {
                        o.write(v);
                    });
                } else {
                    mid.iter_mut().zip(line.iter().step_by(sx)).for_each(|(o, &v)| {
                        o.write(v);
                    });
                }
            }
        }
    });
    // SAFETY: every one of the `total` elements was written above (each row chunk covers
    // all n × OH × OW positions: in-range ones copied, the others zeroed).
    unsafe { out.set_len(total) };
    out
}

pub fn col2im<T: Real>(cols: &[T], w: &Window) -> Vec<T> {
    let [n, c, h, wd] = w.input;
    let [kh, kw] = w.kernel;
    let [oh, ow] = w.output;
    let l = oh * ow;
    let mut out = vec![T::zero(); n * c * h * wd];
    if out.is_empty() {
        return out;
    }
    let sx = w.stride[1];
    // One task per (image, channel) plane of the output; each element accumulates its
    // taps in kernel order (ki, kj), whatever the thread count.
    out.par_chunks_mut(h * wd).enumerate().for_each(|(plane, dst)| {
        let (b, ch) = (plane / c, plane % c);
        for ki in 0..kh {
            for kj in 0..kw {
                let row = (ch * kh + ki) * kw + kj;
                let src = &cols[row * n * l + b * l..row * n * l + (b + 1) * l];
                let (x0, x1, ix0) = valid_run(w, 1, kj);
                if x0 == x1 {
                    continue;
                }
                for y in 0..oh {
                    let Some(iy) = coord(w, 0, y, ki) else { continue };
                    let line = &mut dst[iy * wd + ix0..];
                    let from = &src[y * ow + x0..y * ow + x1];
                    if sx == 1 {
                        line.iter_mut().zip(from).for_each(|(o, &v)| *o += v);
                    } else {
                        line.iter_mut().step_by(sx).zip(from).for_each(|(o, &v)| *o += v);
                    }
                }
            }
        }
    });
    out
}

/// For each output position of plane `p`: the in-range input offsets of its window.
fn for_windows(w: &Window, mut f: impl FnMut(usize, &mut dyn Iterator<Item = usize>, usize)) {
    let [_, _, _, wd] = w.input;
    let [kh, kw] = w.kernel;
    let [oh, ow] = w.output;
    for y in 0..oh {
        for xo in 0..ow {
            let mut it = (0..kh).flat_map(move |ki| (0..kw).map(move |kj| (ki, kj))).filter_map(|(ki, kj)| {
                let iy = coord(w, 0, y, ki)?;
                let ix = coord(w, 1, xo, kj)?;
                Some(iy * wd + ix)
            });
            f(y * ow + xo, &mut it, kh * kw);
        }
    }
}

pub fn pool<T: Real>(kind: PoolKind, x: &[T], w: &Window) -> Vec<T> {
    let [n, c, h, wd] = w.input;
    let [oh, ow] = w.output;
    let mut out = vec![T::zero(); n * c * oh * ow];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, dst)| {
        let src = &x[plane * h * wd..(plane + 1) * h * wd];
        for_windows(w, |o, it, full| {
            dst[o] = match kind {
                PoolKind::Max => it.fold(T::neg_infinity(), |m, i| m.max(src[i])),
                PoolKind::Avg { count_pad } => {
                    let (s, cnt) = it.fold((T::zero(), 0usize), |(s, k), i| (s + src[i], k + 1));
                    s / T::c(if count_pad { full } else { cnt.max(1) } as f64)
                }
            };
        });
    });
    out
}

pub fn pool_grad<T: Real>(kind: PoolKind, x: &[T], dy: &[T], w: &Window) -> Vec<T> {
    let [n, c, h, wd] = w.input;
    let [oh, ow] = w.output;
    let mut out = vec![T::zero(); n * c * h * wd];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(h * wd).enumerate().for_each(|(plane, dst)| {
        let src = &x[plane * h * wd..(plane + 1) * h * wd];
        let g = &dy[plane * oh * ow..(plane + 1) * oh * ow];
        for_windows(w, |o, it, full| match kind {
            PoolKind::Max => {
                let mut best: Option<usize> = None;
                for i in it {
                    if best.is_none_or(|b| src[i] > src[b]) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    dst[b] += g[o];
                }
            }
            PoolKind::Avg { count_pad } => {
                let idx: Vec<usize> = it.collect();
                let d = T::c(if count_pad { full } else { idx.len().max(1) } as f64);
                for i in idx {
                    dst[i] += g[o] / d;
                }
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// im2col and col2im as first written (every position through `coord`): the fast
    /// versions must equal them bit for bit.
    fn naive_im2col(x: &[f64], w: &Window) -> Vec<f64> {
        let [n, c, h, wd] = w.input;
        let [kh, kw] = w.kernel;
        let [oh, ow] = w.output;
        let l = oh * ow;
        let mut out = vec![0.0; c * kh * kw * n * l];
        for row in 0..c * kh * kw {
            let (ch, ki, kj) = (row / (kh * kw), (row / kw) % kh, row % kw);
            for b in 0..n {
                for y in 0..oh {
                    for xo in 0..ow {
                        if let (Some(iy), Some(ix)) = (coord(w, 0, y, ki), coord(w, 1, xo, kj)) {
                            out[row * n * l + b * l + y * ow + xo] = x[((b * c + ch) * h + iy) * wd + ix];
                        }
                    }
                }
            }
        }
        out
    }

    fn naive_col2im(cols: &[f64], w: &Window) -> Vec<f64> {
        let [n, c, h, wd] = w.input;
        let [kh, kw] = w.kernel;
        let [oh, ow] = w.output;
        let l = oh * ow;
        let mut out = vec![0.0; n * c * h * wd];
        for ch in 0..c {
            for ki in 0..kh {
                for kj in 0..kw {
                    let row = (ch * kh + ki) * kw + kj;
                    for b in 0..n {
                        for y in 0..oh {
                            for xo in 0..ow {
                                if let (Some(iy), Some(ix)) = (coord(w, 0, y, ki), coord(w, 1, xo, kj)) {
                                    out[((b * c + ch) * h + iy) * wd + ix] += cols[row * n * l + b * l + y * ow + xo];
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn im2col_and_col2im_equal_the_naive_loops_bit_for_bit() {
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        let mut cases = 0;
        for (kh, kw) in [(1, 1), (3, 3), (5, 5), (2, 3)] {
            for stride in [1, 2, 3] {
                for dil in [1, 2] {
                    for pad in [0, 1, 2, 4] {
                        let (n, c, h, wd) = (2, 3, 7, 9);
                        let span = |k: usize, len: usize| (len + 2 * pad).checked_sub(dil * (k - 1) + 1);
                        let (Some(sh), Some(sw)) = (span(kh, h), span(kw, wd)) else { continue };
                        // Less padding at the end than at the start: one output fewer.
                        let shrink = usize::from(pad > 0 && sw / stride > 0);
                        let w = Window {
                            kernel: [kh, kw],
                            stride: [stride, stride],
                            dilation: [dil, dil],
                            pad: [pad, pad],
                            input: [n, c, h, wd],
                            output: [sh / stride + 1, sw / stride + 1 - shrink],
                        };
                        let x: Vec<f64> = (0..n * c * h * wd).map(|_| rnd()).collect();
                        let cols = im2col(&x, &w);
                        assert_eq!(cols, naive_im2col(&x, &w), "im2col {w:?}");
                        let g: Vec<f64> = (0..cols.len()).map(|_| rnd()).collect();
                        assert_eq!(col2im(&g, &w), naive_col2im(&g, &w), "col2im {w:?}");
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 60, "{cases} windows");
    }
}
