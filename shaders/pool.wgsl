// pool.wgsl — 2-D max or average pooling of x [N, C, H, W] to [N, C, OH, OW]; padded
// positions are skipped, average divides by the in-range count (or by kh·kw with
// count_pad) (CPU twin: src/engine/cpu/window.rs::pool).
// Bindings (group 0):
//   0: x    array<f32>, read
//   1: y    array<f32>, read_write
//   2: params array<u32>, read: window [n_out, N, C, H, W, kh, kw, stride_h, stride_w,
//      dilation_h, dilation_w, pad_h, pad_w, OH, OW, row width], then
//      [kind (0 max, 1 average), count_pad, bitcast<u32>(-inf)]
// Dispatch: ceil(n_out / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[15];
    if (i >= params[0]) {
        return;
    }
    let h = params[3];
    let w = params[4];
    let kh = params[5];
    let kw = params[6];
    let oh = params[13];
    let ow = params[14];
    let xo = i % ow;
    let yo = (i / ow) % oh;
    let plane = i / (oh * ow);
    let is_max = params[16] == 0u;
    var m = bitcast<f32>(params[18]);
    var s: f32 = 0.0;
    var cnt = 0u;
    for (var ki = 0u; ki < kh; ki = ki + 1u) {
        let iy = i32(yo * params[7] + ki * params[9]) - i32(params[11]);
        if (iy < 0 || iy >= i32(h)) {
            continue;
        }
        for (var kj = 0u; kj < kw; kj = kj + 1u) {
            let ix = i32(xo * params[8] + kj * params[10]) - i32(params[12]);
            if (ix < 0 || ix >= i32(w)) {
                continue;
            }
            let v = x[(plane * h + u32(iy)) * w + u32(ix)];
            m = max(m, v);
            s = s + v;
            cnt = cnt + 1u;
        }
    }
    if (is_max) {
        y[i] = m;
    } else {
        var d = max(cnt, 1u);
        if (params[17] != 0u) {
            d = kh * kw;
        }
        y[i] = s / f32(d);
    }
}
