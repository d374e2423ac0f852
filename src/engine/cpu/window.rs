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

pub fn im2col<T: Real>(x: &[T], w: &Window) -> Vec<T> {
    let [n, c, h, wd] = w.input;
    let [kh, kw] = w.kernel;
    let [oh, ow] = w.output;
    let l = oh * ow;
    let mut out = vec![T::zero(); c * kh * kw * n * l];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(n * l).enumerate().for_each(|(row, dst)| {
        let ch = row / (kh * kw);
        let ki = (row / kw) % kh;
        let kj = row % kw;
        for b in 0..n {
            let src = &x[(b * c + ch) * h * wd..(b * c + ch + 1) * h * wd];
            for y in 0..oh {
                let Some(iy) = coord(w, 0, y, ki) else { continue };
                for xo in 0..ow {
                    if let Some(ix) = coord(w, 1, xo, kj) {
                        dst[b * l + y * ow + xo] = src[iy * wd + ix];
                    }
                }
            }
        }
    });
    out
}

pub fn col2im<T: Real>(cols: &[T], w: &Window) -> Vec<T> {
    let [n, c, h, wd] = w.input;
    let [kh, kw] = w.kernel;
    let [oh, ow] = w.output;
    let l = oh * ow;
    // Channel-major scratch so each thread owns one channel, then back to NCHW.
    let mut tmp = vec![T::zero(); c * n * h * wd];
    if tmp.is_empty() {
        return tmp;
    }
    tmp.par_chunks_mut(n * h * wd).enumerate().for_each(|(ch, dst)| {
        for ki in 0..kh {
            for kj in 0..kw {
                let row = (ch * kh + ki) * kw + kj;
                let src = &cols[row * n * l..(row + 1) * n * l];
                for b in 0..n {
                    for y in 0..oh {
                        let Some(iy) = coord(w, 0, y, ki) else { continue };
                        for xo in 0..ow {
                            if let Some(ix) = coord(w, 1, xo, kj) {
                                dst[(b * h + iy) * wd + ix] += src[b * l + y * ow + xo];
                            }
                        }
                    }
                }
            }
        }
    });
    let mut out = vec![T::zero(); n * c * h * wd];
    let hw = h * wd;
    for ch in 0..c {
        for b in 0..n {
            out[(b * c + ch) * hw..(b * c + ch + 1) * hw]
                .copy_from_slice(&tmp[(ch * n + b) * hw..(ch * n + b + 1) * hw]);
        }
    }
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
