//! Every WGSL kernel matches its CPU twin on random shapes, including sizes that are not
//! multiples of the tile (16) or workgroup (256) sizes. Runs on any wgpu adapter, software
//! Vulkan (lavapipe) included; without one it prints a note, and fails under CI=true.

mod engine_util;

use engine_util::rand_vec;
use plprune_onnx::engine::cpu;
use plprune_onnx::engine::gpu::kernels::{self, MatMulKernel};
use plprune_onnx::engine::gpu::GpuContext;
use plprune_onnx::engine::program::{broadcast_shapes, strides, BinaryOp, PoolKind, ReduceOp, UnaryOp, Window};

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
        let same = x == y || (x.is_nan() && y.is_nan());
        assert!(same || (x - y).abs() <= tol * (1.0 + y.abs()), "{what}: element {i}: gpu {x} vs cpu {y}");
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
        UnaryOp::IsNaN,
        UnaryOp::IsInf(true, true),
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
    // NaN and ±∞ (random data has none): the tests read bits, as compilers may assume
    // floats are finite.
    let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.5, -2.0, f32::MAX, -f32::NAN];
    let gs = cx.upload(&special);
    for (op, want) in [
        (UnaryOp::IsNaN, [1., 0., 0., 0., 0., 0., 0., 0., 1.]),
        (UnaryOp::IsInf(true, true), [0., 1., 1., 0., 0., 0., 0., 0., 0.]),
        (UnaryOp::IsInf(true, false), [0., 1., 0., 0., 0., 0., 0., 0., 0.]),
        (UnaryOp::IsInf(false, true), [0., 0., 1., 0., 0., 0., 0., 0., 0.]),
    ] {
        let g = cx.read(&kernels::unary(&cx, op, &gs, special.len()).unwrap(), special.len()).unwrap();
        assert_eq!(g, want, "{op:?} on the GPU");
        assert_eq!(cpu::elementwise::unary(op, &special), want, "{op:?} on the CPU");
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
    // Batched matmul: odd sizes, transposes, broadcast batch; tiled (M, N, K ≥ 16) and thin
    // (depthwise-convolution and matrix-vector shapes).
    for (sa, sb, ta, tb) in [
        (vec![17, 33], vec![33, 5], false, false),
        (vec![3, 20, 31], vec![31, 18], false, false),
        (vec![2, 3, 7, 9], vec![3, 11, 7], true, true),
        (vec![4, 1, 19, 23], vec![1, 5, 19, 3], true, false),
        (vec![37, 1, 9], vec![37, 9, 300], false, false),
        (vec![2, 40, 3], vec![5, 40], true, true),
        // 64×64 register-blocked tiles: ragged edges, each transpose, a broadcast batch.
        (vec![130, 70], vec![70, 67], false, false),
        (vec![2, 33, 129], vec![2, 65, 33], true, true),
        (vec![3, 64, 64], vec![1, 80, 64], false, true),
        (vec![1, 17, 100], vec![2, 17, 96], true, false),
    ] {
        let (ra, rb) = (sa.len(), sb.len());
        let m = if ta { sa[ra - 1] } else { sa[ra - 2] };
        let nn = if tb { sb[rb - 2] } else { sb[rb - 1] };
        let mut os = plprune_onnx::engine::program::broadcast_shapes(&sa[..ra - 2], &sb[..rb - 2]).unwrap();
        os.push(m);
        os.push(nn);
        let a = f32s(sa.iter().product(), 4);
        let b = f32s(sb.iter().product(), 5);
        let want = cpu::matmul::matmul(&a, &sa, &b, &sb, ta, tb, &os);
        let (ga, gb) = (cx.upload(&a), cx.upload(&b));
        let g = kernels::matmul(&cx, &ga, &sa, &gb, &sb, ta, tb, &os).unwrap();
        close(&cx.read(&g, want.len()).unwrap(), &want, 1e-4, &format!("matmul {sa:?} {sb:?}"));
        for kernel in [
            MatMulKernel::Thin,
            MatMulKernel::Tiled { max_groups: 65_535 },
            MatMulKernel::Blocked { max_groups: 65_535 },
        ] {
            let g = kernels::matmul_with(&cx, kernel, &ga, &sa, &gb, &sb, ta, tb, &os).unwrap();
            close(&cx.read(&g, want.len()).unwrap(), &want, 1e-4, &format!("matmul {kernel:?} {sa:?} {sb:?}"));
        }
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

/// Float indices in [-dim, dim) (negatives count from the end), or [0, dim) without them.
fn indices(n: usize, dim: usize, seed: u64, negative: bool) -> Vec<f32> {
    rand_vec(n, seed)
        .into_iter()
        .map(|v| {
            let u = ((v + 1.0) / 2.0 * dim as f64) as i64 % dim as i64;
            (if negative && v < 0.0 { u - dim as i64 } else { u }) as f32
        })
        .collect()
}

/// Values on a coarse grid so that ties are common (argmax, top-k, max pooling).
fn coarse(n: usize, seed: u64) -> Vec<f32> {
    f32s(n, seed).into_iter().map(|v| (v * 2.0).round()).collect()
}

fn flags(cx: &GpuContext) -> wgpu::Buffer {
    cx.empty(1)
}

fn flag_set(cx: &GpuContext, f: &wgpu::Buffer) -> bool {
    cx.read(f, 1).unwrap()[0].to_bits() != 0
}

/// A window with the output size that padding `pad` on both sides gives.
fn window(input: [usize; 4], kernel: [usize; 2], stride: [usize; 2], dilation: [usize; 2], pad: [usize; 2]) -> Window {
    let out = |a: usize| (input[2 + a] + 2 * pad[a] - dilation[a] * (kernel[a] - 1) - 1) / stride[a] + 1;
    Window { kernel, stride, dilation, pad, input, output: [out(0), out(1)] }
}

#[test]
fn gpu_elementwise_reduce_layout_kernels_match_cpu_twins() {
    let Some(cx) = context() else { return };
    // UnaryGrad, all ops, odd length.
    let n = 1000 + 37;
    let x = f32s(n, 11);
    let xp: Vec<f32> = x.iter().map(|v| v.abs() + 0.1).collect();
    let dy = f32s(n, 12);
    let (gx, gxp, gdy) = (cx.upload(&x), cx.upload(&xp), cx.upload(&dy));
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
        UnaryOp::IsNaN,
        UnaryOp::IsInf(true, true),
        UnaryOp::Affine(0.5, 0.25),
        UnaryOp::Clip(-0.5, 0.7),
        UnaryOp::HardSigmoid(0.2, 0.5),
    ];
    for op in ops {
        let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip);
        let (src, buf) = if positive { (&xp, &gxp) } else { (&x, &gx) };
        let g = cx.read(&kernels::unary_grad(&cx, op, buf, &gdy, n).unwrap(), n).unwrap();
        close(&g, &cpu::elementwise::unary_grad(op, src, &dy), 2e-5, &format!("grad {op:?}"));
    }
    // Tanh far from 0 stays finite (some drivers build it from exp).
    let big = [-100.0f32, -20.0, 20.0, 100.0];
    let g = cx.read(&kernels::unary(&cx, UnaryOp::Tanh, &cx.upload(&big), 4).unwrap(), 4).unwrap();
    close(&g, &cpu::elementwise::unary(UnaryOp::Tanh, &big), 0.0, "tanh far out");
    // Pow of negative bases with integer exponents, and of zero.
    let a = [-2.0f32, -1.5, -3.0, 0.0, 0.0, 2.5, -2.0];
    let b = [3.0f32, 2.0, -1.0, 3.0, 0.0, 0.5, 4.0];
    for op in [BinaryOp::Pow, BinaryOp::PowGrad] {
        let g = kernels::binary(&cx, op, &cx.upload(&a), &[7], &cx.upload(&b), &[7], &[7]).unwrap();
        close(
            &cx.read(&g, 7).unwrap(),
            &cpu::elementwise::binary(op, &a, &[7], &b, &[7], &[7]),
            1e-5,
            &format!("{op:?}"),
        );
    }
    // Where with three-way broadcasting.
    for (sc, sa, sb) in [
        (vec![3, 1, 5], vec![4, 1], vec![3, 4, 5]),
        (vec![1, 17, 19], vec![2, 17, 19], vec![19]),
        (vec![7], vec![1], vec![1]),
    ] {
        let os = broadcast_shapes(&broadcast_shapes(&sc, &sa).unwrap(), &sb).unwrap();
        let c: Vec<f32> = f32s(sc.iter().product(), 13).iter().map(|v| (*v > 0.0) as u8 as f32).collect();
        let (av, bv) = (f32s(sa.iter().product(), 14), f32s(sb.iter().product(), 15));
        let g =
            kernels::where_(&cx, (&cx.upload(&c), &sc), (&cx.upload(&av), &sa), (&cx.upload(&bv), &sb), &os).unwrap();
        let want = cpu::elementwise::where_((&c, &sc), (&av, &sa), (&bv, &sb), &os);
        close(&cx.read(&g, want.len()).unwrap(), &want, 0.0, &format!("where {sc:?} {sa:?} {sb:?}"));
    }
    // Reductions over every kind of axis set.
    let s = vec![3, 5, 7, 4];
    let x = f32s(s.iter().product(), 16);
    let gx = cx.upload(&x);
    let axis_sets: [&[usize]; 9] = [&[0], &[1], &[2], &[3], &[0, 2], &[3, 1], &[0, 1, 2, 3], &[], &[1, 2, 3]];
    for axes in axis_sets {
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
            let want = cpu::reduce::reduce(op, &x, &s, axes);
            let g = cx.read(&kernels::reduce(&cx, op, &gx, &s, axes).unwrap(), want.len()).unwrap();
            close(&g, &want, 1e-5, &format!("reduce {op:?} {axes:?}"));
        }
    }
    let (rows, len) = (301, 257);
    let x = f32s(rows * len, 17);
    for axes in [&[0usize][..], &[1]] {
        let want = cpu::reduce::reduce(ReduceOp::Sum, &x, &[rows, len], axes);
        let g = cx.read(&kernels::reduce(&cx, ReduceOp::Sum, &cx.upload(&x), &[rows, len], axes).unwrap(), want.len());
        close(&g.unwrap(), &want, 1e-5, &format!("reduce sum {axes:?} of {rows}×{len}"));
    }
    // One block of adjacent axes of at least 256 elements takes two passes (partials over
    // row ranges): leading, trailing and middle blocks, ragged splits, every op, one
    // output, every axis.
    for (s, axes) in [
        (vec![7, 41, 13], vec![0usize, 1]),
        (vec![4, 64, 96], vec![0, 1]),
        (vec![1000, 3], vec![0]),
        (vec![300, 1], vec![0]),
        (vec![5, 9, 11], vec![0, 1, 2]),
        (vec![2, 3, 17, 19], vec![2, 3]),
        (vec![3, 300, 5], vec![1]),
        (vec![2, 6, 50, 7], vec![1, 2]),
    ] {
        let x = f32s(s.iter().product(), 19);
        let gx = cx.upload(&x);
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
            let want = cpu::reduce::reduce(op, &x, &s, &axes);
            let g = cx.read(&kernels::reduce(&cx, op, &gx, &s, &axes).unwrap(), want.len()).unwrap();
            close(&g, &want, 1e-5, &format!("reduce {op:?} {axes:?} of {s:?}"));
        }
    }
    // Broadcast (Expand), including one past 65,535 workgroups (the 2-D grid).
    for (sx, so) in [(vec![3, 1, 5], vec![2, 3, 4, 5]), (vec![1], vec![300]), (vec![257, 1], vec![257, 65_535])] {
        let x = f32s(sx.iter().product(), 18);
        let want = cpu::elementwise::broadcast(&x, &sx, &so);
        let g = cx.read(&kernels::broadcast(&cx, &cx.upload(&x), &sx, &so).unwrap(), want.len()).unwrap();
        close(&g, &want, 0.0, &format!("broadcast {sx:?} → {so:?}"));
    }
    // Slice and its adjoint Embed, negative steps included.
    let s = vec![3, 5, 7, 2];
    let x = f32s(210, 19);
    let (starts, steps, out) = ([1usize, 4, 0, 1], [1isize, -2, 3, 1], [2usize, 3, 3, 1]);
    let g = cx.read(&kernels::slice(&cx, &cx.upload(&x), &s, &starts, &steps, &out).unwrap(), 18).unwrap();
    close(&g, &cpu::layout::slice(&x, &s, &starts, &steps, &out), 0.0, "slice");
    let small = f32s(18, 20);
    let want = cpu::layout::embed(&small, &out, &starts, &steps, -1.5, &s);
    let g = cx.read(&kernels::embed(&cx, &cx.upload(&small), &out, &starts, &steps, -1.5, &s).unwrap(), 210).unwrap();
    close(&g, &want, 0.0, "embed");
    // Concat along each axis of three parts.
    for axis in 0..3 {
        let shapes: Vec<Vec<usize>> = (0..3)
            .map(|k| {
                let mut sh = vec![2, 3, 5];
                sh[axis] = k + 1;
                sh
            })
            .collect();
        let data: Vec<Vec<f32>> =
            shapes.iter().enumerate().map(|(k, sh)| f32s(sh.iter().product(), 21 + k as u64)).collect();
        let mut os = vec![2, 3, 5];
        os[axis] = 6;
        let parts: Vec<(&[f32], &[usize])> =
            data.iter().zip(&shapes).map(|(d, s)| (d.as_slice(), s.as_slice())).collect();
        let want = cpu::layout::concat(&parts, axis, &os);
        let bufs: Vec<wgpu::Buffer> = data.iter().map(|d| cx.upload(d)).collect();
        let gparts: Vec<(&wgpu::Buffer, &[usize])> = bufs.iter().zip(&shapes).map(|(b, s)| (b, s.as_slice())).collect();
        let g = cx.read(&kernels::concat(&cx, &gparts, axis, &os).unwrap(), want.len()).unwrap();
        close(&g, &want, 0.0, &format!("concat axis {axis}"));
    }
    // Matmul grids split over several dispatches (at 65,535 workgroups per dimension on
    // real shapes; here at 3, so the split is exercised on small ones).
    for (sa, sb, ta, tb) in [
        (vec![7, 50, 37], vec![7, 37, 70], false, false),
        (vec![2, 4, 37, 50], vec![4, 70, 37], true, true),
        (vec![3, 130, 20], vec![20, 70], false, false),
    ] {
        let (ra, rb) = (sa.len(), sb.len());
        let m = if ta { sa[ra - 1] } else { sa[ra - 2] };
        let nn = if tb { sb[rb - 2] } else { sb[rb - 1] };
        let mut os = broadcast_shapes(&sa[..ra - 2], &sb[..rb - 2]).unwrap();
        os.extend([m, nn]);
        let (a, b) = (f32s(sa.iter().product(), 24), f32s(sb.iter().product(), 25));
        let want = cpu::matmul::matmul(&a, &sa, &b, &sb, ta, tb, &os);
        for kernel in [MatMulKernel::Tiled { max_groups: 3 }, MatMulKernel::Blocked { max_groups: 1 }] {
            let g = kernels::matmul_with(&cx, kernel, &cx.upload(&a), &sa, &cx.upload(&b), &sb, ta, tb, &os).unwrap();
            close(
                &cx.read(&g, want.len()).unwrap(),
                &want,
                1e-4,
                &format!("matmul {kernel:?} in chunks {sa:?} {sb:?}"),
            );
        }
    }
}

