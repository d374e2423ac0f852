// gate_backward.wgsl — the PL gate network's parameter gradient Σ_u da[u] · ∂a_u/∂p, one
// invocation per parameter (flat [w1 (h × 2), b1 (h), w2 (h), b2]), summing over units
// in order and recomputing the hidden activation it needs (CPU twin:
// src/criteria/gate.rs::Net::backward summed over units).
// Bindings (group 0):
//   0: p    array<f32>, read        ([4h + 1])
//   1: d    array<f32>, read        ([units, 2])
//   2: da   array<f32>, read        ([units] upstream gradient of each logit)
//   3: grad array<f32>, read_write  ([4h + 1])
//   4: params array<u32>, read: [units, h]
// Dispatch: ceil((4h + 1) / 64) workgroups along x.

@group(0) @binding(0) var<storage, read> p: array<f32>;
@group(0) @binding(1) var<storage, read> d: array<f32>;
@group(0) @binding(2) var<storage, read> da: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
@group(0) @binding(4) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let units = params[0];
    let h = params[1];
    if (k > 4u * h) {
        return;
    }
    // Which hidden neuron (j) and which role: 0 w1 (column c), 1 b1, 2 w2, 3 b2.
    var role = 3u;
    var j = 0u;
    var c = 0u;
    if (k < 2u * h) {
        role = 0u;
        j = k / 2u;
        c = k % 2u;
    } else if (k < 3u * h) {
        role = 1u;
        j = k - 2u * h;
    } else if (k < 4u * h) {
        role = 2u;
        j = k - 3u * h;
    }
    var acc: f32 = 0.0;
    for (var u = 0u; u < units; u = u + 1u) {
        let g = da[u];
        if (role == 3u) {
            acc = acc + g;
            continue;
        }
        let d0 = d[2u * u];
        let d1 = d[2u * u + 1u];
        let act = tanh(p[2u * j] * d0 + p[2u * j + 1u] * d1 + p[2u * h + j]);
        if (role == 2u) {
            acc = acc + g * act;
        } else {
            let dz = g * p[3u * h + j] * (1.0 - act * act);
            if (role == 1u) {
                acc = acc + dz;
            } else {
                acc = acc + dz * d[2u * u + c];
            }
        }
    }
    grad[k] = acc;
}
