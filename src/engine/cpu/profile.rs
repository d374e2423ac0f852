//! Opt-in profile of the CPU executor: with `PLPRUNE_PROFILE=1` every instruction's time is
//! added to its primitive's total (matmuls also by shape class), and `report()` prints the
//! totals, largest first, to stderr. Off by default: one environment read per run.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::program::{Instr, Prim, Program};

static TOTALS: Mutex<BTreeMap<String, (Duration, usize, f64)>> = Mutex::new(BTreeMap::new());

/// Of the GPU executor's instruction times, the part spent on the host before the wait:
/// recording the dispatches (buffers, params, bind groups, passes).
static GPU_HOST: Mutex<Duration> = Mutex::new(Duration::ZERO);

/// Adds host-side time of one GPU instruction (see [`GPU_HOST`]).
pub fn record_gpu_host(dt: Duration) {
    *GPU_HOST.lock().unwrap_or_else(|e| e.into_inner()) += dt;
}

pub fn enabled() -> bool {
    std::env::var_os("PLPRUNE_PROFILE").is_some_and(|v| v != "0")
}

/// Adds one instruction's time (and its multiply-add count for matmuls).
pub fn record(prog: &Program, ins: &Instr, dt: Duration) {
    let (key, flops) = match &ins.prim {
        Prim::MatMul { ta, tb } => {
            let a = prog.shape(ins.ins[0]);
            let b = prog.shape(ins.ins[1]);
            let k = if *ta { a[a.len() - 2] } else { a[a.len() - 1] };
            let name = format!("MatMul{}{} {a:?}x{b:?}", if *ta { "ᵀ" } else { "" }, if *tb { "ᵀ" } else { "" });
            (name, 2.0 * prog.slots[ins.out].numel() as f64 * k as f64)
        }
        Prim::Binary(op) => (format!("binary {op:?} {:?}x{:?}", prog.shape(ins.ins[0]), prog.shape(ins.ins[1])), 0.0),
        Prim::Unary(op) => (format!("unary {op:?} {:?}", prog.shape(ins.ins[0])), 0.0),
        Prim::UnaryGrad(op) => (format!("unary_grad {op:?} {:?}", prog.shape(ins.ins[0])), 0.0),
        Prim::Reduce { op, axes } => (format!("reduce {op:?} {:?} {axes:?}", prog.shape(ins.ins[0])), 0.0),
        p => (p.name().to_string(), 0.0),
    };
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = t.entry(key).or_default();
    e.0 += dt;
    e.1 += 1;
    e.2 += flops;
}

/// Prints and clears the totals.
pub fn report() {
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = std::mem::take(&mut *t).into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    let total: f64 = rows.iter().map(|r| r.1 .0.as_secs_f64()).sum();
    eprintln!("profile: {total:.3} s in {} primitive classes", rows.len());
    let host = std::mem::take(&mut *GPU_HOST.lock().unwrap_or_else(|e| e.into_inner())).as_secs_f64();
    if host > 0.0 {
        eprintln!("  of which GPU instructions' host side (recording, before the wait): {host:.3} s");
    }
    for (k, (d, n, f)) in rows.iter().take(40) {
        let s = d.as_secs_f64();
        let g = if *f > 0.0 { format!("{:6.1} GFLOP/s", f / s / 1e9) } else { String::new() };
        eprintln!("  {s:8.3} s {:5.1}% {n:5}x  {g}  {k}", 100.0 * s / total);
    }
}
