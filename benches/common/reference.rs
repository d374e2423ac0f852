//! Finding and running the PyTorch reference (../shared/bench/ntk_ref.py) from the benches:
//! on the CPU with as many threads as ours, or on the GPU (`--device gpu`) through
//! benches/ntk_ref_device.py, which puts the same phases on torch's CUDA device.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where and how the benches run: `--device cpu|gpu`, `--random-weights` (the reference uses
/// MiniLM-L6's architecture with random weights: for machines without its weights, where
/// ours reads a model made by benches/onnx_skeleton.py).
pub struct Target {
    pub gpu: bool,
    pub random_weights: bool,
}

impl Target {
    pub fn from_args() -> Target {
        let a: Vec<String> = std::env::args().collect();
        let device = a.iter().position(|x| x == "--device").and_then(|i| a.get(i + 1)).map(String::as_str);
        let gpu = match device {
            None | Some("cpu") => false,
            Some("gpu") => true,
            Some(d) => panic!("--device {d}: expected cpu or gpu"),
        };
        Target { gpu, random_weights: a.iter().any(|x| x == "--random-weights") }
    }

    /// Our backend: the CPU, or the first wgpu adapter (an error without one).
    pub fn device(&self) -> plprune_onnx::engine::gpu::Device {
        use plprune_onnx::engine::gpu::{select, Device};
        use plprune_onnx::engine::DeviceChoice;
        if !self.gpu {
            return Device::Cpu;
        }
        std::env::set_var("NODEVICE_SELECT", "1");
        select(DeviceChoice::Gpu).expect("--device gpu")
    }

    /// The reference's Python: `$PLPRUNE_REF_PYTHON`, else a `.venv-ref` in this checkout, in
    /// ../main or in ../shared/bench (see ../shared/bench/README.md).
    pub fn python(&self, root: &Path) -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("PLPRUNE_REF_PYTHON") {
            return Some(PathBuf::from(p));
        }
        [".venv-ref", "../main/.venv-ref", "../shared/bench/.venv-ref"]
            .iter()
            .map(|d| root.join(d).join("bin/python"))
            .find(|p| p.exists())
    }

    /// Runs the reference with `args` (ntk_ref.py's own), with our thread count on the CPU
    /// or on CUDA with `--device gpu`; returns its stdout.
    pub fn run(&self, py: &Path, root: &Path, args: &[String]) -> Result<String, String> {
        let mut cmd = Command::new(py);
        cmd.env("HF_HUB_OFFLINE", "1");
        if self.gpu || self.random_weights {
            cmd.arg(root.join("benches/ntk_ref_device.py"));
            cmd.args(["--ref", &root.join("../shared/bench/ntk_ref.py").to_string_lossy()]);
            if self.gpu {
                cmd.args(["--device", "cuda"]);
            }
            if self.random_weights {
                cmd.arg("--random-weights");
            }
        } else {
            cmd.arg(root.join("../shared/bench/ntk_ref.py"));
        }
        cmd.args(["--threads", &rayon::current_num_threads().to_string()]);
        let o = cmd.args(args).output().map_err(|e| format!("could not run {}: {e}", py.display()))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).to_string());
        }
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    }

    /// How the reference ran, for the printed tables.
    pub fn describe_reference(&self) -> String {
        let place =
            if self.gpu { "CUDA".to_string() } else { format!("CPU, {} threads", rayon::current_num_threads()) };
        if self.random_weights {
            format!("{place}, random weights")
        } else {
            place
        }
    }
}
