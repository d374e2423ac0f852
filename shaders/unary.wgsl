// unary.wgsl — elementwise y = f(x) for the engine's UnaryOp codes (CPU twin:
// src/engine/cpu/elementwise.rs::unary).
// Bindings (group 0):
//   0: x    array<f32>, read
//   1: y    array<f32>, read_write
//   2: params array<u32>, read: [n, op, bitcast<u32>(a), bitcast<u32>(b), row width]
// Ops: 0 neg, 1 exp, 2 log, 3 sqrt, 4 recip, 5 erf, 6 tanh, 7 sigmoid, 8 relu, 9 abs,
//      10 floor, 11 ceil, 12 trunc, 13 nonzero, 14 not, 15 affine(a,b), 16 clip(a,b),
//      17 hardsigmoid(a,b), 18 gelu (x·Φ(x), erf form), 19 isnan, 20 isinf (+∞ when a != 0,
//      −∞ when b != 0). NaN and ∞ are tested on the bits: compilers may assume floats are
//      finite and fold v != v away.
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

// Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
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
    let a = bitcast<f32>(params[2]);
    let b = bitcast<f32>(params[3]);
    var r: f32 = v;
    switch params[1] {
        case 0u: { r = -v; }
        case 1u: { r = exp(v); }
        case 2u: { r = log(v); }
        case 3u: { r = sqrt(v); }
        case 4u: { r = 1.0 / v; }
        case 5u: { r = erf_f(v); }
        case 6u: { r = tanh_f(v); }
        case 7u: { r = 1.0 / (1.0 + exp(-v)); }
        case 8u: { r = max(v, 0.0); }
        case 9u: { r = abs(v); }
        case 10u: { r = floor(v); }
        case 11u: { r = ceil(v); }
        case 12u: { r = trunc(v); }
        case 13u: { r = select(0.0, 1.0, v != 0.0); }
        case 14u: { r = select(0.0, 1.0, v == 0.0); }
        case 15u: { r = v * a + b; }
        case 16u: { r = min(max(v, a), b); }
        case 17u: { r = clamp(v * a + b, 0.0, 1.0); }
        case 19u: {
            let bits = bitcast<u32>(v);
            r = select(0.0, 1.0, (bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0u);
        }
        case 20u: {
            let bits = bitcast<u32>(v);
            let inf = (bits & 0x7fffffffu) == 0x7f800000u;
            let want = select(b != 0.0, a != 0.0, (bits & 0x80000000u) == 0u);
            r = select(0.0, 1.0, inf && want);
        }
        case 18u: { r = 0.5 * v * (1.0 + erf_f(v * 0.70710678118654752)); }
        default: { r = v; }
    }
    y[i] = r;
}
