//! Shared by the fuzz targets and mirrored by tests/fuzz_regressions.rs.
#![allow(dead_code)]

use std::path::Path;

use plprune_onnx::pipeline::{run_passes, Context, Pass};
use plprune_onnx::units::KeepSet;
use plprune_onnx::{onnx_io, Config, Session};

/// A folder that does not exist: external-data references in fuzz inputs resolve to
/// nothing, so the fuzzer never reads files of the machine it runs on.
pub const FUZZ_PATH: &str = "/nonexistent-plprune-fuzz/fuzz.onnx";

/// Import and shape inference; true when both succeed.
pub fn load_and_infer(data: &[u8]) -> bool {
    let Ok((doc, mut model)) = onnx_io::load_bytes(data, Path::new(FUZZ_PATH)) else { return false };
    let mut cx = Context::new(Config::default(), doc);
    let passes: [&dyn Pass; 1] = [&plprune_onnx::passes::infer_shapes::InferShapes];
    run_passes(&passes, &mut cx, &mut model).is_ok()
}

/// Import, analysis, a rewrite for a keep-set derived from the bytes, export; true when
/// every step succeeds.
pub fn discover_and_rewrite(data: &[u8]) -> bool {
    let Ok((doc, model)) = onnx_io::load_bytes(data, Path::new(FUZZ_PATH)) else { return false };
    let config = Config { verify: false, ..Config::default() };
    let mut s = Session { cx: Context::new(config, doc), model, path: Path::new(FUZZ_PATH).to_path_buf() };
    if s.analyze().is_err() {
        return false;
    }
    // A keep-set derived from the input: an xorshift stream seeded by the bytes.
    let mut x = data.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3));
    let mut bit = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x & 1 == 1
    };
    let keep = KeepSet {
        keep: s
            .cx
            .groups
            .iter()
            .map(|g| {
                let mut k: Vec<bool> = (0..g.count).map(|_| bit()).collect();
                if !k.iter().any(|&b| b) {
                    if let Some(first) = k.first_mut() {
                        *first = true; // every group keeps one unit
                    }
                }
                k
            })
            .collect(),
    };
    if s.apply(Some(keep)).is_err() {
        return false;
    }
    s.model_bytes().is_ok()
}
