use std::sync::Arc;

use loren_tensor::ops::elementwise::scale_;
use loren_tensor::ops::loss::softmax_cross_entropy as forward;
use loren_tensor::{Result, Tensor};

use crate::tape::{Backward, GradSink, NodeId, Tape, Var};

/// Mean softmax cross-entropy of logits `[M, B, C]` against targets `[B]` shared by the members.
/// The result is a one-element loss; the logits' gradient is formed in the same pass.
pub fn softmax_cross_entropy(tape: &Tape, logits: &Var, targets: &[u32]) -> Result<Var> {
    let out = forward(logits.value(), targets)?;
    let needs_grad = tape.needs_grad(&[Some(logits)]);
    Ok(tape.record(
        out.loss,
        needs_grad,
        CrossEntropyBackward {
            dlogits: out.dlogits,
            node: logits.node(),
        },
    ))
}

struct CrossEntropyBackward {
    dlogits: Tensor,
    node: Option<NodeId>,
}

impl Backward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "softmax_cross_entropy"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        let mut g = self.dlogits;
        if !grads.dy_is_one() {
            scale_(&mut g, dy.scalar()?)?;
        }
        grads.add(self.node, g)
    }
}
