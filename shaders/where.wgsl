// where.wgsl — out = cond != 0 ? a : b with numpy broadcasting of all three operands (CPU
// twin: src/engine/cpu/elementwise.rs::where_).
// Bindings (group 0):
//   0: cond array<f32>, read
//   1: a    array<f32>, read
//   2: b    array<f32>, read
//   3: out  array<f32>, read_write
//   4: params array<u32>, read: [n, rank, row width, 0, out_shape[8], stride_cond[8],
//      stride_a[8], stride_b[8]] (strides are 0 on broadcast axes; shapes right-aligned).
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> cond: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> params: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[2];
    if (i >= params[0]) {
        return;
    }
    let rank = params[1];
    var rem = i;
    var ic = 0u;
    var ia = 0u;
    var ib = 0u;
    for (var k = 0u; k < rank; k = k + 1u) {
        let ax = rank - 1u - k;
        let d = params[4u + ax];
        let q = rem % d;
        rem = rem / d;
        ic = ic + q * params[12u + ax];
        ia = ia + q * params[20u + ax];
        ib = ib + q * params[28u + ax];
    }
    out[i] = select(b[ib], a[ia], cond[ic] != 0.0);
}
