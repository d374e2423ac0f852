// argmax.wgsl — ArgMax / ArgMin along an axis, as float indices into the keepdims output
// [outer, 1, inner] (CPU twin: src/engine/cpu/index.rs::argmax). The first extreme wins,
// or the last with select_last.
// Bindings (group 0):
//   0: x    array<f32>, read   ([outer, len, inner])
//   1: y    array<f32>, read_write
//   2: params array<u32>, read: [n (= outer · inner), len, inner, row width, select_last, min]
// Dispatch: ceil(n / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[3];
    if (i >= params[0]) {
        return;
    }
    let len = params[1];
    let inner = params[2];
    let last = params[4] != 0u;
    let mn = params[5] != 0u;
    let o = i / inner;
    let r = i % inner;
    var best = 0u;
    for (var j = 1u; j < len; j = j + 1u) {
        let v = x[(o * len + j) * inner + r];
        let b = x[(o * len + best) * inner + r];
        var better: bool;
        if (mn) {
            better = v < b || (last && v == b);
        } else {
            better = v > b || (last && v == b);
        }
        if (better) {
            best = j;
        }
    }
    y[i] = f32(best);
}
