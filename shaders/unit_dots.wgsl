// unit_dots.wgsl — the per-unit accumulation of one Hutchinson probe:
// out[u] = scale · Σ_{e ∈ u} z[e] · (gp[e] − gm[e]), i.e. Σ_{p ∈ u} z_p (Hz)_p with
// Hz = (∇L(w + εz) − ∇L(w − εz)) / 2ε and scale = 1 / 2ε, over the flat concatenation of
// every unit tensor; unit u owns the elements idx[offs[u] .. offs[u + 1]] (CSR), summed in
// idx order (CPU twin: src/engine/gpu/pl.rs::unit_dots_cpu, the f32 form of
// src/criteria/ntk.rs::hutchinson's unit sums).
// Bindings (group 0):
//   0: z    array<f32>, read        (probe, entries ±1)
//   1: gp   array<f32>, read        (∇L at w + εz)
//   2: gm   array<f32>, read        (∇L at w − εz)
//   3: offs array<u32>, read        ([units + 1])
//   4: idx  array<u32>, read
//   5: out  array<f32>, read_write  ([probes, units]; row `probe` is written)
//   6: params array<u32>, read: [units, bitcast<u32>(scale), probe, row width]
// Dispatch: ceil(units / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> z: array<f32>;
@group(0) @binding(1) var<storage, read> gp: array<f32>;
@group(0) @binding(2) var<storage, read> gm: array<f32>;
@group(0) @binding(3) var<storage, read> offs: array<u32>;
@group(0) @binding(4) var<storage, read> idx: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let u = gid.x + gid.y * params[3];
    let units = params[0];
    if (u >= units) {
        return;
    }
    var acc: f32 = 0.0;
    for (var q = offs[u]; q < offs[u + 1u]; q = q + 1u) {
        let e = idx[q];
        acc = acc + z[e] * (gp[e] - gm[e]);
    }
    out[params[2] * units + u] = acc * bitcast<f32>(params[1]);
}
