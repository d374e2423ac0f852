// gather_grad.wgsl — second half of GatherGrad: dx (zero-filled before, [outer, len, inner])
// gets, at row j of each outer block, the sum of dy over the indices naming j, added in
// index order by the invocation of the first such index (links from
// gather_grad_links.wgsl). CPU twin: src/engine/cpu/index.rs::gather_grad.
// Bindings (group 0):
//   0: dy    array<f32>, read   ([outer, n_idx, inner])
//   1: links array<u32>, read: [row[n_idx], first[n_idx], next[n_idx]]
//   2: dx    array<f32>, read_write
//   3: params array<u32>, read: [n (= outer · n_idx · inner), len, n_idx, inner, row width]
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> dy: array<f32>;
@group(0) @binding(1) var<storage, read> links: array<u32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

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
    if (links[nidx + q] == 0u) {
        return;
    }
    var acc: f32 = 0.0;
    var c = q;
    loop {
        if (c >= nidx) {
            break;
        }
        acc = acc + dy[(o * nidx + c) * inner + r];
        c = links[2u * nidx + c];
    }
    dx[(o * len + links[q]) * inner + r] = acc;
}
