// sym_eigvals.wgsl — all eigenvalues of many small symmetric matrices (n ≤ 64), one
// workgroup per matrix, the matrix in workgroup memory: cyclic two-sided Jacobi in f32
// with the round-robin (tournament) ordering, so that each round rotates n/2 disjoint
// (p, q) pairs at once (column update A·R, then row update Rᵀ·(A·R), then A[p,q] := 0).
// Stops after `max_sweeps` sweeps, when the off-diagonal Frobenius norm falls below
// tol · ‖A‖_F, or after a sweep without a rotation; a rotation is skipped when A[p,q] is negligible next to both diagonal
// entries (Rutishauser's test). Eigenvalues come out sorted ascending (by rank). Accuracy:
// absolute, about n · ε_f32 · λ_max (CPU twin: src/linalg.rs::sym_eigvals, f64).
// Bindings (group 0):
//   0: mats array<f32>, read        ([count, n, n] row-major; the upper triangle is read)
//   1: eig  array<f32>, read_write  ([count, n], ascending)
//   2: params array<u32>, read: [n, count, max_sweeps, bitcast<u32>(tol), groups per row]
// Dispatch: count workgroups, split over x and y (matrix = x + y · groups per row).

@group(0) @binding(0) var<storage, read> mats: array<f32>;
@group(0) @binding(1) var<storage, read_write> eig: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

const WG: u32 = 64u;

var<workgroup> a: array<f32, 4096>;
var<workgroup> rot: array<vec2<f32>, 32>;
var<workgroup> pq: array<vec2<u32>, 32>;
var<workgroup> part: array<f32, 64>;
var<workgroup> done: u32;
var<workgroup> rotated: atomic<u32>;

// The sum of `part` over the workgroup, left in part[0] (every invocation calls it).
fn reduce_part(t: u32) {
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if (t < s) {
            part[t] = part[t] + part[t + s];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let n = params[0];
    let mi = wid.x + wid.y * params[4];
    // Uniform across the workgroup: the whole group leaves together.
    if (mi >= params[1]) {
        return;
    }
    let base = mi * n * n;
    // Symmetrise from the upper triangle; ‖A‖_F².
    var fro: f32 = 0.0;
    for (var e = t; e < n * n; e = e + WG) {
        let r = e / n;
        let c = e % n;
        let v = mats[base + min(r, c) * n + max(r, c)];
        a[e] = v;
        fro = fro + v * v;
    }
    part[t] = fro;
    reduce_part(t);
    let tol = bitcast<f32>(params[3]);
    let limit = tol * tol * part[0];
    let m = n + (n % 2u);
    let half = m / 2u;
    for (var sweep = 0u; sweep < params[2]; sweep = sweep + 1u) {
        if (t == 0u) {
            atomicStore(&rotated, 0u);
        }
        workgroupBarrier();
        for (var r = 0u; r + 1u < m; r = r + 1u) {
            // Round r of the tournament: pairs (r + i, r − i) mod (m − 1), and (r, m − 1).
            if (t < half) {
                var x = r;
                var y = m - 1u;
                if (t > 0u) {
                    x = (r + t) % (m - 1u);
                    y = (r + (m - 1u) - t) % (m - 1u);
                }
                let p = min(x, y);
                let q = max(x, y);
                var cs = vec2<f32>(1.0, 0.0);
                if (q < n) {
                    let apq = a[p * n + q];
                    let app = a[p * n + p];
                    let aqq = a[q * n + q];
                    let small = abs(app) + 100.0 * abs(apq) == abs(app) && abs(aqq) + 100.0 * abs(apq) == abs(aqq);
                    if (apq != 0.0 && !small) {
                        let tau = (aqq - app) / (2.0 * apq);
                        var tt: f32;
                        if (abs(tau) > 1.0e18) {
                            tt = 0.5 / tau;
                        } else {
                            tt = sign(tau) / (abs(tau) + sqrt(1.0 + tau * tau));
                            if (tau == 0.0) {
                                tt = 1.0;
                            }
                        }
                        // c = 1/√(1 + t²), then one Newton step on c²(1 + t²) = 1: GPUs'
                        // sqrt and division may be a few ulp off (Vulkan allows it), and a
                        // rotation that is not orthogonal to ε scales the matrix at every step.
                        let w = 1.0 + tt * tt;
                        let c0 = 1.0 / sqrt(w);
                        let c = fma(0.5 * c0, fma(-(w * c0), c0, 1.0), c0);
                        cs = vec2<f32>(c, tt * c);
                        atomicOr(&rotated, 1u);
                    }
                }
                rot[t] = cs;
                pq[t] = vec2<u32>(p, q);
            }
            workgroupBarrier();
            // Columns p, q of every row: A·R.
            for (var e = t; e < half * n; e = e + WG) {
                let k = e / n;
                let i = e % n;
                let cs = rot[k];
                let p = pq[k].x;
                let q = pq[k].y;
                if (q < n && cs.y != 0.0) {
                    let ap = a[i * n + p];
                    let aq = a[i * n + q];
                    a[i * n + p] = cs.x * ap - cs.y * aq;
                    a[i * n + q] = cs.y * ap + cs.x * aq;
                }
            }
            workgroupBarrier();
            // Rows p, q of every column: Rᵀ·(A·R).
            for (var e = t; e < half * n; e = e + WG) {
                let k = e / n;
                let j = e % n;
                let cs = rot[k];
                let p = pq[k].x;
                let q = pq[k].y;
                if (q < n && cs.y != 0.0) {
                    let bp = a[p * n + j];
                    let bq = a[q * n + j];
                    a[p * n + j] = cs.x * bp - cs.y * bq;
                    a[q * n + j] = cs.y * bp + cs.x * bq;
                }
            }
            workgroupBarrier();
            if (t < half) {
                let p = pq[t].x;
                let q = pq[t].y;
                if (q < n && rot[t].y != 0.0) {
                    a[p * n + q] = 0.0;
                    a[q * n + p] = 0.0;
                }
            }
            workgroupBarrier();
        }
        // Off-diagonal norm after the sweep.
        var off: f32 = 0.0;
        for (var e = t; e < n * n; e = e + WG) {
            if (e / n != e % n) {
                off = off + a[e] * a[e];
            }
        }
        part[t] = off;
        reduce_part(t);
        if (t == 0u) {
            done = select(0u, 1u, part[0] <= limit || atomicLoad(&rotated) == 0u);
        }
        if (workgroupUniformLoad(&done) == 1u) {
            break;
        }
    }
    // Ascending by rank (ties by index).
    for (var i = t; i < n; i = i + WG) {
        let v = a[i * n + i];
        var rank = 0u;
        for (var j = 0u; j < n; j = j + 1u) {
            let w = a[j * n + j];
            if (w < v || (w == v && j < i)) {
                rank = rank + 1u;
            }
        }
        eig[mi * n + rank] = v;
    }
}
