// gather_grad_links.wgsl — first half of GatherGrad (the adjoint of Gather): for each
// index q, its row j (or 0xffffffff when out of range, which sets flags[flag] = 1), whether
// q is the first index naming j, and the next index naming j (n_idx when none). The second
// half (gather_grad.wgsl) sums dy along these chains in index order, as the CPU twin
// (src/engine/cpu/index.rs::gather_grad) does, without atomics.
// Bindings (group 0):
//   0: idx   array<f32>, read
//   1: links array<u32>, read_write: [row[n_idx], first[n_idx], next[n_idx]]
//   2: flags array<u32>, read_write
//   3: params array<u32>, read: [n_idx, len, row width, flag]
// Dispatch: ceil(n_idx / 64) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> idx: array<f32>;
@group(0) @binding(1) var<storage, read_write> links: array<u32>;
@group(0) @binding(2) var<storage, read_write> flags: array<u32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

fn index_of(v: f32, dim: u32) -> i32 {
    var i = i32(v);
    if (i < 0) {
        i = i + i32(dim);
    }
    if (i < 0 || i >= i32(dim)) {
        return -1;
    }
    return i;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let q = gid.x + gid.y * params[2];
    let nidx = params[0];
    if (q >= nidx) {
        return;
    }
    let len = params[1];
    let j = index_of(idx[q], len);
    if (j < 0) {
        flags[params[3]] = 1u;
        links[q] = 0xffffffffu;
        links[nidx + q] = 0u;
        links[2u * nidx + q] = nidx;
        return;
    }
    var first = 1u;
    for (var p = 0u; p < q; p = p + 1u) {
        if (index_of(idx[p], len) == j) {
            first = 0u;
            break;
        }
    }
    var next = nidx;
    for (var p = q + 1u; p < nidx; p = p + 1u) {
        if (index_of(idx[p], len) == j) {
            next = p;
            break;
        }
    }
    links[q] = u32(j);
    links[nidx + q] = first;
    links[2u * nidx + q] = next;
}
