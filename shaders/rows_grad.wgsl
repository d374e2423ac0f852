// rows_grad.wgsl — dx of the row-wise ops of rows.wgsl, row by row (CPU twin:
// src/engine/cpu/rows.rs::rows_grad):
//   normalize (a = its input x): inv · (dy − mean(dy) − x̂ · mean(dy · x̂)), with mean, inv
//     and x̂ = (x − mean) · inv recomputed from x;
//   softmax (a = its output y): y · (dy − Σ dy · y).
// One invocation per row of `len` contiguous elements.
// Bindings (group 0):
//   0: a      array<f32>, read
//   1: dy     array<f32>, read
//   2: dx     array<f32>, read_write
//   3: params array<u32>, read: [rows, len, op (0 normalize, 1 softmax), row width, eps bits]
// Dispatch: ceil(rows / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

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
            s = s + a[base + j];
        }
        let mean = s / n;
        var v: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            let d = a[base + j] - mean;
            v = v + d * d;
        }
        let inv = 1.0 / sqrt(v / n + bitcast<f32>(params[4]));
        var g: f32 = 0.0;
        var gx: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            let d = dy[base + j];
            g = g + d;
            gx = gx + d * (a[base + j] - mean) * inv;
        }
        g = g / n;
        gx = gx / n;
        for (var j = 0u; j < len; j = j + 1u) {
            dx[base + j] = inv * (dy[base + j] - g - (a[base + j] - mean) * inv * gx);
        }
    } else {
        var dot: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            dot = dot + a[base + j] * dy[base + j];
        }
        for (var j = 0u; j < len; j = j + 1u) {
            dx[base + j] = a[base + j] * (dy[base + j] - dot);
        }
    }
}
