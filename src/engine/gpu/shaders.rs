//! The one place WGSL enters the program: every file of `shaders/`, by name (one entry
//! point, `main`, per file; bindings listed in each file's header).

pub const SHADERS: &[(&str, &str)] = &[
    ("binary", include_str!("../../../shaders/binary.wgsl")),
    ("matmul", include_str!("../../../shaders/matmul.wgsl")),
    ("reduce_rows", include_str!("../../../shaders/reduce_rows.wgsl")),
    ("strided_copy", include_str!("../../../shaders/strided_copy.wgsl")),
    ("unary", include_str!("../../../shaders/unary.wgsl")),
];

pub fn source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
