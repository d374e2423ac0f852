// gram_units.wgsl — per-unit Gram accumulation K_u += G_u G_uᵀ, batched over units: G is
// the per-sample gradient of one weight ([n, numel], row s = sample s) and unit u owns
// the weight elements idx[offs[u] .. offs[u + 1]] (CSR), so
// K[u, a, b] += Σ_{e ∈ u} G[a, e] · G[b, e], summed in idx order (CPU twin:
// src/engine/gram.rs::unit_gram, which the CPU path runs in f64).
// Bindings (group 0):
//   0: g    array<f32>, read        ([n, numel])
//   1: offs array<u32>, read        ([units + 1])
//   2: idx  array<u32>, read        (element indices into a row of g)
//   3: k    array<f32>, read_write  ([units, n, n], accumulated into)
//   4: params array<u32>, read: [n, numel, total (= units · n · n), row width]
// Dispatch: ceil(total / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> g: array<f32>;
@group(0) @binding(1) var<storage, read> offs: array<u32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> k: array<f32>;
@group(0) @binding(4) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[3];
    if (i >= params[2]) {
        return;
    }
    let n = params[0];
    let numel = params[1];
    let u = i / (n * n);
    let a = (i / n) % n;
    let b = i % n;
    let ra = a * numel;
    let rb = b * numel;
    var acc: f32 = 0.0;
    for (var q = offs[u]; q < offs[u + 1u]; q = q + 1u) {
        let e = idx[q];
        acc = acc + g[ra + e] * g[rb + e];
    }
    k[i] = k[i] + acc;
}
