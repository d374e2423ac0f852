//! Every WGSL kernel matches its CPU twin on random shapes, including sizes that are not
//! multiples of the tile (16) or workgroup (256) sizes. Runs on any wgpu adapter, software
//! Vulkan (lavapipe) included; without one it prints a note, and fails under CI=true.

mod engine_util;

use engine_util::rand_vec;
use plprune_onnx::engine::cpu;
use plprune_onnx::engine::gpu::{kernels, GpuContext};
use plprune_onnx::engine::program::{strides, BinaryOp, ReduceOp, UnaryOp};

fn context() -> Option<GpuContext> {
    std::env::set_var("NODEVICE_SELECT", "1");
    match GpuContext::new(true).expect("wgpu") {
        Some(c) => Some(c),
        None if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("CI: no wgpu adapter found (apt install mesa-vulkan-drivers libvulkan1)")
        }
        None => {
            eprintln!("note: no wgpu adapter; GPU kernel tests skipped locally");
            None
        }
    }
}

fn f32s(n: usize, seed: u64) -> Vec<f32> {
    rand_vec(n, seed).into_iter().map(|v| (2.0 * v) as f32).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}: element {i}: gpu {x} vs cpu {y}");
    }
}

#[test]
fn gpu_kernels_match_cpu_twins() {
    let Some(cx) = context() else { return };
    eprintln!("adapter: {} ({:?})", cx.info.name, cx.info.device_type);
    // Unary, all ops, odd length.
    let n = 1000 + 37;
    let x = f32s(n, 1);
    let xp: Vec<f32> = x.iter().map(|v| v.abs() + 0.1).collect();
    let gx = cx.upload(&x);
    let gxp = cx.upload(&xp);
    let ops = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Recip,
        UnaryOp::Erf,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Abs,
        UnaryOp::Floor,
        UnaryOp::Ceil,
        UnaryOp::Trunc,
        UnaryOp::NonZero,
        UnaryOp::Not,
        UnaryOp::Affine(0.5, 0.25),
        UnaryOp::Clip(-0.5, 0.7),
        UnaryOp::HardSigmoid(0.2, 0.5),
    ];
    for op in ops {
        let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip);
        let (src, buf) = if positive { (&xp, &gxp) } else { (&x, &gx) };
        let g = cx.read(&kernels::unary(&cx, op, buf, n).unwrap(), n).unwrap();
        close(&g, &cpu::elementwise::unary(op, src), 2e-5, &format!("{op:?}"));
    }
    // Binary with broadcasting.
    for (sa, sb) in [
        (vec![3, 17, 19], vec![19]),
        (vec![5, 1, 7], vec![1, 9, 7]),
        (vec![33, 65], vec![33, 65]),
        (vec![2, 3, 1, 5], vec![4, 1]),
    ] {
        let os = plprune_onnx::engine::program::broadcast_shapes(&sa, &sb).unwrap();
        let a = f32s(sa.iter().product(), 2);
        let b: Vec<f32> = f32s(sb.iter().product(), 3).iter().map(|v| v.abs() + 0.5).collect();
        let (ga, gb) = (cx.upload(&a), cx.upload(&b));
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Greater] {
            let g = kernels::binary(&cx, op, &ga, &sa, &gb, &sb, &os).unwrap();
            let g = cx.read(&g, os.iter().product()).unwrap();
            close(&g, &cpu::elementwise::binary(op, &a, &sa, &b, &sb, &os), 1e-5, &format!("{op:?} {sa:?} {sb:?}"));
        }
    }
    // Batched matmul: odd sizes, transposes, broadcast batch.
    for (sa, sb, ta, tb) in [
        (vec![17, 33], vec![33, 5], false, false),
        (vec![3, 20, 31], vec![31, 18], false, false),
        (vec![2, 3, 7, 9], vec![3, 11, 7], true, true),
        (vec![4, 1, 19, 23], vec![1, 5, 19, 3], true, false),
    ] {
        let (ra, rb) = (sa.len(), sb.len());
        let m = if ta { sa[ra - 1] } else { sa[ra - 2] };
        let nn = if tb { sb[rb - 2] } else { sb[rb - 1] };
        let mut os = plprune_onnx::engine::program::broadcast_shapes(&sa[..ra - 2], &sb[..rb - 2]).unwrap();
        os.push(m);
        os.push(nn);
        let a = f32s(sa.iter().product(), 4);
        let b = f32s(sb.iter().product(), 5);
        let g = kernels::matmul(&cx, &cx.upload(&a), &sa, &cx.upload(&b), &sb, ta, tb, &os).unwrap();
        let g = cx.read(&g, os.iter().product()).unwrap();
        close(&g, &cpu::matmul::matmul(&a, &sa, &b, &sb, ta, tb, &os), 1e-4, &format!("matmul {sa:?} {sb:?}"));
    }
    // Transpose and slice.
    let s = vec![3, 5, 7, 2];
    let x = f32s(210, 6);
    let g = cx.read(&kernels::transpose(&cx, &cx.upload(&x), &s, &[2, 0, 3, 1]).unwrap(), 210).unwrap();
    close(&g, &cpu::layout::transpose(&x, &s, &[2, 0, 3, 1]), 0.0, "transpose");
    let xs = strides(&s);
    let (starts, steps, out) = ([1usize, 4, 0, 1], [1isize, -2, 3, 1], [2usize, 3, 3, 1]);
    let base: isize = starts.iter().zip(&xs).map(|(&a, &b)| (a * b) as isize).sum();
    let st: Vec<isize> = steps.iter().zip(&xs).map(|(&p, &t)| p * t as isize).collect();
    let g = cx.read(&kernels::strided_copy(&cx, &cx.upload(&x), base, &st, &out).unwrap(), 18).unwrap();
    close(&g, &cpu::layout::slice(&x, &s, &starts, &steps, &out), 0.0, "slice");
    // Trailing reductions.
    let (rows, len) = (37, 129);
    let x = f32s(rows * len, 7);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
        let g = cx.read(&kernels::reduce_rows(&cx, op, &cx.upload(&x), rows, len).unwrap(), rows).unwrap();
        close(&g, &cpu::reduce::reduce(op, &x, &[rows, len], &[1]), 1e-4, &format!("{op:?}"));
    }
}
