//! The pipeline's passes, one file per pass in the top-level `passes/` folder.

#[path = "../passes/discover_units.rs"]
pub mod discover_units;
#[path = "../passes/distill_weights.rs"]
pub mod distill_weights;
#[path = "../passes/eliminate_dead_nodes.rs"]
pub mod eliminate_dead_nodes;
#[path = "../passes/infer_shapes.rs"]
pub mod infer_shapes;
#[path = "../passes/measure_conditioning.rs"]
pub mod measure_conditioning;
#[path = "../passes/recover_weights.rs"]
pub mod recover_weights;
#[path = "../passes/rewrite_graph.rs"]
pub mod rewrite_graph;
#[path = "../passes/score_units.rs"]
pub mod score_units;
#[path = "../passes/select_units.rs"]
pub mod select_units;
#[path = "../passes/verify_rewrite.rs"]
pub mod verify_rewrite;
