use std::sync::Arc;

use loren_tensor::ops::activation::{bias_gelu_backward, bias_gelu_forward};
use loren_tensor::{Result, Tensor};

use crate::tape::{Backward, GradSink, NodeId, Tape, Var};

/// `gelu(x + b)`, the bias fused with the activation.
pub fn bias_gelu(tape: &Tape, x: &Var, b: &Var) -> Result<Var> {
    let y = bias_gelu_forward(x.value(), b.value())?;
    let needs_grad = tape.needs_grad(&[Some(x), Some(b)]);
    Ok(tape.record(
        y,
        needs_grad,
        BiasGeluBackward {
            x: x.keep(),
            b: b.keep(),
            nodes: [x.node(), b.node()],
        },
    ))
}

struct BiasGeluBackward {
    x: Arc<Tensor>,
    b: Arc<Tensor>,
    nodes: [Option<NodeId>; 2],
}

impl Backward for BiasGeluBackward {
    fn name(&self) -> &'static str {
        "bias_gelu"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        let [x, b] = self.nodes;
        let g = bias_gelu_backward(&dy, &self.x, &self.b, x.is_some(), b.is_some())?;
        drop(dy);
        grads.add_opt(x, g.dx)?;
        grads.add_opt(b, g.db)
    }
}
