use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use loren_tensor::ops::elementwise::{add, add_assign};
use loren_tensor::{Error, MemTag, Result, Shape, Tensor};

use crate::params::{Grads, ParamId, Params};
use crate::timing::{Phase, StepTimer};

/// Index of a value that needs a gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(usize);

/// A value in the forward pass: a tensor, and the node whose gradient it gets if it needs one.
#[derive(Clone)]
pub struct Var {
    value: Arc<Tensor>,
    node: Option<NodeId>,
}

impl Var {
    /// A value that needs no gradient.
    pub fn constant(t: Tensor) -> Var {
        Var::shared(Arc::new(t))
    }

    /// A shared value that needs no gradient.
    pub fn shared(value: Arc<Tensor>) -> Var {
        Var { value, node: None }
    }

    pub fn value(&self) -> &Tensor {
        &self.value
    }

    /// The value itself, for a caller that is done with the var.
    pub fn into_value(self) -> Arc<Tensor> {
        self.value
    }

    /// A shared handle on the value, for an op to keep for its backward.
    pub fn keep(&self) -> Arc<Tensor> {
        Arc::clone(&self.value)
    }

    pub fn shape(&self) -> &Shape {
        self.value.shape()
    }

    pub fn node(&self) -> Option<NodeId> {
        self.node
    }

    pub fn requires_grad(&self) -> bool {
        self.node.is_some()
    }
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var({:?}, {:?})", self.value, self.node)
    }
}

/// One op's backward. It owns what it kept from the forward and is consumed when it runs.
pub trait Backward {
    fn name(&self) -> &'static str;

    /// Given the gradient of the op's output, add the gradients of its inputs to `grads`. `dy`
    /// may be shared with other values' gradients (a residual add hands its `dy` to both
    /// inputs), so an op that wants to write into it takes it with [`unshare`].
    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()>;
}

struct Record {
    output: NodeId,
    op: Box<dyn Backward>,
}

#[derive(Default)]
struct Inner {
    nodes: usize,
    records: Vec<Record>,
    leaves: Vec<(NodeId, ParamId)>,
}

/// Records the forward pass so it can be run backward.
///
/// A tape made with [`Tape::inference`] records nothing: ops keep nothing for a backward, and
/// intermediate values are freed as soon as the caller drops them.
pub struct Tape {
    enabled: bool,
    inner: RefCell<Inner>,
    timer: Option<Rc<RefCell<StepTimer>>>,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    pub fn new() -> Tape {
        Tape {
            enabled: true,
            inner: RefCell::default(),
            timer: None,
        }
    }

    pub fn inference() -> Tape {
        Tape {
            enabled: false,
            inner: RefCell::default(),
            timer: None,
        }
    }

    /// This tape, marking `timer` after every op's forward and every op's backward (see
    /// [`crate::timing`]).
    pub fn timed(mut self, timer: Rc<RefCell<StepTimer>>) -> Tape {
        self.timer = Some(timer);
        self
    }

    pub fn is_recording(&self) -> bool {
        self.enabled
    }

    fn mark(&self, phase: Phase, what: &'static str) {
        if let Some(t) = &self.timer {
            t.borrow_mut().mark(phase, what);
        }
    }

    fn new_node(&self) -> NodeId {
        let mut inner = self.inner.borrow_mut();
        inner.nodes += 1;
        NodeId(inner.nodes - 1)
    }

    /// A parameter as a value. Trainable parameters on a recording tape get a gradient.
    pub fn param(&self, params: &Params, id: ParamId) -> Var {
        let p = params.param(id);
        let node = if self.enabled && p.trainable() {
            let node = self.new_node();
            self.inner.borrow_mut().leaves.push((node, id));
            Some(node)
        } else {
            None
        };
        Var {
            value: p.operand(),
            node,
        }
    }

    /// The result of an op. `needs_grad` says whether any input needs a gradient; when it does
    /// and the tape records, `backward` is kept, else it is dropped with what it holds.
    pub fn record(
        &self,
        output: Tensor,
        needs_grad: bool,
        backward: impl Backward + 'static,
    ) -> Var {
        self.mark(Phase::Forward, backward.name());
        let node = if self.enabled && needs_grad {
            let node = self.new_node();
            self.inner.borrow_mut().records.push(Record {
                output: node,
                op: Box::new(backward),
            });
            Some(node)
        } else {
            None
        };
        Var {
            value: Arc::new(output),
            node,
        }
    }

