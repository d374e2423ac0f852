//! f32 GEMM throughput of the CPU backend's matmul on MiniLM-L6's shapes (tokens 2048 =
//! 32 × 64, hidden 384, FFN 1536, in the three forms forward and backward use), against
//! PyTorch's `a @ b` on the same shapes in the same run when .venv-ref exists. A benchmark,
//! never a test. Run: cargo bench --bench gemm [-- --reps 10]; RAYON_NUM_THREADS sets threads.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use plprune_onnx::engine::cpu::matmul::matmul;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let reps: usize =
        a.iter().position(|x| x == "--reps").and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(10);
    // (batch, m, k, n, ta, tb): y = x W, dX = dY Wᵀ, dW = Xᵀ dY; then attention's
    // per-head products (32 sentences × 12 heads: scores Q Kᵀ, context P V, and their
    // backward forms).
    let shapes = [
        (1, 2048, 384, 1536, false, false),
        (1, 2048, 1536, 384, false, false),
        (1, 2048, 384, 384, false, false),
        (1, 2048, 1536, 384, false, true),
        (1, 384, 2048, 1536, true, false),
        (384, 64, 32, 64, false, true),
        (384, 64, 64, 32, false, false),
        (384, 64, 64, 32, true, false),
    ];
    let threads = rayon::current_num_threads();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = [root.join("../shared/bench/.venv-ref/bin/python"), root.join(".venv-ref/bin/python")]
        .into_iter()
        .find(|p| p.exists());
    println!("gemm (cpu, f32, {threads} threads), median of {reps}");
    for (bt, m, k, n, ta, tb) in shapes {
        let x: Vec<f32> = (0..bt * m * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let w: Vec<f32> = (0..bt * k * n).map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0).collect();
        let xs = if ta { [bt, k, m] } else { [bt, m, k] };
        let ws = if tb { [bt, n, k] } else { [bt, k, n] };
        let mut times = Vec::new();
        for rep in 0..=reps {
            let t = Instant::now();
            let c = matmul(&x, &xs, &w, &ws, ta, tb, &[bt, m, n]);
            std::hint::black_box(&c);
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let ours = times[times.len() / 2];
        let gf = |t: f64| 2.0 * (bt * m * k * n) as f64 / t / 1e9;
        let batch = if bt > 1 { format!("{bt}×") } else { String::new() };
        let form = format!("{batch}{m}x{k}x{n}{}{}", if ta { " Aᵀ" } else { "" }, if tb { " Bᵀ" } else { "" });
        let torch = py.as_ref().and_then(|py| {
            let script = format!(
                "import torch,time\ntorch.set_num_threads({threads})\n\
                 a=torch.randn({bt},{}).{}\nb=torch.randn({bt},{}).{}\nts=[]\n\
                 for r in range({reps}+1):\n t=time.perf_counter(); c=a@b; ts.append(time.perf_counter()-t)\n\
                 ts=sorted(ts[1:]); print(ts[len(ts)//2])",
                if ta { format!("{k},{m}") } else { format!("{m},{k}") },
                if ta { "transpose(-1,-2)" } else { "contiguous()" },
                if tb { format!("{n},{k}") } else { format!("{k},{n}") },
                if tb { "transpose(-1,-2)" } else { "contiguous()" },
            );
            let o = Command::new(py).args(["-c", &script]).output().ok()?;
            String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok()
        });
        match torch {
            Some(t) => println!(
                "  {form:<24} {:7.2} ms {:6.1} GFLOP/s | PyTorch {:7.2} ms {:6.1} GFLOP/s | ratio {:.2}x",
                ours * 1e3,
                gf(ours),
                t * 1e3,
                gf(t),
                ours / t
            ),
            None => println!("  {form:<24} {:7.2} ms {:6.1} GFLOP/s", ours * 1e3, gf(ours)),
        }
    }
}
