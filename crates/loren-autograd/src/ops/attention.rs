use std::sync::Arc;

use loren_tensor::ops::attention::{attention_backward, attention_forward};
use loren_tensor::ops::dropkey::DropKey;
use loren_tensor::{Result, Tensor};

use crate::tape::{Backward, GradSink, NodeId, Tape, Var};

/// `softmax(Q·Kᵀ/√dh)·V` per group, batch item and head; Q, K, V are [G, B, T, D]. With `drop`,
/// scores drop first (DropKey), and the output has a group per member.
pub fn attention(
    tape: &Tape,
    q: &Var,
    k: &Var,
    v: &Var,
    heads: usize,
    drop: Option<DropKey>,
) -> Result<Var> {
    let out = attention_forward(q.value(), k.value(), v.value(), heads, drop.as_ref())?;
    let needs_grad = tape.needs_grad(&[Some(q), Some(k), Some(v)]);
    let lse = out.lse;
    Ok(tape.record_with(out.o, needs_grad, |o| AttentionBackward {
        q: q.keep(),
        k: k.keep(),
        v: v.keep(),
        o: Arc::clone(o),
        lse,
        heads,
        drop,
        nodes: [q.node(), k.node(), v.node()],
    }))
}

struct AttentionBackward {
    q: Arc<Tensor>,
    k: Arc<Tensor>,
    v: Arc<Tensor>,
    o: Arc<Tensor>,
    lse: Tensor,
    heads: usize,
    drop: Option<DropKey>,
    nodes: [Option<NodeId>; 3],
}

impl Backward for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn backward(self: Box<Self>, d_o: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        let g = attention_backward(
            &d_o,
            &self.q,
            &self.k,
            &self.v,
            &self.o,
            &self.lse,
            self.heads,
            self.drop.as_ref(),
        )?;
        drop(d_o);
        let [q, k, v] = self.nodes;
        grads.add_opt(q, g.dq)?;
        grads.add_opt(k, g.dk)?;
        grads.add_opt(v, g.dv)
    }
}
