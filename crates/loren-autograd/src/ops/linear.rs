use std::sync::Arc;

use loren_tensor::ops::linear::{Needs, linear_backward, linear_forward};
use loren_tensor::ops::lora::{lora_backward, lora_forward};
use loren_tensor::{DType, Result, Shape, Tensor};

use super::elementwise::add_operand_grad;
use crate::tape::{Backward, GradSink, NodeId, Tape, Var, unshare};

/// `y = x·Wᵀ + b`, with W shared ([1, N, K]) or per member ([M, N, K]).
///
/// With `residual`, `y += residual` (a residual of group 1 is shared): a sublayer joining the
/// residual stream in its product (on a GPU the GEMM accumulates onto the stream), with no add
/// op after it.
pub fn linear(
    tape: &Tape,
    x: &Var,
    w: &Var,
    b: Option<&Var>,
    residual: Option<&Var>,
) -> Result<Var> {
    let dtype = x.value().device().compute_dtype();
    product(tape, x, w, b, dtype, residual)
}

/// [`linear`] with an f32 output on every device: the logits, which the loss and the
/// probabilities read in full precision.
pub fn logits(tape: &Tape, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    product(tape, x, w, b, DType::F32, None)
}

fn product(
    tape: &Tape,
    x: &Var,
    w: &Var,
    b: Option<&Var>,
    out: DType,
    residual: Option<&Var>,
) -> Result<Var> {
    let r = residual.map(|r| r.value());
    let y = linear_forward(x.value(), w.value(), b.map(|b| b.value()), out, r)?;
    let needs_grad = tape.needs_grad(&[Some(x), Some(w), b, residual]);
    Ok(tape.record(
        y,
        needs_grad,
        LinearBackward {
            // Only dW reads the input: a frozen weight's backward keeps none.
            x: w.requires_grad().then(|| x.keep()),
            x_shape: x.shape().clone(),
            w: w.keep(),
            x_node: x.node(),
            w_node: w.node(),
            b_node: b.and_then(|b| b.node()),
            has_bias: b.is_some(),
            residual: residual.map(|r| (r.node(), r.shape().groups())),
        },
    ))
}

struct LinearBackward {
    x: Option<Arc<Tensor>>,
    x_shape: Shape,
    w: Arc<Tensor>,
    x_node: Option<NodeId>,
    w_node: Option<NodeId>,
    b_node: Option<NodeId>,
    has_bias: bool,
    /// The residual's node and group count.
    residual: Option<(Option<NodeId>, usize)>,
}

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        if let Some((node, groups)) = self.residual {
            add_operand_grad(grads, node, groups, &dy)?;
        }
        let needs = Needs {
            dx: self.x_node.is_some(),
            dw: self.w_node.is_some(),
            db: self.b_node.is_some(),
        };
        // The explicit ensemble's q, k and v projections read one input: each after the first
        // adds the gradient the others gave it into its own dx (on a GPU, in the GEMM).
        let dx_plus = grads.take(self.x_node).map(unshare).transpose()?;
        let g = linear_backward(
            &dy,
            &self.x_shape,
            self.x.as_deref(),
            &self.w,
            self.has_bias,
            needs,
            dx_plus,
        )?;
        drop(dy);
        grads.add_opt(self.x_node, g.dx)?;
        grads.add_opt(self.w_node, g.dw)?;
        grads.add_opt(self.b_node, g.db)
    }
}

/// `y[m] = x[m]·Wᵀ + b + s·(x[m]·A[m]ᵀ)·B[m]ᵀ` with W and b frozen. `x` may be shared (group 1).
///
/// With `residual`, `y[m] += residual[m]` (a residual of group 1 is shared): the attention
/// output's projection joining the stream in its own store, with no add op after it.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear(
    tape: &Tape,
    x: &Var,
    w: &Var,
    bias: Option<&Var>,
    a: &Var,
    b: &Var,
    scale: f32,
    residual: Option<&Var>,
) -> Result<Var> {
    let out = lora_forward(
        x.value(),
        w.value(),
        bias.map(|t| t.value()),
        a.value(),
        b.value(),
        scale,
        residual.map(|t| t.value()),
    )?;
    let needs_grad = tape.needs_grad(&[Some(x), Some(a), Some(b), residual]);
    Ok(tape.record(
        out.y,
        needs_grad,
        LoraBackward {
            x: x.keep(),
            w: w.keep(),
            a: a.keep(),
            b: b.keep(),
            u: out.u,
            scale,
            x_node: x.node(),
            a_node: a.node(),
            b_node: b.node(),
            residual: residual.map(|r| (r.node(), r.shape().groups())),
        },
    ))
}

struct LoraBackward {
    x: Arc<Tensor>,
    w: Arc<Tensor>,
    a: Arc<Tensor>,
    b: Arc<Tensor>,
    u: Tensor,
    scale: f32,
    x_node: Option<NodeId>,
    a_node: Option<NodeId>,
    b_node: Option<NodeId>,
    /// The residual's node and group count.
    residual: Option<(Option<NodeId>, usize)>,
}

impl Backward for LoraBackward {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        if let Some((node, groups)) = self.residual {
            add_operand_grad(grads, node, groups, &dy)?;
        }
        let need_adapters = self.a_node.is_some() || self.b_node.is_some();
        // The q, k and v projections read one input: each after the first joins the gradient
        // the others gave it into its own dx as it is formed.
        let dx_plus = grads.take(self.x_node);
        let g = lora_backward(
            &dy,
            &self.x,
            &self.w,
            &self.a,
            &self.b,
            &self.u,
            self.scale,
            self.x_node.is_some(),
            need_adapters,
            dx_plus.as_deref(),
        )?;
        drop((dy, dx_plus));
        grads.add_opt(self.x_node, g.dx)?;
        grads.add_opt(self.a_node, g.da)?;
        grads.add_opt(self.b_node, g.db)
    }
}
