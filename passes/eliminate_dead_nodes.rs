//! EliminateDeadNodes: removes ops whose outputs nothing reads any more and values nothing
//! uses, after a rewrite (e.g. a pruned expert's branch). Graph outputs are always live.
//! Only what the rewrite made dead is removed: dead code already present in the input
//! (recorded before the rewrite, in the dense snapshot) is left as the user wrote it.

use std::collections::BTreeSet;

use crate::error::Result;
use crate::ir::{Id, Model};
use crate::pipeline::{Context, Pass};

pub struct EliminateDeadNodes;

impl Pass for EliminateDeadNodes {
    fn name(&self) -> &'static str {
        "EliminateDeadNodes"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let already_dead: BTreeSet<String> = match &cx.dense {
            Some(d) => dead_ops(d).into_iter().map(|o| d.op(o).name.clone()).collect(),
            None => BTreeSet::new(),
        };
        loop {
            let dead: Vec<Id> =
                dead_ops(model).into_iter().filter(|&o| !already_dead.contains(&model.op(o).name)).collect();
            if dead.is_empty() {
                break;
            }
            for o in dead {
                let inputs = model.inputs(o);
                model.remove_op(o);
                for v in inputs.into_iter().flatten() {
                    if model.graph.contains_node(v)
                        && model.consumers(v).is_empty()
                        && model.producer(v).is_none()
                        && !model.inputs.contains(&v)
                        && !model.is_graph_output(v)
                    {
                        model.remove_value(v);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Ops none of whose outputs is consumed or a graph output.
fn dead_ops(model: &Model) -> Vec<Id> {
    model
        .ops()
        .into_iter()
        .filter(|&o| model.outputs(o).iter().all(|&v| model.consumers(v).is_empty() && !model.is_graph_output(v)))
        .collect()
}