#[test]
fn gpu_index_kernels_match_cpu_twins() {
    let Some(cx) = context() else { return };
    // Gather, with negative and repeated indices, on each axis; a scalar index.
    let ds = vec![4, 7, 3];
    let data = f32s(84, 30);
    let gd = cx.upload(&data);
    for axis in 0..3 {
        for n_idx in [1, 5, 300] {
            let idx = indices(n_idx, ds[axis], 31 + n_idx as u64, true);
            let f = flags(&cx);
            let fl = kernels::Flag { flags: &f, at: 0 };
            let want = cpu::index::gather(&data, &ds, &idx, axis).unwrap();
            let g = kernels::gather(&cx, &gd, &ds, &cx.upload(&idx), n_idx, axis, fl).unwrap();
            close(&cx.read(&g, want.len()).unwrap(), &want, 0.0, &format!("gather axis {axis} × {n_idx}"));
            assert!(!flag_set(&cx, &f));
            // Its adjoint: duplicates summed in index order.
            let dy = f32s(want.len(), 32);
            let want = cpu::index::gather_grad(&idx, &dy, &ds, axis).unwrap();
            let g = kernels::gather_grad(&cx, &cx.upload(&idx), n_idx, &cx.upload(&dy), &ds, axis, fl).unwrap();
            close(&cx.read(&g, want.len()).unwrap(), &want, 0.0, &format!("gather_grad axis {axis} × {n_idx}"));
            assert!(!flag_set(&cx, &f));
        }
    }
    // An embedding-sized adjoint: many rows, few of them gathered.
    let ds = vec![3000, 5];
    let idx = indices(700, 3000, 33, false);
    let dy = f32s(700 * 5, 34);
    let f = flags(&cx);
    let want = cpu::index::gather_grad(&idx, &dy, &ds, 0).unwrap();
    let g =
        kernels::gather_grad(&cx, &cx.upload(&idx), 700, &cx.upload(&dy), &ds, 0, kernels::Flag { flags: &f, at: 0 });
    close(&cx.read(&g.unwrap(), want.len()).unwrap(), &want, 0.0, "gather_grad 3000 rows");
    // Out-of-range indices raise the flag (the CPU twin errors).
    let bad = [0.0f32, 7.0];
    assert!(cpu::index::gather(&data, &[4, 7, 3], &bad, 1).is_err());
    let f = cx.empty(3);
    let _ = kernels::gather(&cx, &gd, &[4, 7, 3], &cx.upload(&bad), 2, 1, kernels::Flag { flags: &f, at: 2 }).unwrap();
    let fv = cx.read(&f, 3).unwrap();
    assert!(fv[0].to_bits() == 0 && fv[2].to_bits() != 0, "gather flags {fv:?}");
    let f = flags(&cx);
    let _ = kernels::gather_grad(
        &cx,
        &cx.upload(&[-8.0f32]),
        1,
        &cx.upload(&[1.0; 3]),
        &[4, 7, 3],
        1,
        kernels::Flag { flags: &f, at: 0 },
    );
    assert!(flag_set(&cx, &f), "gather_grad flag");
    // GatherElements and ScatterElements (replace and add), duplicates included, with
    // index shapes smaller than the data off the axis.
    let ds = vec![4, 6, 5];
    let data = f32s(120, 35);
    for (is, axis) in
        [(vec![4, 3, 5], 1), (vec![2, 9, 4], 1), (vec![3, 6, 5], 0), (vec![4, 6, 2], 2), (vec![1, 1, 1], 0)]
    {
        let ni: usize = is.iter().product();
        let idx = indices(ni, ds[axis], 36 + ni as u64, true);
        let f = flags(&cx);
        let fl = kernels::Flag { flags: &f, at: 0 };
        let want = cpu::index::gather_elements(&data, &ds, &idx, &is, axis).unwrap();
        let g = kernels::gather_elements(&cx, &cx.upload(&data), &ds, &cx.upload(&idx), &is, axis, fl).unwrap();
        close(&cx.read(&g, ni).unwrap(), &want, 0.0, &format!("gather_elements {is:?} axis {axis}"));
        let upd = f32s(ni, 37);
        for add in [false, true] {
            let want = cpu::index::scatter_elements(&data, &ds, &idx, &is, &upd, axis, add).unwrap();
            let g = kernels::scatter_elements(
                &cx,
                &cx.upload(&data),
                &ds,
                &cx.upload(&idx),
                &is,
                &cx.upload(&upd),
                axis,
                add,
                fl,
            )
            .unwrap();
            close(&cx.read(&g, 120).unwrap(), &want, 0.0, &format!("scatter_elements {is:?} axis {axis} add {add}"));
        }
        assert!(!flag_set(&cx, &f));
    }
    let f = flags(&cx);
    let fl = kernels::Flag { flags: &f, at: 0 };
    let _ = kernels::scatter_elements(
        &cx,
        &cx.upload(&data),
        &ds,
        &cx.upload(&[6.0f32]),
        &[1, 1, 1],
        &cx.upload(&[1.0]),
        1,
        false,
        fl,
    );
    assert!(flag_set(&cx, &f), "scatter_elements flag");
    // ArgMax / ArgMin with ties, first or last.
    let s = vec![5, 9, 7];
    let x = coarse(315, 38);
    let gx = cx.upload(&x);
    for axis in 0..3 {
        for (select_last, min) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = cpu::index::argmax(&x, &s, axis, select_last, min);
            let g = cx.read(&kernels::argmax(&cx, &gx, &s, axis, select_last, min).unwrap(), want.len()).unwrap();
            close(&g, &want, 0.0, &format!("argmax axis {axis} last {select_last} min {min}"));
        }
    }
    // Top-k indices with ties (stable order).
    let s = vec![5, 13, 7];
    let x = coarse(455, 39);
    let gx = cx.upload(&x);
    for axis in 0..3 {
        for k in [1, 3, s[axis]] {
            for largest in [true, false] {
                let want = cpu::index::topk_indices(&x, &s, axis, k, largest);
                let g = kernels::topk_indices(&cx, &gx, &s, axis, k, largest).unwrap();
                close(
                    &cx.read(&g, want.len()).unwrap(),
                    &want,
                    0.0,
                    &format!("topk axis {axis} k {k} largest {largest}"),
                );
            }
        }
    }
}

