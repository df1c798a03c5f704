use std::sync::Arc;

use loren_tensor::ops::embed::{
    class_token_backward, class_token_forward, embed_tokens_backward, embed_tokens_forward,
};
use loren_tensor::{Result, Tensor};

use crate::tape::{Backward, GradSink, NodeId, Tape, Var};

/// Class token and positional embedding around the embedded patches: [G, B, P, D] → [G, B, P+1, D].
pub fn embed_tokens(tape: &Tape, pe: &Var, cls: &Var, pos: &Var) -> Result<Var> {
    let x = embed_tokens_forward(pe.value(), cls.value(), pos.value())?;
    let needs_grad = tape.needs_grad(&[Some(pe), Some(cls), Some(pos)]);
    Ok(tape.record(
        x,
        needs_grad,
        EmbedTokensBackward {
            pe: pe.keep(),
            cls: cls.keep(),
            pos: pos.keep(),
            nodes: [pe.node(), cls.node(), pos.node()],
        },
    ))
}

struct EmbedTokensBackward {
    pe: Arc<Tensor>,
    cls: Arc<Tensor>,
    pos: Arc<Tensor>,
    nodes: [Option<NodeId>; 3],
}

impl Backward for EmbedTokensBackward {
    fn name(&self) -> &'static str {
        "embed_tokens"
    }

    fn backward(self: Box<Self>, dx: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        let need = self.nodes.map(|n| n.is_some());
        let g = embed_tokens_backward(&dx, &self.pe, &self.cls, &self.pos, need)?;
        drop(dx);
        let [pe, cls, pos] = self.nodes;
        grads.add_opt(pe, g.dpe)?;
        grads.add_opt(cls, g.dcls)?;
        grads.add_opt(pos, g.dpos)
    }
}

/// Token 0 of every sequence: [G, B, T, D] → [G, B, D].
pub fn class_token(tape: &Tape, x: &Var) -> Result<Var> {
    let y = class_token_forward(x.value())?;
    let needs_grad = tape.needs_grad(&[Some(x)]);
    Ok(tape.record(
        y,
        needs_grad,
        ClassTokenBackward {
            tokens: x.shape().dims()[2],
            node: x.node(),
        },
    ))
}

struct ClassTokenBackward {
    tokens: usize,
    node: Option<NodeId>,
}

impl Backward for ClassTokenBackward {
    fn name(&self) -> &'static str {
        "class_token"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        grads.add(self.node, class_token_backward(&dy, self.tokens)?)
    }
}
