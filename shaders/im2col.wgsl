// im2col.wgsl — a convolution's input x [N, C, H, W] unfolded to columns
// [C·kh·kw, N, OH·OW]; padded positions read 0 (CPU twin: src/engine/cpu/window.rs::im2col).
// Bindings (group 0):
//   0: x    array<f32>, read
//   1: cols array<f32>, read_write
//   2: params array<u32>, read: window [n_out, N, C, H, W, kh, kw, stride_h, stride_w,
//      dilation_h, dilation_w, pad_h, pad_w, OH, OW, row width]
// Dispatch: ceil(n_out / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> cols: array<f32>;
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
    let oh = params[13];
    let ow = params[14];
    let l = oh * ow;
    let xo = i % ow;
    let yo = (i / ow) % oh;
    let b = (i / l) % n;
    let row = i / (l * n);
    let kj = row % kw;
    let ki = (row / kw) % kh;
    let ch = row / (kh * kw);
    let iy = i32(yo * params[7] + ki * params[9]) - i32(params[11]);
    let ix = i32(xo * params[8] + kj * params[10]) - i32(params[12]);
    var v: f32 = 0.0;
    if (iy >= 0 && iy < i32(h) && ix >= 0 && ix < i32(w)) {
        v = x[((b * c + ch) * h + u32(iy)) * w + u32(ix)];
    }
    cols[i] = v;
}
