//! The one place WGSL enters the program: every file of `shaders/`, by name (one entry
//! point, `main`, per file; bindings listed in each file's header).

pub const SHADERS: &[(&str, &str)] = &[
    ("adam", include_str!("../../../shaders/adam.wgsl")),
    ("argmax", include_str!("../../../shaders/argmax.wgsl")),
    ("binary", include_str!("../../../shaders/binary.wgsl")),
    ("col2im", include_str!("../../../shaders/col2im.wgsl")),
    ("fill", include_str!("../../../shaders/fill.wgsl")),
    ("gate_backward", include_str!("../../../shaders/gate_backward.wgsl")),
    ("gate_forward", include_str!("../../../shaders/gate_forward.wgsl")),
    ("gather", include_str!("../../../shaders/gather.wgsl")),
    ("gather_elements", include_str!("../../../shaders/gather_elements.wgsl")),
    ("gather_grad", include_str!("../../../shaders/gather_grad.wgsl")),
    ("gather_grad_links", include_str!("../../../shaders/gather_grad_links.wgsl")),
    ("gram_units", include_str!("../../../shaders/gram_units.wgsl")),
    ("im2col", include_str!("../../../shaders/im2col.wgsl")),
    ("matmul", include_str!("../../../shaders/matmul.wgsl")),
    ("matmul_blocked", include_str!("../../../shaders/matmul_blocked.wgsl")),
    ("matmul_small", include_str!("../../../shaders/matmul_small.wgsl")),
    ("pool", include_str!("../../../shaders/pool.wgsl")),
    ("pool_grad", include_str!("../../../shaders/pool_grad.wgsl")),
    ("reduce", include_str!("../../../shaders/reduce.wgsl")),
    ("reduce_block", include_str!("../../../shaders/reduce_block.wgsl")),
    ("reduce_rows", include_str!("../../../shaders/reduce_rows.wgsl")),
    ("rows", include_str!("../../../shaders/rows.wgsl")),
    ("scatter_elements", include_str!("../../../shaders/scatter_elements.wgsl")),
    ("strided_copy", include_str!("../../../shaders/strided_copy.wgsl")),
    ("strided_write", include_str!("../../../shaders/strided_write.wgsl")),
    ("sym_eigvals", include_str!("../../../shaders/sym_eigvals.wgsl")),
    ("topk_indices", include_str!("../../../shaders/topk_indices.wgsl")),
    ("unary", include_str!("../../../shaders/unary.wgsl")),
    ("unary_grad", include_str!("../../../shaders/unary_grad.wgsl")),
    ("unit_dots", include_str!("../../../shaders/unit_dots.wgsl")),
    ("where", include_str!("../../../shaders/where.wgsl")),
];

pub fn source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
