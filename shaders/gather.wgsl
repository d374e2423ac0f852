// gather.wgsl — Gather along an axis: out[o, q, r] = data[o, idx[q], r] with data viewed as
// [outer, len, inner] and the indices flattened to [n_idx] (CPU twin:
// src/engine/cpu/index.rs::gather). Indices are floats; negative ones count from the end;
// an out-of-range index sets flags[flag] = 1 (the executor turns it into an error) and
// writes 0.
// Bindings (group 0):
//   0: data  array<f32>, read
//   1: idx   array<f32>, read
//   2: out   array<f32>, read_write
//   3: flags array<u32>, read_write
//   4: params array<u32>, read: [n, len, n_idx, inner, row width, flag]
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> data: array<f32>;
@group(0) @binding(1) var<storage, read> idx: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> flags: array<u32>;
@group(0) @binding(4) var<storage, read> params: array<u32>;

// The index `v` into a dimension of `dim`, or -1 when out of range.
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
    let i = gid.x + gid.y * params[4];
    if (i >= params[0]) {
        return;
    }
    let len = params[1];
    let nidx = params[2];
    let inner = params[3];
    let r = i % inner;
    let t = i / inner;
    let q = t % nidx;
    let o = t / nidx;
    let j = index_of(idx[q], len);
    if (j < 0) {
        flags[params[5]] = 1u;
        out[i] = 0.0;
        return;
    }
    out[i] = data[(o * len + u32(j)) * inner + r];
}
