//! Finite-difference gradient checks, for the tests of every op and of whole models.
//!
//! The function under test maps inputs to an output of any shape; the check reduces it to the
//! scalar `L = Σ out ⊙ R` with a fixed random `R`, so every output element carries weight. Each
//! trainable input's tape gradient is compared with central differences of `L` at a sample of
//! positions.

use std::sync::Arc;

use loren_tensor::{Device, Error, MemTag, Result, Rng, Tensor};

use crate::params::{Grads, ParamId, Params};
use crate::tape::{Backward, GradSink, NodeId, Tape, Var};

/// How a check samples and what it accepts.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Step of the central difference.
    pub eps: f32,
    /// Positions checked per input (all of them when the input is smaller).
    pub samples: usize,
    /// Bound on ‖analytic − numeric‖ / ‖numeric‖ over the checked positions of one input.
    pub rel_tol: f64,
    pub seed: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            eps: 1e-2,
            samples: 48,
            rel_tol: 1e-2,
            seed: 0x5eed,
        }
    }
}

/// The outcome for one input.
#[derive(Clone, Debug)]
pub struct InputReport {
    pub name: String,
    pub checked: usize,
    pub rel_err: f64,
    pub worst: Option<(usize, f64, f64)>,
    pub grad_norm: f64,
}

/// An input of the function under test.
pub struct Input {
    pub name: String,
    pub value: Tensor,
    /// Whether its gradient is checked; frozen inputs must get none.
    pub trainable: bool,
}

impl Input {
    pub fn new(name: &str, value: Tensor, trainable: bool) -> Input {
        Input {
            name: name.to_string(),
            value,
            trainable,
        }
    }
}

/// Random normal input of `shape` on `dev`.
pub fn randn(shape: &[usize], rng: &mut Rng, dev: &Device) -> Tensor {
    Tensor::randn(shape.to_vec(), 1.0, rng, MemTag::Workspace, dev).expect("cpu allocation")
}

struct Dot {
    r: Arc<Tensor>,
    node: Option<NodeId>,
}

impl Backward for Dot {
    fn name(&self) -> &'static str {
        "gradcheck_dot"
    }

    fn backward(self: Box<Self>, dy: Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        let s = dy.scalar()?;
        let mut g = self.r.copy(MemTag::Workspace)?;
        g.as_mut_slice()?.iter_mut().for_each(|v| *v *= s);
        grads.add(self.node, g)
    }
}

fn dot(out: &Tensor, r: &Tensor) -> Result<f64> {
    Ok(out
        .as_slice()?
        .iter()
        .zip(r.as_slice()?)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum())
}

/// Run the check on standalone inputs and return one report per trainable input.
pub fn check<F>(inputs: Vec<Input>, f: F, opts: &CheckOptions) -> Result<Vec<InputReport>>
where
    F: Fn(&Tape, &[Var]) -> Result<Var>,
{
    let dev = inputs
        .first()
        .map(|i| i.value.device().clone())
        .ok_or_else(|| Error::invalid("gradcheck", "no inputs"))?;
    let mut params = Params::new(&dev);
    for inp in inputs {
        params.add(inp.name, inp.value, inp.trainable, false)?;
    }
    let ids: Vec<ParamId> = (0..params.len()).map(ParamId).collect();
    check_params(
        &mut params,
        |p| p,
        |tape, params| {
            let vars: Vec<Var> = ids.iter().map(|&id| tape.param(params, id)).collect();
            f(tape, &vars)
        },
        opts,
    )
}

