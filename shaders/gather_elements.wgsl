// gather_elements.wgsl — out[i] = data[i's multi-index with axis coordinate idx[i]] over the
// indices' shape (CPU twin: src/engine/cpu/index.rs::gather_elements). Negative indices
// count from the end; an out-of-range one sets flags[flag] = 1 and writes 0.
// Bindings (group 0):
//   0: data  array<f32>, read
//   1: idx   array<f32>, read
//   2: out   array<f32>, read_write
//   3: flags array<u32>, read_write
//   4: params array<u32>, read: [n, rank, axis, data dim along axis, row width, flag, 0, 0,
//      idx_shape[8], data_stride[8]]
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> data: array<f32>;
@group(0) @binding(1) var<storage, read> idx: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> flags: array<u32>;
@group(0) @binding(4) var<storage, read> params: array<u32>;

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
    let rank = params[1];
    let axis = params[2];
    let j = index_of(idx[i], params[3]);
    if (j < 0) {
        flags[params[5]] = 1u;
        out[i] = 0.0;
        return;
    }
    var rem = i;
    var off = 0u;
    for (var k = 0u; k < rank; k = k + 1u) {
        let ax = rank - 1u - k;
        let d = params[8u + ax];
        var c = rem % d;
        rem = rem / d;
        if (ax == axis) {
            c = u32(j);
        }
        off = off + c * params[16u + ax];
    }
    out[i] = data[off];
}
