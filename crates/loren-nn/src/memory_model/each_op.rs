//! Each op's rule in the replay against a device, one op at a time: the bytes by tag that its
//! forward and its backward add over what was live before them. A whole step's peaks show only
//! the temporaries that happen to sit under the step's high-water mark; here each op's own
//! temporaries are its peak, so a rule that books too little or too much shows on its own. On
//! the CPU against `Precision::CPU`; on a GPU (the emulated one in `scripts/test.sh`) against
//! `Precision::GPU_BF16`, whose ops make other temporaries.

use std::rc::Rc;
use std::sync::Arc;

use loren_autograd::{Tape as RealTape, Var as RealVar, ops};
use loren_tensor::ops::dropkey::DropKey;
use loren_tensor::{DType, Device, DeviceSpec, MemTag, MemoryReport, Tensor};

use super::*;

const BATCH: usize = 2;
/// 300 rows per group: two 256-row chunks of the GPU's column sums, and dA and dB's rows split
/// in two ranges.
const TOKENS: usize = 150;
const DIM: usize = 64;
const HEADS: usize = 2;
const WIDE: usize = 128;
const RANK: usize = 8;
const CLASSES: usize = 10;

/// One op and the groups of its operands (1: shared by the members; 2: one per member).
#[derive(Clone, Copy, Debug)]
enum Case {
    /// A product `x·Wᵀ (+ b)`; `again`: a second product of the same x takes the first's output
    /// as its residual, so the first's backward finds x's gradient begun.
    Linear {
        gx: usize,
        gw: usize,
        train_w: bool,
        again: bool,
    },
    /// The head's product, f32 out, on class tokens.
    Logits,
    /// A frozen W with bias and per-member adapters.
    Lora {
        gx: usize,
        again: bool,
    },
    /// `dropped`: MC Dropout's DropKey, a mask per member, so two output groups whatever the
    /// inputs'.
    Attention {
        gq: usize,
        gkv: usize,
        dropped: bool,
    },
    LayerNorm {
        gx: usize,
        gw: usize,
        affine: bool,
    },
    BiasGelu {
        gx: usize,
        gb: usize,
        train_b: bool,
    },
    /// `train_tokens`: the class and position tokens trained too.
    Embed {
        ge: usize,
        gc: usize,
        train_tokens: bool,
    },
    CrossEntropy,
}

const CASES: [Case; 21] = [
    Case::Linear {
        gx: 1,
        gw: 1,
        train_w: false,
        again: false,
    },
    Case::Linear {
        gx: 2,
        gw: 1,
        train_w: false,
        again: true,
    },
    Case::Linear {
        gx: 2,
        gw: 2,
        train_w: true,
        again: true,
    },
    Case::Linear {
        gx: 1,
        gw: 2,
        train_w: true,
        again: false,
    },
    Case::Linear {
        gx: 1,
        gw: 2,
        train_w: true,
        again: true,
    },
    Case::Logits,
    Case::Lora { gx: 1, again: true },
    Case::Lora { gx: 2, again: true },
    Case::Attention {
        gq: 2,
        gkv: 2,
        dropped: false,
    },
    Case::Attention {
        gq: 1,
        gkv: 2,
        dropped: false,
    },
    Case::Attention {
        gq: 1,
        gkv: 1,
        dropped: true,
    },
    Case::LayerNorm {
        gx: 2,
        gw: 2,
        affine: true,
    },
    Case::LayerNorm {
        gx: 1,
        gw: 2,
        affine: true,
    },
    Case::LayerNorm {
        gx: 2,
        gw: 1,
        affine: false,
    },
    Case::BiasGelu {
        gx: 2,
        gb: 2,
        train_b: true,
    },
    Case::BiasGelu {
        gx: 2,
        gb: 1,
        train_b: false,
    },
    Case::BiasGelu {
        gx: 1,
        gb: 2,
        train_b: true,
    },
    Case::Embed {
        ge: 2,
        gc: 2,
        train_tokens: true,
    },
    Case::Embed {
        ge: 1,
        gc: 2,
        train_tokens: true,
    },
    Case::Embed {
        ge: 1,
        gc: 2,
        train_tokens: false,
    },
    Case::CrossEntropy,
];

/// Bytes by tag, then the total, that a window rose above what was live when it began.
type Rise = [u64; 7];

fn rise(live: impl Fn(Option<MemTag>) -> u64, peak: impl Fn(Option<MemTag>) -> u64) -> Rise {
    let mut r = [0; 7];
    for (i, tag) in MemTag::ALL.into_iter().map(Some).chain([None]).enumerate() {
        r[i] = peak(tag) - live(tag);
    }
    r
}

fn device_rise(start: &MemoryReport, end: &MemoryReport) -> Rise {
    rise(
        |t| t.map_or(start.total_live, |t| start.live(t)),
        |t| t.map_or(end.total_peak, |t| end.peak(t)),
    )
}

