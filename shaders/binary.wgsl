// binary.wgsl — elementwise c = f(a, b) with numpy broadcasting (CPU twin:
// src/engine/cpu/elementwise.rs::binary).
// Bindings (group 0):
//   0: a    array<f32>, read
//   1: b    array<f32>, read
//   2: c    array<f32>, read_write
//   3: params array<u32>, read: [n, op, rank, row width, out_shape[8], stride_a[8], stride_b[8]]
//      (strides are 0 on broadcast axes; rank ≤ 8, shapes right-aligned).
// Ops: 0 add, 1 sub, 2 mul, 3 div, 4 pow, 5 max, 6 min, 7 equal, 8 less, 9 greater,
//      10 less_eq, 11 greater_eq, 12 and, 13 or, 14 xor, 15 pow_grad (b·a^(b−1)).
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

// x^p as the CPU's powf: WGSL's pow is undefined for x < 0 and for x = 0, so those are
// worked out here (integer exponents of a negative base keep their sign).
fn powf(x: f32, p: f32) -> f32 {
    if (p == 2.0) {
        return x * x;
    }
    if (p == 0.0) {
        return 1.0;
    }
    let ax = abs(x);
    var r: f32;
    if (ax == 0.0) {
        // 0^p: 0 for p > 0, +inf for p < 0 (1 / ax at run time, not a constant).
        r = select(1.0 / ax, 0.0, p > 0.0);
    } else {
        r = pow(ax, p);
    }
    if (x < 0.0) {
        if (floor(p) != p) {
            return sqrt(-1.0 - ax); // NaN at run time, as powf gives
        }
        if (floor(p * 0.5) != p * 0.5) {
            return -r;
        }
    }
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[3];
    if (i >= params[0]) {
        return;
    }
    let rank = params[2];
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var k = 0u; k < rank; k = k + 1u) {
        let ax = rank - 1u - k;
        let d = params[4u + ax];
        let q = rem % d;
        rem = rem / d;
        ia = ia + q * params[12u + ax];
        ib = ib + q * params[20u + ax];
    }
    let x = a[ia];
    let y = b[ib];
    var r: f32 = 0.0;
    switch params[1] {
        case 0u: { r = x + y; }
        case 1u: { r = x - y; }
        case 2u: { r = x * y; }
        case 3u: { r = x / y; }
        case 4u: { r = powf(x, y); }
        case 5u: { r = max(x, y); }
        case 6u: { r = min(x, y); }
        case 7u: { r = select(0.0, 1.0, x == y); }
        case 8u: { r = select(0.0, 1.0, x < y); }
        case 9u: { r = select(0.0, 1.0, x > y); }
        case 10u: { r = select(0.0, 1.0, x <= y); }
        case 11u: { r = select(0.0, 1.0, x >= y); }
        case 12u: { r = select(0.0, 1.0, x != 0.0 && y != 0.0); }
        case 13u: { r = select(0.0, 1.0, x != 0.0 || y != 0.0); }
        case 14u: { r = select(0.0, 1.0, (x != 0.0) != (y != 0.0)); }
        case 15u: { r = select(y * powf(x, y - 1.0), 2.0 * x, y == 2.0); }
        default: { r = 0.0; }
    }
    c[i] = r;
}
