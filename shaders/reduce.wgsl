// reduce.wgsl — keepdims reduction (sum, mean, max, min) over any set of axes (CPU twin:
// src/engine/cpu/reduce.rs::reduce). One invocation per output element folds its reduced
// elements in increasing input order, as the CPU does.
// Bindings (group 0):
//   0: x    array<f32>, read
//   1: y    array<f32>, read_write
//   2: params array<u32>, read: [n_out, rank, count, op (0 sum, 1 mean, 2 max, 3 min),
//      row width, bitcast<u32>(init), bitcast<u32>(1 / count), n_reduced,
//      out_shape[8] (input shape with reduced axes 1), x_stride[8],
//      reduced_size[8], reduced_stride[8] (the reduced axes in order)]
// Dispatch: ceil(n_out / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[4];
    if (i >= params[0]) {
        return;
    }
    let rank = params[1];
    let count = params[2];
    let op = params[3];
    let nr = params[7];
    var rem = i;
    var base = 0u;
    for (var k = 0u; k < rank; k = k + 1u) {
        let ax = rank - 1u - k;
        let d = params[8u + ax];
        base = base + (rem % d) * params[16u + ax];
        rem = rem / d;
    }
    var acc = bitcast<f32>(params[5]);
    for (var j = 0u; j < count; j = j + 1u) {
        var r = j;
        var off = base;
        for (var k = 0u; k < nr; k = k + 1u) {
            let ax = nr - 1u - k;
            let d = params[24u + ax];
            off = off + (r % d) * params[32u + ax];
            r = r / d;
        }
        let v = x[off];
        if (op == 2u) {
            acc = max(acc, v);
        } else if (op == 3u) {
            acc = min(acc, v);
        } else {
            acc = acc + v;
        }
    }
    if (op == 1u && count > 0u) {
        acc = acc * bitcast<f32>(params[6]);
    }
    y[i] = acc;
}
