// rows.wgsl — the row-wise ops over the last axis, fused: LayerNorm's normalisation
// (x − mean) / sqrt(var + eps) with the population variance, or Softmax
// exp(x − max) / Σ exp(x − max) (CPU twin: src/engine/cpu/rows.rs::rows). One invocation
// per row of `len` contiguous elements.
// Bindings (group 0):
//   0: x      array<f32>, read
//   1: y      array<f32>, read_write
//   2: params array<u32>, read: [rows, len, op (0 normalize, 1 softmax), row width, eps bits]
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
    let base = r * len;
    if (params[2] == 0u) {
        let n = f32(len);
        var s: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            s = s + x[base + j];
        }
        let mean = s / n;
        var v: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            let d = x[base + j] - mean;
            v = v + d * d;
        }
        let inv = 1.0 / sqrt(v / n + bitcast<f32>(params[4]));
        for (var j = 0u; j < len; j = j + 1u) {
            y[base + j] = (x[base + j] - mean) * inv;
        }
    } else {
        var m: f32 = -3.4028235e38;
        for (var j = 0u; j < len; j = j + 1u) {
            m = max(m, x[base + j]);
        }
        var s: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            let e = exp(x[base + j] - m);
            y[base + j] = e;
            s = s + e;
        }
        for (var j = 0u; j < len; j = j + 1u) {
            y[base + j] = y[base + j] / s;
        }
    }
}
