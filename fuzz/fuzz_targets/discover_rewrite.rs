//! Unit discovery target: bytes → import → shape inference → discover units → rewrite with
//! a keep-set derived from the input → clean-up → shape inference → export.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = plprune_onnx_fuzz_common::discover_and_rewrite(data);
});

#[path = "common.rs"]
mod plprune_onnx_fuzz_common;
