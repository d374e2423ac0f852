// strided_write.wgsl — y[base + Σ idx_k · stride_k] = x[i] over the input's multi-index:
// Embed (the adjoint of Slice, constant Pad) and one part of a Concat (CPU twins:
// src/engine/cpu/layout.rs::embed and ::concat). Other elements of y are left as they are;
// distinct inputs never share a target (no step is 0).
// Bindings (group 0):
//   0: x    array<f32>, read
//   1: y    array<f32>, read_write
//   2: params array<i32>, read: [n, rank, row width, base, x_shape[8], stride[8]]
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<i32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = i32(gid.x + gid.y * u32(params[2]));
    if (i >= params[0]) {
        return;
    }
    let rank = params[1];
    var rem = i;
    var off = params[3];
    for (var k = 0; k < rank; k = k + 1) {
        let ax = rank - 1 - k;
        let d = params[4 + ax];
        off = off + (rem % d) * params[12 + ax];
        rem = rem / d;
    }
    y[off] = x[i];
}
