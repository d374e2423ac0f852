// pool_grad.wgsl — the gradient of pool.wgsl: dx [N, C, H, W] from x and dy [N, C, OH, OW].
// Max pooling routes each window's dy to its first maximum; average pooling spreads it
// over the window. One invocation per input element visits the windows containing it in
// output order, so sums match the CPU twin (src/engine/cpu/window.rs::pool_grad) without
// atomics.
// Bindings (group 0):
//   0: x    array<f32>, read
//   1: dy   array<f32>, read
//   2: dx   array<f32>, read_write
//   3: params array<u32>, read: window [n_in, N, C, H, W, kh, kw, stride_h, stride_w,
//      dilation_h, dilation_w, pad_h, pad_w, OH, OW, row width], then
//      [kind (0 max, 1 average), count_pad]
// Dispatch: ceil(n_in / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<u32>;

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
    let sh = i32(params[7]);
    let sw = i32(params[8]);
    let dh = params[9];
    let dw = params[10];
    let ph = params[11];
    let pw = params[12];
    let oh = params[13];
    let ow = params[14];
    let is_max = params[16] == 0u;
    let ix = i % w;
    let iy = (i / w) % h;
    let plane = i / (w * h);
    let src = plane * h * w;
    let me = iy * w + ix;
    var acc: f32 = 0.0;
    // Taps in decreasing order visit windows in increasing output order.
    for (var a = 0u; a < kh; a = a + 1u) {
        let ki = kh - 1u - a;
        let ty = i32(iy + ph) - i32(ki * dh);
        if (ty < 0 || ty % sh != 0 || u32(ty / sh) >= oh) {
            continue;
        }
        let yo = u32(ty / sh);
        for (var bb = 0u; bb < kw; bb = bb + 1u) {
            let kj = kw - 1u - bb;
            let tx = i32(ix + pw) - i32(kj * dw);
            if (tx < 0 || tx % sw != 0 || u32(tx / sw) >= ow) {
                continue;
            }
            let xo = u32(tx / sw);
            let g = dy[(plane * oh + yo) * ow + xo];
            // The window of (yo, xo): its first maximum, or its in-range count.
            var best = 0xffffffffu;
            var bv: f32 = 0.0;
            var cnt = 0u;
            for (var qi = 0u; qi < kh; qi = qi + 1u) {
                let y2 = i32(yo * u32(sh) + qi * dh) - i32(ph);
                if (y2 < 0 || y2 >= i32(h)) {
                    continue;
                }
                for (var qj = 0u; qj < kw; qj = qj + 1u) {
                    let x2 = i32(xo * u32(sw) + qj * dw) - i32(pw);
                    if (x2 < 0 || x2 >= i32(w)) {
                        continue;
                    }
                    let o = u32(y2) * w + u32(x2);
                    let v = x[src + o];
                    if (best == 0xffffffffu || v > bv) {
                        best = o;
                        bv = v;
                    }
                    cnt = cnt + 1u;
                }
            }
            if (is_max) {
                if (best == me) {
                    acc = acc + g;
                }
            } else {
                var d = max(cnt, 1u);
                if (params[17] != 0u) {
                    d = kh * kw;
                }
                acc = acc + g / f32(d);
            }
        }
    }
    dx[i] = acc;
}