    /// [`Tape::record`] for an op whose backward keeps its own output (attention keeps O):
    /// `backward` is built from the output once it is shared.
    pub fn record_with<B: Backward + 'static>(
        &self,
        output: Tensor,
        needs_grad: bool,
        backward: impl FnOnce(&Arc<Tensor>) -> B,
    ) -> Var {
        let value = Arc::new(output);
        let record = self.enabled && needs_grad;
        // A timed tape builds the backward just for its name when it keeps none.
        let op = (record || self.timer.is_some()).then(|| Box::new(backward(&value)));
        if let Some(op) = &op {
            self.mark(Phase::Forward, op.name());
        }
        let node = match op {
            Some(op) if record => {
                let node = self.new_node();
                self.inner
                    .borrow_mut()
                    .records
                    .push(Record { output: node, op });
                Some(node)
            }
            _ => None,
        };
        Var { value, node }
    }

    /// Whether an op with these inputs must record a backward.
    pub fn needs_grad(&self, inputs: &[Option<&Var>]) -> bool {
        self.enabled && inputs.iter().flatten().any(|v| v.requires_grad())
    }

    /// A value that gets a gradient without being a parameter: an input of a recomputed block
    /// (see [`crate::ops::recompute`]), whose gradient [`Tape::gradients`] hands back.
    pub fn input(&self, value: Arc<Tensor>) -> Var {
        let node = self.enabled.then(|| self.new_node());
        Var { value, node }
    }

    /// Run the tape backward from the scalar `loss`, adding parameter gradients into `grads`.
    pub fn backward(self, loss: &Var, grads: &mut Grads) -> Result<()> {
        let Some(root) = loss.node else {
            return Err(Error::invalid(
                "backward",
                "the loss does not depend on any trainable parameter",
            ));
        };
        if loss.value.numel() != 1 {
            return Err(Error::invalid(
                "backward",
                format!("the loss must be a scalar, got shape {}", loss.shape()),
            ));
        }
        let seed = Arc::new(Tensor::full(
            1.0,
            loss.shape().clone(),
            MemTag::Workspace,
            loss.value.device(),
        )?);
        let timer = self.timer.clone();
        let (mut sink, leaves) = self.run(root, seed, true)?;
        for (node, pid) in leaves {
            if let Some(g) = sink.grads[node.0].take() {
                grads.accumulate(pid, &g)?;
            }
        }
        if let Some(t) = timer {
            t.borrow_mut()
                .mark(Phase::Backward, "gradients into the parameters");
        }
        Ok(())
    }

    /// Run the tape backward from the value at `root` with gradient `dy`, and return the
    /// gradients of the values at `wrt` (`None` where a value got none or has no node).
    pub fn gradients(
        self,
        root: NodeId,
        dy: Arc<Tensor>,
        wrt: &[Option<NodeId>],
    ) -> Result<Vec<Option<Arc<Tensor>>>> {
        let (mut sink, _) = self.run(root, dy, false)?;
        Ok(wrt
            .iter()
            .map(|n| n.and_then(|n| sink.grads[n.0].take()))
            .collect())
    }

    /// The records in reverse from `root`, seeded with `seed`: the sink then holds the
    /// gradients of the values no record produced (parameters and inputs).
    fn run(
        self,
        root: NodeId,
        seed: Arc<Tensor>,
        seed_is_one: bool,
    ) -> Result<(GradSink, Vec<(NodeId, ParamId)>)> {
        let inner = self.inner.into_inner();
        if root.0 >= inner.nodes {
            return Err(Error::invalid("backward", "the root is not on this tape"));
        }
        let mut sink = GradSink {
            grads: (0..inner.nodes).map(|_| None).collect(),
            running_root: false,
        };
        sink.grads[root.0] = Some(seed);
        for rec in inner.records.into_iter().rev() {
            match sink.grads[rec.output.0].take() {
                Some(dy) => {
                    sink.running_root = seed_is_one && rec.output == root;
                    let name = rec.op.name();
                    rec.op.backward(dy, &mut sink)?;
                    sink.running_root = false;
                    if let Some(t) = &self.timer {
                        t.borrow_mut().mark(Phase::Backward, name);
                    }
                }
                None => drop(rec.op),
            }
        }
        Ok((sink, inner.leaves))
    }
}

/// Where ops deposit the gradients of their inputs during backward.
///
/// A gradient may be shared by several values (see [`Backward::backward`]); adding into one
/// writes in place only where the sink holds the sole reference, so no value sees another's
/// gradient change.
pub struct GradSink {
    grads: Vec<Option<Arc<Tensor>>>,
    running_root: bool,
}

impl GradSink {
    /// Whether the backward now running belongs to the loss itself, so its `dy` is the seed of
    /// ones: the op can skip scaling by it (and a GPU reading it back).
    pub fn dy_is_one(&self) -> bool {
        self.running_root
    }

    /// [`GradSink::add`] for a gradient an op may not have formed.
    pub fn add_opt(&mut self, var: Option<NodeId>, g: Option<Tensor>) -> Result<()> {
        match g {
            Some(g) => self.add(var, g),
            None => Ok(()),
        }
    }

    /// Add `g` to the gradient of `var`. A var without a node needs none: `g` is dropped.
    pub fn add(&mut self, var: Option<NodeId>, g: Tensor) -> Result<()> {
        self.add_shared(var, Arc::new(g))
    }

    /// [`GradSink::add`] for a gradient other values may hold too.
    pub fn add_shared(&mut self, var: Option<NodeId>, mut g: Arc<Tensor>) -> Result<()> {
        let Some(node) = var else { return Ok(()) };
        let Some(acc) = &mut self.grads[node.0] else {
            if let Some(g) = Arc::get_mut(&mut g) {
                g.set_tag(MemTag::Workspace);
            }
            self.grads[node.0] = Some(g);
            return Ok(());
        };
        // The sum is the same whichever operand it is written into: IEEE addition commutes.
        if let Some(acc) = Arc::get_mut(acc) {
            return add_assign(acc, &g);
        }
        if let Some(owned) = Arc::get_mut(&mut g) {
            add_assign(owned, acc)?;
            owned.set_tag(MemTag::Workspace);
            *acc = g;
            return Ok(());
        }
        let mut sum = add(acc, &g)?;
        sum.set_tag(MemTag::Workspace);
        *acc = Arc::new(sum);
        Ok(())
    }

    /// The gradient `var` has so far, taken out of the sink: for an op that adds its own
    /// contribution to it in the same pass that forms it (LayerNorm's dx), instead of forming
    /// it apart and adding it after. The op hands the sum back with [`GradSink::add`].
    pub fn take(&mut self, var: Option<NodeId>) -> Option<Arc<Tensor>> {
        var.and_then(|node| self.grads[node.0].take())
    }
}

/// `t` itself where nothing else holds it, else a copy: for an op that writes into its `dy`.
pub fn unshare(t: Arc<Tensor>) -> Result<Tensor> {
    Arc::try_unwrap(t).or_else(|t| t.copy(t.tag()))
}
