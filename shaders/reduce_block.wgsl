// reduce_block.wgsl — first pass of a reduction (sum, mean, max, min) over one block of
// adjacent axes, the tensor viewed as [outer, rows, inner] row-major with the rows reduced
// (bias gradients: [batch · tokens, width] over the rows; per-channel sums of feature maps:
// [batch · channels, H · W] over the rows). Invocation (s, o, c) folds rows
// s·rows_per_split … of column (o, c) in increasing order into partial[s, o, c]; the
// caller reduces the partials over s (reduce.wgsl). One invocation per output, as in
// reduce.wgsl, left most of a GPU idle: 6 workgroups for a 2048 × 384 bias gradient, 32
// invocations for a [32, 112 · 112] sum. Means are scaled by 1/rows here, so the second
// pass sums. (CPU twin: src/engine/cpu/reduce.rs::reduce.)
// Bindings (group 0):
//   0: x       array<f32>, read        ([outer, rows, inner])
//   1: partial array<f32>, read_write  ([splits, outer, inner])
//   2: params  array<u32>, read: [rows, outer · inner, splits, op (0 sum, 1 mean, 2 max,
//      3 min), rows per split, row width, bitcast<u32>(init), bitcast<u32>(1 / rows), inner]
// Dispatch: ceil(splits · outer · inner / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> partial: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[5];
    let rows = params[0];
    let cols = params[1];
    if (i >= cols * params[2]) {
        return;
    }
    let op = params[3];
    let inner = params[8];
    let col = i % cols;
    let s = i / cols;
    // Element (o, r, c) of x, with col = o · inner + c, sits at (o · rows + r) · inner + c.
    let base = (col / inner) * rows * inner + col % inner;
    let r0 = s * params[4];
    let r1 = min(r0 + params[4], rows);
    var acc = bitcast<f32>(params[6]);
    for (var r = r0; r < r1; r = r + 1u) {
        let v = x[base + r * inner];
        if (op == 2u) {
            acc = max(acc, v);
        } else if (op == 3u) {
            acc = min(acc, v);
        } else {
            acc = acc + v;
        }
    }
    if (op == 1u) {
        acc = acc * bitcast<f32>(params[7]);
    }
    partial[i] = acc;
}
