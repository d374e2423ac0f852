// matmul_blocked.wgsl — batched C = op(A)·op(B) for products of at least 64 × 64: each
// workgroup of 16×16 invocations computes a 64×64 tile of C, each invocation a 4×4 block
// (rows lid.y + 16i, columns lid.x + 16j) accumulated in registers from 16-deep slices of
// A and B staged in workgroup memory, so every value read from workgroup memory feeds 4
// multiply-adds (1 in matmul.wgsl's 16×16 tiles). Slices are loaded along whichever axis
// is contiguous in memory (transposes are strides). Same contract and summation order
// (k ascending) as matmul.wgsl (CPU twin: src/engine/cpu/matmul.rs::matmul).
// Bindings (group 0):
//   0: a    array<f32>, read
//   1: b    array<f32>, read
//   2: c    array<f32>, read_write   ([batch, M, N], row-major)
//   3: params array<u32>, read: [M, N, K, batches here, rsa, csa, rsb, csb,
//                              first batch, first column tile, first row tile, 0,
//                              offset_a[batches here], offset_b[batches here]]
// Dispatch: (column tiles, row tiles, batches) workgroups of 64×64 from the first ones
// named in params; grids past 65,535 in a dimension are split into several dispatches.

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

// ta[kk][r] = op(A)[r0 + r, k0 + kk]; tb[kk][col] = op(B)[k0 + kk, c0 + col].
var<workgroup> ta: array<array<f32, 64>, 16>;
var<workgroup> tb: array<array<f32, 64>, 16>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let m = params[0];
    let n = params[1];
    let k = params[2];
    let nb = params[3];
    let rsa = params[4];
    let csa = params[5];
    let rsb = params[6];
    let csb = params[7];
    let oa = params[12u + wg.z];
    let ob = params[12u + nb + wg.z];
    let bi = params[8] + wg.z;
    let r0 = (params[10] + wg.y) * 64u;
    let c0 = (params[9] + wg.x) * 64u;
    // Which axis of each slice is contiguous: consecutive invocations load along it.
    let a_k_fast = csa == 1u;
    let b_col_fast = csb == 1u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let tiles = (k + 15u) / 16u;
    for (var t = 0u; t < tiles; t = t + 1u) {
        let k0 = t * 16u;
        for (var e = 0u; e < 4u; e = e + 1u) {
            let idx = li + 256u * e;
            var r = idx % 64u;
            var ka = idx / 64u;
            if (a_k_fast) {
                r = idx / 16u;
                ka = idx % 16u;
            }
            var va: f32 = 0.0;
            if (r0 + r < m && k0 + ka < k) {
                va = a[oa + (r0 + r) * rsa + (k0 + ka) * csa];
            }
            ta[ka][r] = va;
            var col = idx / 16u;
            var kb = idx % 16u;
            if (b_col_fast) {
                col = idx % 64u;
                kb = idx / 64u;
            }
            var vb: f32 = 0.0;
            if (k0 + kb < k && c0 + col < n) {
                vb = b[ob + (k0 + kb) * rsb + (c0 + col) * csb];
            }
            tb[kb][col] = vb;
        }
        workgroupBarrier();
        for (var q = 0u; q < 16u; q = q + 1u) {
            let av = vec4<f32>(ta[q][lid.y], ta[q][lid.y + 16u], ta[q][lid.y + 32u], ta[q][lid.y + 48u]);
            let bv = vec4<f32>(tb[q][lid.x], tb[q][lid.x + 16u], tb[q][lid.x + 32u], tb[q][lid.x + 48u]);
            acc0 = acc0 + av.x * bv;
            acc1 = acc1 + av.y * bv;
            acc2 = acc2 + av.z * bv;
            acc3 = acc3 + av.w * bv;
        }
        workgroupBarrier();
    }
    let base = bi * m * n;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = r0 + lid.y + 16u * i;
        if (row < m) {
            var v = acc0;
            if (i == 1u) {
                v = acc1;
            } else if (i == 2u) {
                v = acc2;
            } else if (i == 3u) {
                v = acc3;
            }
            for (var j = 0u; j < 4u; j = j + 1u) {
                let col = c0 + lid.x + 16u * j;
                if (col < n) {
                    c[base + row * n + col] = v[j];
                }
            }
        }
    }
}