fn ledger_rise(start: &Ledger, end: &Ledger) -> Rise {
    rise(
        |t| t.map_or(start.total_live, |t| start.live[tag_index(t)]),
        |t| t.map_or(end.total_peak, |t| end.peak[tag_index(t)]),
    )
}

/// What an operand is, which sets its tag and element type.
#[derive(Clone, Copy)]
enum Operand {
    Activation,
    /// A weight matrix as the GEMMs read it (bf16 on a GPU).
    Matrix,
    /// Any other weight: f32.
    Param,
    /// The logits: an f32 activation.
    Logits,
}

/// Where a case runs: a device through `loren_autograd`, or the replay. Each case is written once,
/// against this, so both run the same operands and ops.
trait World {
    type V;
    fn operand(&self, dims: &[usize], what: Operand, grad: bool) -> Self::V;
    fn linear(&self, x: &Self::V, w: &Self::V, b: &Self::V, residual: Option<&Self::V>) -> Self::V;
    fn logits(&self, x: &Self::V, w: &Self::V, b: &Self::V) -> Self::V;
    fn lora(
        &self,
        x: &Self::V,
        w: &Self::V,
        bias: &Self::V,
        a: &Self::V,
        b: &Self::V,
        residual: Option<&Self::V>,
    ) -> Self::V;
    /// With `dropped`, DropKey's masks for two members.
    fn attention(&self, q: &Self::V, k: &Self::V, v: &Self::V, dropped: bool) -> Self::V;
    fn layernorm(&self, x: &Self::V, g: &Self::V, b: &Self::V) -> Self::V;
    fn bias_gelu(&self, x: &Self::V, b: &Self::V) -> Self::V;
    fn embed(&self, pe: &Self::V, cls: &Self::V, pos: &Self::V) -> Self::V;
    fn cross_entropy(&self, logits: &Self::V) -> Self::V;
    /// Begin a window: what is live now is its floor.
    fn start(&self);
    /// What the window has risen to.
    fn rise(&self) -> Rise;
    /// The backward from `y`, seeded with a gradient of its own element type, in a window of
    /// its own.
    fn backward(self, y: Self::V) -> Rise;
}

/// The case's forward and backward in `w`: the rise of each.
fn run_case<W: World>(w: W, case: Case) -> [Rise; 2] {
    use Operand::*;
    let act = |g: usize, last: usize| w.operand(&[g, BATCH, TOKENS, last], Activation, true);
    // Weights live as long as their model; activations only while something holds them.
    let (y, _weights) = match case {
        Case::Linear {
            gx,
            gw,
            train_w,
            again,
        } => {
            let x = act(gx, DIM);
            let ws = [0, 1].map(|_| w.operand(&[gw, WIDE, DIM], Matrix, train_w));
            let bs = [0, 1].map(|_| w.operand(&[gw, WIDE], Param, train_w));
            w.start();
            let y = w.linear(&x, &ws[0], &bs[0], None);
            let y = match again {
                true => w.linear(&x, &ws[1], &bs[1], Some(&y)),
                false => y,
            };
            (y, [ws, bs].into_iter().flatten().collect())
        }
        Case::Logits => {
            let x = w.operand(&[2, BATCH, DIM], Activation, true);
            let weight = w.operand(&[2, CLASSES, DIM], Matrix, true);
            let b = w.operand(&[2, CLASSES], Param, true);
            w.start();
            (w.logits(&x, &weight, &b), vec![weight, b])
        }
        Case::Lora { gx, again } => {
            let x = act(gx, DIM);
            let weight = w.operand(&[1, DIM, DIM], Matrix, false);
            let bias = w.operand(&[1, DIM], Param, false);
            let [(a0, b0), (a1, b1)] = [0, 1].map(|_| {
                let a = w.operand(&[2, RANK, DIM], Param, true);
                (a, w.operand(&[2, DIM, RANK], Param, true))
            });
            w.start();
            let y = w.lora(&x, &weight, &bias, &a0, &b0, None);
            let y = match again {
                true => w.lora(&x, &weight, &bias, &a1, &b1, Some(&y)),
                false => y,
            };
            (y, vec![weight, bias, a0, b0, a1, b1])
        }
        Case::Attention { gq, gkv, dropped } => {
            let (q, k, v) = (act(gq, DIM), act(gkv, DIM), act(gkv, DIM));
            w.start();
            (w.attention(&q, &k, &v, dropped), vec![])
        }
        Case::LayerNorm { gx, gw, affine } => {
            let x = act(gx, DIM);
            let g = w.operand(&[gw, DIM], Param, affine);
            let b = w.operand(&[gw, DIM], Param, affine);
            w.start();
            (w.layernorm(&x, &g, &b), vec![g, b])
        }
        Case::BiasGelu { gx, gb, train_b } => {
            let x = act(gx, WIDE);
            let b = w.operand(&[gb, WIDE], Param, train_b);
            w.start();
            (w.bias_gelu(&x, &b), vec![b])
        }
        Case::Embed {
            ge,
            gc,
            train_tokens,
        } => {
            let pe = w.operand(&[ge, BATCH, TOKENS - 1, DIM], Activation, true);
            let cls = w.operand(&[gc, DIM], Param, train_tokens);
            let pos = w.operand(&[gc, TOKENS, DIM], Param, train_tokens);
            w.start();
            (w.embed(&pe, &cls, &pos), vec![cls, pos])
        }
        Case::CrossEntropy => {
            let logits = w.operand(&[2, BATCH, CLASSES], Logits, true);
            w.start();
            (w.cross_entropy(&logits), vec![])
        }
    };
    let forward = w.rise();
    [forward, w.backward(y)]
}

