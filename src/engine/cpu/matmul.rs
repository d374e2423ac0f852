//! CPU kernel of the batched matmul primitive: one strided GEMM (matrixmultiply, which
//! threads large products itself) per batch element, transposes folded into strides, batch
//! dimensions broadcast with stride 0. Many small products (attention heads) are spread
//! over threads instead.

use rayon::prelude::*;

use super::Real;
use crate::engine::program::broadcast_strides;

/// Below this many multiply-adds per product, batch elements run in parallel.
const SMALL_GEMM: usize = 1 << 20;

#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    a: &[T],
    a_shape: &[usize],
    b: &[T],
    b_shape: &[usize],
    ta: bool,
    tb: bool,
    out_shape: &[usize],
) -> Vec<T> {
    let ra = a_shape.len();
    let rb = b_shape.len();
    let ro = out_shape.len();
    let (m, k) = if ta { (a_shape[ra - 1], a_shape[ra - 2]) } else { (a_shape[ra - 2], a_shape[ra - 1]) };
    let n = if tb { b_shape[rb - 2] } else { b_shape[rb - 1] };
    let out_batch = &out_shape[..ro - 2];
    let nb: usize = out_batch.iter().product();
    let sa_b = broadcast_strides(&a_shape[..ra - 2], out_batch);
    let sb_b = broadcast_strides(&b_shape[..rb - 2], out_batch);
    let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
    let (rsb, csb) = if tb { (1, k) } else { (n, 1) };
    let total = nb * m * n;
    if m * n == 0 || k == 0 {
        return vec![T::zero(); total];
    }
    // The GEMMs overwrite their output (β = 0 never reads C), so it is not zeroed first:
    // a memset of every activation was 2% of MiniLM's forward + backward.
    let mut out: Vec<T> = Vec::with_capacity(total);
    let offs = |bi: usize| -> (usize, usize) {
        let (mut oa, mut ob) = (0, 0);
        let mut rem = bi;
        for ax in (0..out_batch.len()).rev() {
            let i = rem % out_batch[ax];
            rem /= out_batch[ax];
            oa += i * sa_b[ax];
            ob += i * sb_b[ax];
        }
        (oa * m * k, ob * k * n)
    };
    let body = |(bi, c): (usize, &mut [std::mem::MaybeUninit<T>])| {
        let (oa, ob) = offs(bi);
        // SAFETY: the strides describe matrices inside the slices (checked by the shapes
        // the program was built with), and `c` is a distinct m×n row-major block of the
        // output's allocation, which the GEMM writes without reading (k > 0, β = 0).
        unsafe {
            T::gemm(
                m,
                k,
                n,
                a[oa..].as_ptr(),
                rsa as isize,
                csa as isize,
                b[ob..].as_ptr(),
                rsb as isize,
                csb as isize,
                c.as_mut_ptr() as *mut T,
                n as isize,
                1,
            );
        }
    };
    let spare = &mut out.spare_capacity_mut()[..total];
    if nb > 1 && m * n * k < SMALL_GEMM {
        spare.par_chunks_mut(m * n).enumerate().for_each(body);
    } else {
        spare.chunks_mut(m * n).enumerate().for_each(body);
    }
    // SAFETY: every one of the nb blocks of m×n elements was written above.
    unsafe { out.set_len(total) };
    out
}
