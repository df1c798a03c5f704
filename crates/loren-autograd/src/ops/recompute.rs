use std::sync::Arc;

use loren_tensor::{Error, Result, Tensor};

use crate::tape::{Backward, GradSink, NodeId, Tape, Var};

/// A differentiable function of some values, run again by its backward.
pub type Recomputed = dyn Fn(&Tape, &[Var]) -> Result<Var>;

/// `f(inputs)`, keeping only the inputs for the backward: the forward runs `f` unrecorded, so
/// its intermediates are freed as it goes, and the backward runs `f` again on a recording tape
/// of its own and back-propagates through that. A transformer block's activations fall to its
/// input, for one more forward of the block's compute.
///
/// `f` must compute the same values both times (it may not draw random numbers), and must read
/// its parameters from `inputs` (as [`Tape::param`] values), not from a tape, so their gradients
/// reach the caller's tape. The gradients are those of running `f` on the caller's tape, bit for
/// bit: the same ops run in the same order.
pub fn recompute(
    tape: &Tape,
    inputs: &[Var],
    f: impl Fn(&Tape, &[Var]) -> Result<Var> + 'static,
) -> Result<Var> {
    let refs: Vec<Option<&Var>> = inputs.iter().map(Some).collect();
    if !tape.needs_grad(&refs) {
        return f(tape, inputs);
    }
    let constants: Vec<Var> = inputs.iter().map(|v| Var::shared(v.keep())).collect();
    let out = f(&Tape::inference(), &constants)?;
    drop(constants);
    let out = Arc::into_inner(out.into_value())
        .ok_or_else(|| Error::invalid("recompute", "the function returned one of its inputs"))?;
    Ok(tape.record(
        out,
        true,
        RecomputeBackward {
            inputs: inputs.iter().map(|v| (v.keep(), v.node())).collect(),
            f: Box::new(f),
        },
    ))
}

struct RecomputeBackward {
    inputs: Vec<(Arc<Tensor>, Option<NodeId>)>,
    f: Box<Recomputed>,
}

impl Backward for RecomputeBackward {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        let tape = Tape::new();
        let nodes: Vec<Option<NodeId>> = self.inputs.iter().map(|(_, n)| *n).collect();
        let vars: Vec<Var> = self
            .inputs
            .into_iter()
            .map(|(value, node)| match node {
                Some(_) => tape.input(value),
                None => Var::shared(value),
            })
            .collect();
        let out = (self.f)(&tape, &vars)?;
        // An output that depends on no input with a gradient sends none back, as without
        // recomputing.
        let Some(root) = out.node() else {
            return Ok(());
        };
        let wrt: Vec<Option<NodeId>> = vars.iter().map(Var::node).collect();
        // The rerun's output and inputs are held by its tape where a backward reads them.
        drop((out, vars));
        let dx = tape.gradients(root, dy, &wrt)?;
        for (node, g) in nodes.into_iter().zip(dx) {
            if let Some(g) = g {
                grads.add_shared(node, g)?;
            }
        }
        Ok(())
    }
}
