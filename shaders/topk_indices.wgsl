// topk_indices.wgsl — indices of the k largest (or smallest) elements along an axis,
// sorted, ties in increasing index order (a stable sort), as floats in [outer, k, inner]
// (CPU twin: src/engine/cpu/index.rs::topk_indices). One invocation per input element
// counts the elements that sort before it; when that rank is below k it writes its index
// there.
// Bindings (group 0):
//   0: x    array<f32>, read   ([outer, len, inner])
//   1: y    array<f32>, read_write
//   2: params array<u32>, read: [n (= outer · len · inner), len, inner, k, largest, row width]
// Dispatch: ceil(n / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[5];
    if (i >= params[0]) {
        return;
    }
    let len = params[1];
    let inner = params[2];
    let k = params[3];
    let largest = params[4] != 0u;
    let r = i % inner;
    let t = i / inner;
    let j = t % len;
    let o = t / len;
    let v = x[i];
    var rank = 0u;
    for (var p = 0u; p < len; p = p + 1u) {
        let w = x[(o * len + p) * inner + r];
        var before: bool;
        if (largest) {
            before = w > v;
        } else {
            before = w < v;
        }
        // Neither before nor after: equal (NaN included), the lower index first.
        let equal = !(w > v) && !(w < v);
        if (before || (equal && p < j)) {
            rank = rank + 1u;
        }
    }
    if (rank < k) {
        y[(o * k + rank) * inner + r] = f32(j);
    }
}