/// A device, through `loren_autograd`.
struct OnDevice<'a> {
    dev: &'a Device,
    tape: RealTape,
    begin: Cell<MemoryReport>,
}

impl World for OnDevice<'_> {
    type V = RealVar;

    fn operand(&self, dims: &[usize], what: Operand, grad: bool) -> RealVar {
        let (dtype, tag) = match what {
            Operand::Activation => (self.dev.compute_dtype(), MemTag::Activations),
            Operand::Matrix => (DType::BF16, MemTag::FrozenWeights),
            Operand::Param => (DType::F32, MemTag::Trainable),
            Operand::Logits => (DType::F32, MemTag::Activations),
        };
        let t = Tensor::full_as(0.01, dims.to_vec(), dtype, tag, self.dev).unwrap();
        match grad {
            true => self.tape.input(Arc::new(t)),
            false => RealVar::constant(t),
        }
    }

    fn linear(&self, x: &RealVar, w: &RealVar, b: &RealVar, r: Option<&RealVar>) -> RealVar {
        ops::linear(&self.tape, x, w, Some(b), r).unwrap()
    }

    fn logits(&self, x: &RealVar, w: &RealVar, b: &RealVar) -> RealVar {
        ops::logits(&self.tape, x, w, Some(b)).unwrap()
    }

    fn lora(
        &self,
        x: &RealVar,
        w: &RealVar,
        bias: &RealVar,
        a: &RealVar,
        b: &RealVar,
        r: Option<&RealVar>,
    ) -> RealVar {
        ops::lora_linear(&self.tape, x, w, Some(bias), a, b, 2.0, r).unwrap()
    }

    fn attention(&self, q: &RealVar, k: &RealVar, v: &RealVar, dropped: bool) -> RealVar {
        let drop = dropped.then(|| DropKey::new(0.1, 7, 2).unwrap());
        ops::attention(&self.tape, q, k, v, HEADS, drop).unwrap()
    }

    fn layernorm(&self, x: &RealVar, g: &RealVar, b: &RealVar) -> RealVar {
        ops::layernorm(&self.tape, x, g, b, 1e-6).unwrap()
    }

    fn bias_gelu(&self, x: &RealVar, b: &RealVar) -> RealVar {
        ops::bias_gelu(&self.tape, x, b).unwrap()
    }

    fn embed(&self, pe: &RealVar, cls: &RealVar, pos: &RealVar) -> RealVar {
        ops::embed_tokens(&self.tape, pe, cls, pos).unwrap()
    }

    fn cross_entropy(&self, logits: &RealVar) -> RealVar {
        let targets: Vec<u32> = (0..BATCH as u32).collect();
        ops::softmax_cross_entropy(&self.tape, logits, &targets).unwrap()
    }

    fn start(&self) {
        self.dev.memory().reset_peaks();
        self.begin.set(self.dev.memory().report());
    }

    fn rise(&self) -> Rise {
        device_rise(&self.begin.get(), &self.dev.memory().report())
    }

    fn backward(self, y: RealVar) -> Rise {
        let dy = Tensor::full_as(
            0.01,
            y.shape().clone(),
            y.value().dtype(),
            MemTag::Workspace,
            self.dev,
        )
        .unwrap();
        let root = y.node().expect("the case's output needs a gradient");
        self.start();
        let OnDevice { dev, tape, begin } = self;
        drop(tape.gradients(root, Arc::new(dy), &[]).unwrap());
        device_rise(&begin.get(), &dev.memory().report())
    }
}

/// The replay at a precision.
struct Replayed {
    core: Rc<Core>,
    tape: Tape,
    begin: RefCell<Ledger>,
}

