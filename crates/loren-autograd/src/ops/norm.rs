use std::sync::Arc;

use loren_tensor::ops::norm::{layernorm_backward, layernorm_forward};
use loren_tensor::{Result, Tensor};

use crate::tape::{Backward, GradSink, NodeId, Tape, Var};

/// LayerNorm over the last axis with affine `gamma`, `beta` ([1, D] shared or [M, D] per member).
pub fn layernorm(tape: &Tape, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
    let out = layernorm_forward(x.value(), gamma.value(), beta.value(), eps)?;
    let needs_grad = tape.needs_grad(&[Some(x), Some(gamma), Some(beta)]);
    Ok(tape.record(
        out.y,
        needs_grad,
        LayerNormBackward {
            x: x.keep(),
            gamma: gamma.keep(),
            beta: beta.keep(),
            mean: out.mean,
            rstd: out.rstd,
            nodes: [x.node(), gamma.node(), beta.node()],
        },
    ))
}

struct LayerNormBackward {
    x: Arc<Tensor>,
    gamma: Arc<Tensor>,
    beta: Arc<Tensor>,
    mean: Tensor,
    rstd: Tensor,
    nodes: [Option<NodeId>; 3],
}

impl Backward for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layernorm"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        let [x_node, g_node, b_node] = self.nodes;
        let need_affine = g_node.is_some() || b_node.is_some();
        // A pre-norm block's input also feeds the residual add, whose backward has run: its
        // gradient joins dx in the kernel that forms dx.
        let dx_plus = grads.take(x_node);
        let g = layernorm_backward(
            &dy,
            &self.x,
            &self.gamma,
            &self.beta,
            &self.mean,
            &self.rstd,
            x_node.is_some(),
            need_affine,
            dx_plus.as_deref(),
        )?;
        drop((dy, dx_plus));
        grads.add_opt(x_node, g.dx)?;
        grads.add_opt(g_node, g.dgamma)?;
        grads.add_opt(b_node, g.dbeta)
    }
}
