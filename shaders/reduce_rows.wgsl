// reduce_rows.wgsl — y[r] = reduce(x[r·len .. (r+1)·len]) for contiguous rows: the
// trailing-axis reductions of LayerNorm and Softmax (CPU twin:
// src/engine/cpu/reduce.rs::reduce with trailing axes). One invocation per row.
// Bindings (group 0):
//   0: x    array<f32>, read
//   1: y    array<f32>, read_write
//   2: params array<u32>, read: [rows, len, op (0 sum, 1 mean, 2 max, 3 min), row width]
// Dispatch: ceil(rows / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x + gid.y * params[3];
    if (r >= params[0]) {
        return;
    }
    let len = params[1];
    let op = params[2];
    var acc: f32 = 0.0;
    if (op == 2u) {
        acc = -3.4028235e38;
    } else if (op == 3u) {
        acc = 3.4028235e38;
    }
    for (var j = 0u; j < len; j = j + 1u) {
        let v = x[r * len + j];
        if (op == 2u) {
            acc = max(acc, v);
        } else if (op == 3u) {
            acc = min(acc, v);
        } else {
            acc = acc + v;
        }
    }
    if (op == 1u && len > 0u) {
        acc = acc / f32(len);
    }
    y[r] = acc;
}
