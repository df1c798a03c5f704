use std::sync::Arc;

use loren_tensor::ops::elementwise::{add as add_forward, sum_to_groups};
use loren_tensor::{Result, Tensor};

use crate::tape::{Backward, GradSink, NodeId, Tape, Var};

/// `a + b` with group broadcasting: the residual add.
pub fn add(tape: &Tape, a: &Var, b: &Var) -> Result<Var> {
    let y = add_forward(a.value(), b.value())?;
    let needs_grad = tape.needs_grad(&[Some(a), Some(b)]);
    Ok(tape.record(
        y,
        needs_grad,
        AddBackward {
            a: (a.node(), a.shape().groups()),
            b: (b.node(), b.shape().groups()),
        },
    ))
}

struct AddBackward {
    a: (Option<NodeId>, usize),
    b: (Option<NodeId>, usize),
}

impl Backward for AddBackward {
    fn name(&self) -> &'static str {
        "add"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        for (node, groups) in [self.a, self.b] {
            add_operand_grad(grads, node, groups, &dy)?;
        }
        Ok(())
    }
}

/// Give one operand of a sum (of `groups` groups, at `node`) its gradient: `dy` itself where
/// the groups match (no copy; every operand may hold it), else summed over the members into the
/// operand's one group. Nothing for an operand without a node.
pub(crate) fn add_operand_grad(
    grads: &mut GradSink,
    node: Option<NodeId>,
    groups: usize,
    dy: &Arc<Tensor>,
) -> Result<()> {
    if node.is_none() {
        return Ok(());
    }
    let g = if dy.shape().groups() == groups {
        Arc::clone(dy)
    } else {
        Arc::new(sum_to_groups(dy, groups)?)
    };
    grads.add_shared(node, g)
}
