// gate_forward.wgsl — the PL gate network's forward pass, one invocation per unit:
// a[u] = Σ_j w2_j · tanh(w1_j0 · d[u,0] + w1_j1 · d[u,1] + b1_j) + b2, with the parameters
// flat as [w1 (h × 2), b1 (h), w2 (h), b2] (CPU twin: src/criteria/gate.rs::Net::forward).
// Bindings (group 0):
//   0: p    array<f32>, read        ([4h + 1])
//   1: d    array<f32>, read        ([units, 2] standardised features)
//   2: a    array<f32>, read_write  ([units] logits)
//   3: params array<u32>, read: [units, h, row width]
// Dispatch: ceil(units / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> p: array<f32>;
@group(0) @binding(1) var<storage, read> d: array<f32>;
@group(0) @binding(2) var<storage, read_write> a: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let u = gid.x + gid.y * params[2];
    if (u >= params[0]) {
        return;
    }
    let h = params[1];
    let d0 = d[2u * u];
    let d1 = d[2u * u + 1u];
    var acc: f32 = 0.0;
    for (var j = 0u; j < h; j = j + 1u) {
        let act = tanh(p[2u * j] * d0 + p[2u * j + 1u] * d1 + p[2u * h + j]);
        acc = acc + p[3u * h + j] * act;
    }
    a[u] = acc + p[4u * h];
}
