// gram_units.wgsl — per-unit Gram accumulation K_u += G_u G_uᵀ, batched over units: G is
// the per-sample gradient of one weight ([n, numel], row s = sample s) and unit u owns
// the weight elements idx[offs[u] .. offs[u + 1]] (CSR), so
// K[u, a, b] += Σ_{e ∈ u} G[a, e] · G[b, e], summed in idx order in double-f32
// arithmetic: each product split exactly into hi + lo (Dekker's two-product with
// Veltkamp splitting, no FMA needed) and accumulated with Knuth's two-sum, meant to make K
// as accurate as an f64 sum. Caveat: naga emits no NoContraction/exact decorations, and
// Mesa (lavapipe) simplifies the compensation away, leaving f32 accuracy (≈ 1e-7) there (CPU twin: src/engine/gram.rs::unit_gram, f64).
// Bindings (group 0):
//   0: g    array<f32>, read        ([n, numel])
//   1: offs array<u32>, read        ([units + 1])
//   2: idx  array<u32>, read        (element indices into a row of g)
//   3: k    array<f32>, read_write  ([units, n, n, 2]: hi and lo of each entry, accumulated into)
//   4: params array<u32>, read: [n, numel, total (= units · n · n), row width]
// Dispatch: ceil(total / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> g: array<f32>;
@group(0) @binding(1) var<storage, read> offs: array<u32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> k: array<f32>;
@group(0) @binding(4) var<storage, read> params: array<u32>;

// Veltkamp split of an f32 into two 12-bit halves (a = h + l exactly).
fn split(a: f32) -> vec2<f32> {
    let c = 4097.0 * a;
    let h = c - (c - a);
    return vec2<f32>(h, a - h);
}

// a · b = x + y exactly (Dekker).
fn two_prod(a: f32, b: f32) -> vec2<f32> {
    let p = a * b;
    let sa = split(a);
    let sb = split(b);
    let err = ((sa.x * sb.x - p) + sa.x * sb.y + sa.y * sb.x) + sa.y * sb.y;
    return vec2<f32>(p, err);
}

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
    var hi: f32 = k[2u * i];
    var lo: f32 = k[2u * i + 1u];
    for (var q = offs[u]; q < offs[u + 1u]; q = q + 1u) {
        let e = idx[q];
        let pr = two_prod(g[ra + e], g[rb + e]);
        // two-sum of hi and the product's high part.
        let t = hi + pr.x;
        let bp = t - hi;
        let err = (hi - (t - bp)) + (pr.x - bp);
        hi = t;
        lo = lo + (err + pr.y);
    }
    // Renormalise so hi carries the sum.
    let t = hi + lo;
    lo = lo - (t - hi);
    k[2u * i] = t;
    k[2u * i + 1u] = lo;
}
