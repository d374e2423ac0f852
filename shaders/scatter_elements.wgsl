// scatter_elements.wgsl — out = data, then out[idx element's multi-index with axis
// coordinate idx[i]] = updates[i] (or += when add) for every index element (CPU twin:
// src/engine/cpu/index.rs::scatter_elements). One invocation per output element scans
// the index elements on its line (same coordinates off the axis) in increasing order, so
// duplicates resolve as on the CPU (the last write wins; additions in order) without
// atomics. Negative indices count from the end; an out-of-range one sets flags[flag] = 1.
// Bindings (group 0):
//   0: data    array<f32>, read
//   1: idx     array<f32>, read
//   2: updates array<f32>, read   (the shape of idx)
//   3: out     array<f32>, read_write
//   4: flags   array<u32>, read_write
//   5: params  array<u32>, read: [n, rank, axis, add, row width, flag, 0, 0,
//      data_shape[8], idx_shape[8], idx_stride[8]]
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> data: array<f32>;
@group(0) @binding(1) var<storage, read> idx: array<f32>;
@group(0) @binding(2) var<storage, read> updates: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> flags: array<u32>;
@group(0) @binding(5) var<storage, read> params: array<u32>;

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

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * params[4];
    if (e >= params[0]) {
        return;
    }
    let rank = params[1];
    let axis = params[2];
    let add = params[3] != 0u;
    let dim = params[8u + axis];
    var v = data[e];
    var rem = e;
    var line = 0u;
    var j = 0u;
    var inside = true;
    for (var k = 0u; k < rank; k = k + 1u) {
        let ax = rank - 1u - k;
        let c = rem % params[8u + ax];
        rem = rem / params[8u + ax];
        if (ax == axis) {
            j = c;
        } else if (c < params[16u + ax]) {
            line = line + c * params[24u + ax];
        } else {
            inside = false;
        }
    }
    if (inside) {
        let n = params[16u + axis];
        let st = params[24u + axis];
        for (var p = 0u; p < n; p = p + 1u) {
            let i = line + p * st;
            let t = index_of(idx[i], dim);
            if (t < 0) {
                flags[params[5]] = 1u;
            } else if (u32(t) == j) {
                if (add) {
                    v = v + updates[i];
                } else {
                    v = updates[i];
                }
            }
        }
    }
    out[e] = v;
}
