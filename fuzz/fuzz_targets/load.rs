//! Loader target: bytes → protobuf decode → import into the IR → shape inference.
//! Every input must give Ok or a typed error: no panic, no overflow, no huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = plprune_onnx_fuzz_common::load_and_infer(data);
});

#[path = "common.rs"]
mod plprune_onnx_fuzz_common;
