// matmul.wgsl — batched C = op(A)·op(B), 16×16 tiles in workgroup memory (CPU twin:
// src/engine/cpu/matmul.rs::matmul). Transposes and broadcast batches are strides/offsets.
// Bindings (group 0):
//   0: a    array<f32>, read
//   1: b    array<f32>, read
//   2: c    array<f32>, read_write   ([batch, M, N], row-major)
//   3: params array<u32>, read: [M, N, K, batches here, rsa, csa, rsb, csb,
//                              first batch, first column tile, first row tile, 0,
//                              offset_a[batches here], offset_b[batches here]]
// Dispatch: (column tiles, row tiles, batches) workgroups from the first ones named in
// params; grids past 65,535 in a dimension are split into several dispatches.

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m = params[0];
    let n = params[1];
    let k = params[2];
    let nb = params[3];
    let oa = params[12u + wg.z];
    let ob = params[12u + nb + wg.z];
    let bi = params[8] + wg.z;
    let row = (params[10] + wg.y) * 16u + lid.y;
    let col = (params[9] + wg.x) * 16u + lid.x;
    var acc: f32 = 0.0;
    let tiles = (k + 15u) / 16u;
    for (var t = 0u; t < tiles; t = t + 1u) {
        let ka = t * 16u + lid.x;
        let kb = t * 16u + lid.y;
        var va: f32 = 0.0;
        if (row < m && ka < k) {
            va = a[oa + row * params[4] + ka * params[5]];
        }
        var vb: f32 = 0.0;
        if (kb < k && col < n) {
            vb = b[ob + kb * params[6] + col * params[7]];
        }
        ta[lid.y][lid.x] = va;
        tb[lid.y][lid.x] = vb;
        workgroupBarrier();
        for (var q = 0u; q < 16u; q = q + 1u) {
            acc = acc + ta[lid.y][q] * tb[q][lid.x];
        }
        workgroupBarrier();
    }
    if (row < m && col < n) {
        c[bi * m * n + row * n + col] = acc;
    }
}
