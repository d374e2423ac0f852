// fill.wgsl — y[i] = value: the background of Embed (padding value, zeros of an adjoint)
// (CPU twin: the `vec![fill; n]` of src/engine/cpu/layout.rs::embed).
// Bindings (group 0):
//   0: y    array<f32>, read_write
//   1: params array<u32>, read: [n, bitcast<u32>(value), row width]
// Dispatch: ceil(n / 256) workgroups, split over x and y (index = x + y · row width).

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> params: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * params[2];
    if (i >= params[0]) {
        return;
    }
    y[i] = bitcast<f32>(params[1]);
}
