//! Every WGSL file in shaders/ parses and validates with naga (no GPU needed), has exactly
//! one entry point, and lists its bindings in a header comment; and every file is
//! registered in the one place the engine loads shaders from.

use plprune_onnx::engine::gpu::shaders::SHADERS;

#[test]
fn every_shader_validates_with_naga() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty());
    for f in &files {
        assert_eq!(f.extension().and_then(|e| e.to_str()), Some("wgsl"), "{} is not WGSL", f.display());
        let src = std::fs::read_to_string(f).unwrap();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{}: {}", f.display(), e.emit_to_string(&src)));
        let mut v =
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::default());
        v.validate(&module).unwrap_or_else(|e| panic!("{}: {e:?}", f.display()));
        assert_eq!(module.entry_points.len(), 1, "{}: one entry point per file", f.display());
        assert!(src.contains("Bindings"), "{}: the header must list the bindings", f.display());
        let stem = f.file_stem().unwrap().to_str().unwrap();
        assert!(
            SHADERS.iter().any(|(n, s)| *n == stem && *s == src),
            "{stem}.wgsl is not registered in engine::gpu::shaders"
        );
    }
    assert_eq!(SHADERS.len(), files.len());
}
