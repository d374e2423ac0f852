// rows.wgsl — the row-wise ops over the last axis, fused, and their derivatives (CPU twin:
// src/engine/cpu/rows.rs). One invocation per row of `len` contiguous elements.
//   op 0, normalize:      out = x̂ = (a − mean) · inv, inv = 1 / sqrt(var + eps), population
//                         variance (LayerNorm before its scale and bias);
//   op 1, softmax:        out = exp(a − max) / Σ exp(a − max);
//   op 2, normalize grad: a = normalize's input x: out = inv · (dy − mean(dy) − x̂ · mean(dy · x̂));
//   op 3, softmax grad:   a = softmax's output y: out = y · (dy − Σ dy · y).
// Bindings (group 0):
//   0: a      array<f32>, read
//   1: dy     array<f32>, read (ops 2 and 3; the forward ops bind `a` here too and ignore it)
//   2: out    array<f32>, read_write
//   3: params array<u32>, read: [rows, len, op, row width, eps bits]
// Dispatch: ceil(rows / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

// Writes x̂ of the row at `base` into `out` and returns inv.
fn normalize(base: u32, len: u32) -> f32 {
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
    for (var j = 0u; j < len; j = j + 1u) {
        out[base + j] = (a[base + j] - mean) * inv;
    }
    return inv;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x + gid.y * params[3];
    if (r >= params[0]) {
        return;
    }
    let len = params[1];
    let op = params[2];
    let base = r * len;
    if (op == 0u) {
        normalize(base, len);
    } else if (op == 1u) {
        var m: f32 = -3.4028235e38;
        for (var j = 0u; j < len; j = j + 1u) {
            m = max(m, a[base + j]);
        }
        var s: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            let e = exp(a[base + j] - m);
            out[base + j] = e;
            s = s + e;
        }
        for (var j = 0u; j < len; j = j + 1u) {
            out[base + j] = out[base + j] / s;
        }
    } else if (op == 2u) {
        let inv = normalize(base, len);
        let n = f32(len);
        var g: f32 = 0.0;
        var gx: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            g = g + dy[base + j];
            gx = gx + dy[base + j] * out[base + j];
        }
        g = g / n;
        gx = gx / n;
        for (var j = 0u; j < len; j = j + 1u) {
            out[base + j] = inv * (dy[base + j] - g - out[base + j] * gx);
        }
    } else {
        var dot: f32 = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            dot = dot + a[base + j] * dy[base + j];
        }
        for (var j = 0u; j < len; j = j + 1u) {
            out[base + j] = a[base + j] * (dy[base + j] - dot);
        }
    }
}
