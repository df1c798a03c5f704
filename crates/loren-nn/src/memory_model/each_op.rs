//! Each op's rule in the replay against a device, one op at a time: the bytes by tag that its
//! forward and its backward add over what was live before them. A whole step's peaks show only
//! the temporaries that happen to sit under the step's high-water mark; here each op's own
//! temporaries are its peak, so a rule that books too little or too much shows on its own. On
//! the CPU against `Precision::CPU`; on a GPU (the emulated one in `scripts/test.sh`) against
//! `Precision::GPU_BF16`, whose ops make other temporaries.

use std::rc::Rc;
use std::sync::Arc;

use loren_autograd::{Tape as RealTape, Var as RealVar, ops};
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
    Attention {
        gq: usize,
        gkv: usize,
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

const CASES: [Case; 20] = [
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
    Case::Attention { gq: 2, gkv: 2 },
    Case::Attention { gq: 1, gkv: 2 },
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

/// The case's forward and backward on `dev`, through `loren_autograd`.
fn on_device(case: Case, dev: &Device) -> [Rise; 2] {
    let tape = RealTape::new();
    let make = |dims: &[usize], dtype: DType, tag: MemTag, grad: bool| {
        let t = Tensor::full_as(0.01, dims.to_vec(), dtype, tag, dev).unwrap();
        match grad {
            true => tape.input(Arc::new(t)),
            false => RealVar::constant(t),
        }
    };
    let act = |g: usize, last: usize| {
        make(
            &[g, BATCH, TOKENS, last],
            dev.compute_dtype(),
            MemTag::Activations,
            true,
        )
    };
    // Weight matrices as the GEMMs read them (bf16 on a GPU); everything else f32.
    let matrix = |dims: &[usize], grad: bool| make(dims, DType::BF16, MemTag::FrozenWeights, grad);
    let param = |dims: &[usize], grad: bool| make(dims, DType::F32, MemTag::Trainable, grad);
    let mem = dev.memory();
    let start = || {
        mem.reset_peaks();
        mem.report()
    };
    // Weights live as long as their model; activations only while something holds them.
    let (y, begin, _weights) = match case {
        Case::Linear {
            gx,
            gw,
            train_w,
            again,
        } => {
            let x = act(gx, DIM);
            let ws = [0, 1].map(|_| matrix(&[gw, WIDE, DIM], train_w));
            let bs = [0, 1].map(|_| param(&[gw, WIDE], train_w));
            let begin = start();
            let y = ops::linear(&tape, &x, &ws[0], Some(&bs[0]), None).unwrap();
            let y = match again {
                true => ops::linear(&tape, &x, &ws[1], Some(&bs[1]), Some(&y)).unwrap(),
                false => y,
            };
            (y, begin, [ws, bs].concat())
        }
        Case::Logits => {
            let x = make(
                &[2, BATCH, DIM],
                dev.compute_dtype(),
                MemTag::Activations,
                true,
            );
            let (w, b) = (matrix(&[2, CLASSES, DIM], true), param(&[2, CLASSES], true));
            let begin = start();
            (
                ops::logits(&tape, &x, &w, Some(&b)).unwrap(),
                begin,
                vec![w, b],
            )
        }
        Case::Lora { gx, again } => {
            let x = act(gx, DIM);
            let (w, bias) = (matrix(&[1, DIM, DIM], false), param(&[1, DIM], false));
            let ab = [0, 1].map(|_| (param(&[2, RANK, DIM], true), param(&[2, DIM, RANK], true)));
            let lora = |(a, b): &(RealVar, RealVar), residual| {
                ops::lora_linear(&tape, &x, &w, Some(&bias), a, b, 2.0, residual).unwrap()
            };
            let begin = start();
            let y = lora(&ab[0], None);
            let y = match again {
                true => lora(&ab[1], Some(&y)),
                false => y,
            };
            let [(a0, b0), (a1, b1)] = ab;
            (y, begin, vec![w, bias, a0, b0, a1, b1])
        }
        Case::Attention { gq, gkv } => {
            let (q, k, v) = (act(gq, DIM), act(gkv, DIM), act(gkv, DIM));
            let begin = start();
            let y = ops::attention(&tape, &q, &k, &v, HEADS, None).unwrap();
            (y, begin, vec![])
        }
        Case::LayerNorm { gx, gw, affine } => {
            let x = act(gx, DIM);
            let (g, b) = (param(&[gw, DIM], affine), param(&[gw, DIM], affine));
            let begin = start();
            (
                ops::layernorm(&tape, &x, &g, &b, 1e-6).unwrap(),
                begin,
                vec![g, b],
            )
        }
        Case::BiasGelu { gx, gb, train_b } => {
            let x = act(gx, WIDE);
            let b = param(&[gb, WIDE], train_b);
            let begin = start();
            (ops::bias_gelu(&tape, &x, &b).unwrap(), begin, vec![b])
        }
        Case::Embed {
            ge,
            gc,
            train_tokens,
        } => {
            let pe = make(
                &[ge, BATCH, TOKENS - 1, DIM],
                dev.compute_dtype(),
                MemTag::Activations,
                true,
            );
            let cls = param(&[gc, DIM], train_tokens);
            let pos = param(&[gc, TOKENS, DIM], train_tokens);
            let begin = start();
            let y = ops::embed_tokens(&tape, &pe, &cls, &pos).unwrap();
            (y, begin, vec![cls, pos])
        }
        Case::CrossEntropy => {
            let logits = make(&[2, BATCH, CLASSES], DType::F32, MemTag::Activations, true);
            let targets: Vec<u32> = (0..BATCH as u32).collect();
            let begin = start();
            let y = ops::softmax_cross_entropy(&tape, &logits, &targets).unwrap();
            (y, begin, vec![])
        }
    };
    let fwd = device_rise(&begin, &mem.report());
    let dy = Tensor::full_as(
        0.01,
        y.shape().clone(),
        y.value().dtype(),
        MemTag::Workspace,
        dev,
    )
    .unwrap();
    let begin = start();
    let root = y.node().expect("the case's output needs a gradient");
    drop(tape.gradients(root, Arc::new(dy), &[]).unwrap());
    [fwd, device_rise(&begin, &mem.report())]
}

/// The same case replayed at `precision`.
fn replayed(case: Case, precision: Precision) -> [Rise; 2] {
    let core = Rc::new(Core {
        ledger: RefCell::default(),
        precision,
        flops: Cell::new(0.0),
        recomputed: Cell::new(0.0),
    });
    let tape = Tape::new(true);
    let make = |dims: &[usize], tag: MemTag, kind: Kind, grad: bool| Var {
        val: Rc::new(core.tensor(dims.to_vec(), tag, kind)),
        node: grad.then(|| tape.new_node()),
    };
    let act = |g: usize, last: usize| {
        make(
            &[g, BATCH, TOKENS, last],
            MemTag::Activations,
            Kind::Activation,
            true,
        )
    };
    let matrix = |dims: &[usize], grad: bool| make(dims, MemTag::FrozenWeights, Kind::Matrix, grad);
    let param = |dims: &[usize], grad: bool| make(dims, MemTag::Trainable, Kind::Param, grad);
    let ledger_rise = |start: &Ledger| {
        let l = core.ledger.borrow();
        rise(
            |t| t.map_or(start.total_live, |t| start.live[tag_index(t)]),
            |t| t.map_or(l.total_peak, |t| l.peak[tag_index(t)]),
        )
    };
    let start = || {
        let mut l = core.ledger.borrow_mut();
        l.reset_peaks();
        l.clone()
    };
    let (y, begin, _weights) = match case {
        Case::Linear {
            gx,
            gw,
            train_w,
            again,
        } => {
            let x = act(gx, DIM);
            let ws = [0, 1].map(|_| matrix(&[gw, WIDE, DIM], train_w));
            let bs = [0, 1].map(|_| param(&[gw, WIDE], train_w));
            let begin = start();
            let y = linear(&core, &tape, &x, &ws[0], Some(&bs[0]), None);
            let y = match again {
                true => linear(&core, &tape, &x, &ws[1], Some(&bs[1]), Some(&y)),
                false => y,
            };
            (y, begin, [ws, bs].concat())
        }
        Case::Logits => {
            let x = make(
                &[2, BATCH, DIM],
                MemTag::Activations,
                Kind::Activation,
                true,
            );
            let (w, b) = (matrix(&[2, CLASSES, DIM], true), param(&[2, CLASSES], true));
            let begin = start();
            let y = product(&core, &tape, &x, &w, Some(&b), Kind::Stat, None);
            (y, begin, vec![w, b])
        }
        Case::Lora { gx, again } => {
            let x = act(gx, DIM);
            let (w, bias) = (matrix(&[1, DIM, DIM], false), param(&[1, DIM], false));
            let ab = [0, 1].map(|_| (param(&[2, RANK, DIM], true), param(&[2, DIM, RANK], true)));
            let lora = |(a, b): &(Var, Var), residual| {
                lora_linear(&core, &tape, &x, (&w, Some(&bias)), (a, b), residual)
            };
            let begin = start();
            let y = lora(&ab[0], None);
            let y = match again {
                true => lora(&ab[1], Some(&y)),
                false => y,
            };
            let [(a0, b0), (a1, b1)] = ab;
            (y, begin, vec![w, bias, a0, b0, a1, b1])
        }
        Case::Attention { gq, gkv } => {
            let (q, k, v) = (act(gq, DIM), act(gkv, DIM), act(gkv, DIM));
            let begin = start();
            let y = attention(&core, &tape, [&q, &k, &v], HEADS, None);
            (y, begin, vec![])
        }
        Case::LayerNorm { gx, gw, affine } => {
            let x = act(gx, DIM);
            let (g, b) = (param(&[gw, DIM], affine), param(&[gw, DIM], affine));
            let begin = start();
            (layernorm(&core, &tape, &x, &g, &b), begin, vec![g, b])
        }
        Case::BiasGelu { gx, gb, train_b } => {
            let x = act(gx, WIDE);
            let b = param(&[gb, WIDE], train_b);
            let begin = start();
            (bias_gelu(&core, &tape, &x, &b), begin, vec![b])
        }
        Case::Embed {
            ge,
            gc,
            train_tokens,
        } => {
            let pe = make(
                &[ge, BATCH, TOKENS - 1, DIM],
                MemTag::Activations,
                Kind::Activation,
                true,
            );
            let cls = param(&[gc, DIM], train_tokens);
            let pos = param(&[gc, TOKENS, DIM], train_tokens);
            let begin = start();
            let y = embed_tokens(&core, &tape, &pe, &cls, &pos);
            (y, begin, vec![cls, pos])
        }
        Case::CrossEntropy => {
            let logits = make(&[2, BATCH, CLASSES], MemTag::Activations, Kind::Stat, true);
            let begin = start();
            (cross_entropy(&core, &tape, &logits), begin, vec![])
        }
    };
    let fwd = ledger_rise(&begin);
    // The seed as the device's: the output's own element type.
    let kind = match y.val.kind {
        Kind::Activation => Kind::ActGrad,
        other => other,
    };
    let seed = core.tensor(y.dims().to_vec(), MemTag::Workspace, kind);
    let begin = start();
    let root = y.node.expect("the case's output needs a gradient");
    drop(run_records(&core, tape, root, Rc::new(seed)));
    [fwd, ledger_rise(&begin)]
}

fn check_each_op(dev: &Device, precision: Precision) {
    let mut wrong = Vec::new();
    for case in CASES {
        let (got, want) = (on_device(case, dev), replayed(case, precision));
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

#[test]
fn on_a_gpu_each_op_books_what_the_replay_books() {
    if let Err(e) = loren_kernels::cuda_available() {
        loren_kernels::skip_without_gpu(format!("no CUDA device ({e})"));
        return;
    }
    let dev = DeviceSpec::Cuda(0).open().unwrap();
    check_each_op(&dev, Precision::GPU_BF16);
}