#[test]
fn gpu_window_kernels_match_cpu_twins() {
    let Some(cx) = context() else { return };
    let windows = [
        window([2, 3, 9, 11], [3, 2], [2, 1], [2, 1], [1, 1]),
        window([1, 4, 8, 8], [3, 3], [1, 1], [1, 1], [1, 1]),
        window([3, 2, 7, 10], [2, 2], [2, 2], [1, 1], [0, 0]),
        window([2, 5, 13, 1], [5, 1], [3, 1], [1, 1], [2, 0]),
        window([1, 3, 10, 9], [3, 3], [2, 3], [2, 1], [2, 1]),
    ];
    for w in &windows {
        let n_in: usize = w.input.iter().product();
        let x = coarse(n_in, 40);
        let gx = cx.upload(&x);
        let want = cpu::window::im2col(&x, w);
        let cols = kernels::im2col(&cx, &gx, w).unwrap();
        close(&cx.read(&cols, want.len()).unwrap(), &want, 0.0, &format!("im2col {w:?}"));
        let c = f32s(want.len(), 41);
        let want = cpu::window::col2im(&c, w);
        let g = kernels::col2im(&cx, &cx.upload(&c), w).unwrap();
        close(&cx.read(&g, n_in).unwrap(), &want, 1e-6, &format!("col2im {w:?}"));
        for kind in [PoolKind::Max, PoolKind::Avg { count_pad: false }, PoolKind::Avg { count_pad: true }] {
            let want = cpu::window::pool(kind, &x, w);
            let g = kernels::pool(&cx, kind, &gx, w).unwrap();
            close(&cx.read(&g, want.len()).unwrap(), &want, 1e-6, &format!("pool {kind:?} {w:?}"));
            let dy = f32s(want.len(), 42);
            let want = cpu::window::pool_grad(kind, &x, &dy, w);
            let g = kernels::pool_grad(&cx, kind, &gx, &cx.upload(&dy), w).unwrap();
            close(&cx.read(&g, n_in).unwrap(), &want, 1e-6, &format!("pool_grad {kind:?} {w:?}"));
        }
    }
}
