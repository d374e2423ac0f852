// matmul_small.wgsl — batched C = op(A)·op(B) without workgroup memory: each invocation
// computes a 4×4 block of C, looping over K with the 8 operands in registers. For products
// too thin to fill the 16×16 tiles of matmul.wgsl (grouped and depthwise convolutions,
// matrix-vector products) and for CPU adapters, where barriers are expensive. Same
// contract and summation order (k ascending) as matmul.wgsl (CPU twin:
// src/engine/cpu/matmul.rs::matmul).
// Bindings (group 0):
//   0: a    array<f32>, read
//   1: b    array<f32>, read
//   2: c    array<f32>, read_write   ([batch, M, N], row-major)
//   3: params array<u32>, read: [M, N, K, batch, rsa, csa, rsb, csb,
//                              n (= batch · ceil(M / 4) · ceil(N / 4)), row width, 0, 0,
//                              offset_a[batch], offset_b[batch]]
// Dispatch: ceil(n / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[9];
    if (i >= params[8]) {
        return;
    }
    let m = params[0];
    let n = params[1];
    let k = params[2];
    let nb = params[3];
    let bm = (m + 3u) / 4u;
    let bn = (n + 3u) / 4u;
    let col0 = (i % bn) * 4u;
    let row0 = ((i / bn) % bm) * 4u;
    let bi = i / (bm * bn);
    let rsa = params[4];
    let csa = params[5];
    let rsb = params[6];
    let csb = params[7];
    // Rows and columns past the edge read the last valid one and are not stored.
    let oa = params[12u + bi];
    let ob = params[12u + nb + bi];
    var ra = vec4<u32>(0u);
    var cb = vec4<u32>(0u);
    for (var j = 0u; j < 4u; j = j + 1u) {
        ra[j] = oa + min(row0 + j, m - 1u) * rsa;
        cb[j] = ob + min(col0 + j, n - 1u) * csb;
    }
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var q = 0u; q < k; q = q + 1u) {
        let va = vec4<f32>(a[ra.x + q * csa], a[ra.y + q * csa], a[ra.z + q * csa], a[ra.w + q * csa]);
        let vb = vec4<f32>(b[cb.x + q * rsb], b[cb.y + q * rsb], b[cb.z + q * rsb], b[cb.w + q * rsb]);
        acc0 = acc0 + va.x * vb;
        acc1 = acc1 + va.y * vb;
        acc2 = acc2 + va.z * vb;
        acc3 = acc3 + va.w * vb;
    }
    let base = bi * m * n;
    for (var j = 0u; j < 4u; j = j + 1u) {
        let col = col0 + j;
        if (col < n) {
            if (row0 < m) {
                c[base + row0 * n + col] = acc0[j];
            }
            if (row0 + 1u < m) {
                c[base + (row0 + 1u) * n + col] = acc1[j];
            }
            if (row0 + 2u < m) {
                c[base + (row0 + 2u) * n + col] = acc2[j];
            }
            if (row0 + 3u < m) {
                c[base + (row0 + 3u) * n + col] = acc3[j];
            }
        }
    }
}