impl Replayed {
    fn new(precision: Precision) -> Replayed {
        Replayed {
            core: Rc::new(Core {
                ledger: RefCell::default(),
                precision,
                flops: Cell::new(0.0),
                recomputed: Cell::new(0.0),
            }),
            tape: Tape::new(true),
            begin: RefCell::default(),
        }
    }
}

impl World for Replayed {
    type V = Var;

    fn operand(&self, dims: &[usize], what: Operand, grad: bool) -> Var {
        let (tag, kind) = match what {
            Operand::Activation => (MemTag::Activations, Kind::Activation),
            Operand::Matrix => (MemTag::FrozenWeights, Kind::Matrix),
            Operand::Param => (MemTag::Trainable, Kind::Param),
            Operand::Logits => (MemTag::Activations, Kind::Stat),
        };
        Var {
            val: Rc::new(self.core.tensor(dims.to_vec(), tag, kind)),
            node: grad.then(|| self.tape.new_node()),
        }
    }

    fn linear(&self, x: &Var, w: &Var, b: &Var, r: Option<&Var>) -> Var {
        linear(&self.core, &self.tape, x, w, Some(b), r)
    }

    fn logits(&self, x: &Var, w: &Var, b: &Var) -> Var {
        product(&self.core, &self.tape, x, w, Some(b), Kind::Stat, None)
    }

    fn lora(&self, x: &Var, w: &Var, bias: &Var, a: &Var, b: &Var, r: Option<&Var>) -> Var {
        lora_linear(&self.core, &self.tape, x, (w, Some(bias)), (a, b), r)
    }

    fn attention(&self, q: &Var, k: &Var, v: &Var, dropped: bool) -> Var {
        attention(
            &self.core,
            &self.tape,
            [q, k, v],
            HEADS,
            dropped.then_some(2),
        )
    }

    fn layernorm(&self, x: &Var, g: &Var, b: &Var) -> Var {
        layernorm(&self.core, &self.tape, x, g, b)
    }

    fn bias_gelu(&self, x: &Var, b: &Var) -> Var {
        bias_gelu(&self.core, &self.tape, x, b)
    }

    fn embed(&self, pe: &Var, cls: &Var, pos: &Var) -> Var {
        embed_tokens(&self.core, &self.tape, pe, cls, pos)
    }

    fn cross_entropy(&self, logits: &Var) -> Var {
        cross_entropy(&self.core, &self.tape, logits)
    }

    fn start(&self) {
        let mut l = self.core.ledger.borrow_mut();
        l.reset_peaks();
        *self.begin.borrow_mut() = l.clone();
    }

    fn rise(&self) -> Rise {
        ledger_rise(&self.begin.borrow(), &self.core.ledger.borrow())
    }

    fn backward(self, y: Var) -> Rise {
        // The seed as the device's: the output's own element type.
        let kind = match y.val.kind {
            Kind::Activation => Kind::ActGrad,
            other => other,
        };
        let seed = self.core.tensor(y.dims().to_vec(), MemTag::Workspace, kind);
        let root = y.node.expect("the case's output needs a gradient");
        self.start();
        let Replayed { core, tape, begin } = self;
        drop(run_records(&core, tape, root, Rc::new(seed)));
        let end = core.ledger.borrow();
        ledger_rise(&begin.borrow(), &end)
    }
}

fn check_each_op(dev: &Device, precision: Precision) {
    let mut wrong = Vec::new();
    for case in CASES {
        let device = OnDevice {
            dev,
            tape: RealTape::new(),
            begin: Cell::new(dev.memory().report()),
        };
        let (got, want) = (
            run_case(device, case),
            run_case(Replayed::new(precision), case),
        );
        for (pass, (g, w)) in ["forward", "backward"].iter().zip(got.iter().zip(&want)) {
            if g != w {
                wrong.push(format!(
                    "{case:?} {pass}: device {g:?}, replay {w:?} (by tag, then the total)"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the replay books other bytes than {} ({}):\n{}",
        dev.name(),
        precision.name,
        wrong.join("\n")
    );
}

#[test]
fn each_op_books_on_the_cpu_what_the_replay_books() {
    check_each_op(&Device::cpu(), Precision::CPU);
}

/// GPU 0, or none (said to be skipped) where there is no GPU.
fn gpu() -> Option<Device> {
    if let Err(e) = loren_kernels::cuda_available() {
        loren_kernels::skip_without_gpu(format!("no CUDA device ({e})"));
        return None;
    }
    Some(DeviceSpec::Cuda(0).open().unwrap())
}

#[test]
fn on_a_gpu_each_op_books_what_the_replay_books() {
    if let Some(dev) = gpu() {
        check_each_op(&dev, Precision::GPU_BF16);
    }
}

#[test]
fn on_a_gpu_an_inference_pass_books_what_the_replay_books() {
    if let Some(dev) = gpu() {
        super::tests::check_inference(&dev, Precision::GPU_BF16);
    }
}
