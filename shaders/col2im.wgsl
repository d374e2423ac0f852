// col2im.wgsl — the adjoint of im2col: x [N, C, H, W] gets, at each position, the sum of
// the columns [C·kh·kw, N, OH·OW] that read it, in kernel-tap order as on the CPU (CPU
// twin: src/engine/cpu/window.rs::col2im). One invocation per output element, no atomics.
// Bindings (group 0):
//   0: cols array<f32>, read
//   1: x    array<f32>, read_write
//   2: params array<u32>, read: window [n_out, N, C, H, W, kh, kw, stride_h, stride_w,
//      dilation_h, dilation_w, pad_h, pad_w, OH, OW, row width]
// Dispatch: ceil(n_out / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> cols: array<f32>;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[15];
    if (i >= params[0]) {
        return;
    }
    let n = params[1];
    let c = params[2];
    let h = params[3];
    let w = params[4];
    let kh = params[5];
    let kw = params[6];
    let sh = i32(params[7]);
    let sw = i32(params[8]);
    let oh = i32(params[13]);
    let ow = i32(params[14]);
    let l = u32(oh * ow);
    let ix = i32(i % w);
    let iy = i32((i / w) % h);
    let ch = (i / (w * h)) % c;
    let b = i / (w * h * c);
    var acc: f32 = 0.0;
    for (var ki = 0u; ki < kh; ki = ki + 1u) {
        let ty = iy + i32(params[11]) - i32(ki * params[9]);
        if (ty < 0 || ty % sh != 0 || ty / sh >= oh) {
            continue;
        }
        let yo = ty / sh;
        for (var kj = 0u; kj < kw; kj = kj + 1u) {
            let tx = ix + i32(params[12]) - i32(kj * params[10]);
            if (tx < 0 || tx % sw != 0 || tx / sw >= ow) {
                continue;
            }
            let xo = tx / sw;
            let row = (ch * kh + ki) * kw + kj;
            acc = acc + cols[(row * n + b) * l + u32(yo * ow + xo)];
        }
    }
    x[i] = acc;
}
