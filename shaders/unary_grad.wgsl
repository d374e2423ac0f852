// unary_grad.wgsl — elementwise dx = dy · f'(x) for the engine's UnaryOp codes (CPU twin:
// src/engine/cpu/elementwise.rs::unary_grad). Op codes are those of unary.wgsl; the
// piecewise-constant ops (floor, ceil, trunc, nonzero, not) give 0.
// Bindings (group 0):
//   0: x    array<f32>, read
//   1: dy   array<f32>, read
//   2: dx   array<f32>, read_write
//   3: params array<u32>, read: [n, op, bitcast<u32>(a), bitcast<u32>(b), row width]
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

// Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as in unary.wgsl.
fn erf_f(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let p = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return sign(v) * (1.0 - p * exp(-a * a));
}

// Drivers may build tanh from exp and overflow to NaN far from 0; tanh is ±1 there in f32.
fn tanh_f(v: f32) -> f32 {
    return select(tanh(v), sign(v), abs(v) > 10.0);
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[4];
    if (i >= params[0]) {
        return;
    }
    let v = x[i];
    let g = dy[i];
    let a = bitcast<f32>(params[2]);
    let b = bitcast<f32>(params[3]);
    var r: f32 = 0.0;
    switch params[1] {
        case 0u: { r = -g; }
        case 1u: { r = g * exp(v); }
        case 2u: { r = g / v; }
        case 3u: { r = g / (2.0 * sqrt(v)); }
        case 4u: { r = -g / (v * v); }
        case 5u: { r = g * 1.1283791670955126 * exp(-(v * v)); }
        case 6u: {
            let t = tanh_f(v);
            r = g * (1.0 - t * t);
        }
        case 7u: {
            let s = 1.0 / (1.0 + exp(-v));
            r = g * s * (1.0 - s);
        }
        case 8u: { r = select(0.0, g, v > 0.0); }
        case 9u: {
            if (v > 0.0) {
                r = g;
            } else if (v < 0.0) {
                r = -g;
            }
        }
        case 15u: { r = g * a; }
        case 16u: { r = select(0.0, g, v >= a && v <= b); }
        case 17u: {
            let t = v * a + b;
            r = select(0.0, g * a, t > 0.0 && t < 1.0);
        }
        case 18u: {
            // d/dx x·Φ(x) = Φ(x) + x·φ(x)
            let cdf = 0.5 * (1.0 + erf_f(v * 0.70710678118654752));
            r = g * (cdf + v * 0.3989422804014327 * exp(-0.5 * v * v));
        }
        default: { r = 0.0; }
    }
    dx[i] = r;
}
