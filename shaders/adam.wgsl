// adam.wgsl — one Adam step, one invocation per parameter: m ← β1 m + (1 − β1) g,
// v ← β2 v + (1 − β2) g², p ← p − lr · (m / c1) / (sqrt(v / c2) + 1e-8) with the bias
// corrections c1 = 1 − β1^t, c2 = 1 − β2^t computed by the caller (CPU twin:
// src/criteria/gate.rs::Adam::step).
// Bindings (group 0):
//   0: p    array<f32>, read_write
//   1: m    array<f32>, read_write
//   2: v    array<f32>, read_write
//   3: g    array<f32>, read
//   4: params array<u32>, read: [n, row width, then as f32 bits: lr, β1, β2, c1, c2]
// Dispatch: ceil(n / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read_write> p: array<f32>;
@group(0) @binding(1) var<storage, read_write> m: array<f32>;
@group(0) @binding(2) var<storage, read_write> v: array<f32>;
@group(0) @binding(3) var<storage, read> g: array<f32>;
@group(0) @binding(4) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[1];
    if (i >= params[0]) {
        return;
    }
    let lr = bitcast<f32>(params[2]);
    let b1 = bitcast<f32>(params[3]);
    let b2 = bitcast<f32>(params[4]);
    let c1 = bitcast<f32>(params[5]);
    let c2 = bitcast<f32>(params[6]);
    let gi = g[i];
    let mi = b1 * m[i] + (1.0 - b1) * gi;
    let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] - lr * (mi / c1) / (sqrt(vi / c2) + 1.0e-8);
}