/// Run the check over the parameters of any holder `state` (a whole model, say): `params`
/// reaches its parameters, `f` runs its forward.
pub fn check_params<S, P, F>(
    state: &mut S,
    params: P,
    f: F,
    opts: &CheckOptions,
) -> Result<Vec<InputReport>>
where
    P: Fn(&mut S) -> &mut Params,
    F: Fn(&Tape, &S) -> Result<Var>,
{
    let mut rng = Rng::new(opts.seed);

    // Analytic gradients from the tape.
    let mut grads = Grads::new(params(state))?;
    let r = {
        let tape = Tape::new();
        let out = f(&tape, state)?;
        let dev = out.value().device().clone();
        let r = Arc::new(Tensor::randn(
            out.shape().clone(),
            1.0,
            &mut rng,
            MemTag::Workspace,
            &dev,
        )?);
        let value = dot(out.value(), &r)?;
        let loss_t = Tensor::full(value as f32, [1], MemTag::Workspace, &dev)?;
        let loss = tape.record(
            loss_t,
            out.requires_grad(),
            Dot {
                r: Arc::clone(&r),
                node: out.node(),
            },
        );
        tape.backward(&loss, &mut grads)?;
        r
    };

    let eval = |state: &S| -> Result<f64> {
        let tape = Tape::inference();
        let out = f(&tape, state)?;
        dot(out.value(), &r)
    };

    let list: Vec<(ParamId, String, bool)> = params(state)
        .iter()
        .map(|(id, p)| (id, p.name().to_string(), p.trainable()))
        .collect();
    let mut reports = Vec::new();
    for (id, name, trainable) in &list {
        let id = *id;
        if !trainable {
            // Frozen inputs must not have received a gradient buffer at all.
            if grads.get(id).is_some() {
                return Err(Error::invalid(
                    "gradcheck",
                    format!("frozen input '{name}' has a gradient"),
                ));
            }
            continue;
        }
        let analytic = grads
            .get(id)
            .expect("trainable input has a gradient")
            .to_vec()?;
        let n = analytic.len();
        let mut positions: Vec<usize> = (0..n).collect();
        if n > opts.samples {
            rng.shuffle(&mut positions);
            positions.truncate(opts.samples.saturating_sub(2));
            positions.extend([0, n - 1]);
        }
        let base = params(state).get(id).to_vec()?;
        let (mut diff2, mut num2) = (0.0f64, 0.0f64);
        let mut worst: Option<(usize, f64, f64)> = None;
        for &j in &positions {
            let mut v = base.clone();
            v[j] = base[j] + opts.eps;
            params(state).set(id, &v)?;
            let lp = eval(state)?;
            v[j] = base[j] - opts.eps;
            params(state).set(id, &v)?;
            let lm = eval(state)?;
            params(state).set(id, &base)?;
            let numeric = (lp - lm) / (2.0 * (opts.eps as f64));
            let a = analytic[j] as f64;
            diff2 += (a - numeric).powi(2);
            num2 += numeric.powi(2);
            if worst.is_none_or(|w| (w.1 - w.2).abs() < (a - numeric).abs()) {
                worst = Some((j, a, numeric));
            }
        }
        let grad_norm = num2.sqrt();
        reports.push(InputReport {
            name: name.clone(),
            checked: positions.len(),
            rel_err: diff2.sqrt() / grad_norm.max(1e-12),
            worst,
            grad_norm,
        });
    }
    Ok(reports)
}

/// [`check`], then panic with the details when any input fails or has a vanishing gradient
/// (which would make the comparison meaningless).
pub fn assert_gradients<F>(inputs: Vec<Input>, f: F, opts: &CheckOptions)
where
    F: Fn(&Tape, &[Var]) -> Result<Var>,
{
    let reports = check(inputs, f, opts).expect("gradient check ran");
    assert!(!reports.is_empty(), "no trainable input to check");
    for r in &reports {
        assert!(
            r.grad_norm > 1e-6,
            "{}: numeric gradient vanishes ({:e}); the check would prove nothing",
            r.name,
            r.grad_norm
        );
        assert!(
            r.rel_err < opts.rel_tol,
            "{}: relative gradient error {:.3e} over {} positions (worst at {:?}: analytic, numeric)",
            r.name,
            r.rel_err,
            r.checked,
            r.worst
        );
    }
}
