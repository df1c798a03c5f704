use loren_tensor::ops::elementwise::{add as add_forward, reduce_to_groups};
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

    fn backward(self: Box<Self>, dy: Tensor, grads: &mut GradSink) -> Result<()> {
        match (self.a.0, self.b.0) {
            (Some(_), Some(_)) => {
                let da = reduce_to_groups(dy.copy(dy.tag())?, self.a.1)?;
                grads.add(self.a.0, da)?;
                grads.add(self.b.0, reduce_to_groups(dy, self.b.1)?)
            }
            (Some(_), None) => grads.add(self.a.0, reduce_to_groups(dy, self.a.1)?),
            (None, Some(_)) => grads.add(self.b.0, reduce_to_groups(dy, self.b.1)?),
            (None, None) => Ok(()),
        }
    }
}
