//! Every op's backward against central finite differences, on fresh random inputs at odd sizes
//! (T = 17, r = 1 and 5, M = 3), including the group-broadcast cases the ensembles use.

use loren_autograd::gradcheck::{CheckOptions, Input, assert_gradients, check, randn};
use loren_autograd::ops;
use loren_autograd::{Backward, GradSink, Tape, Var};
use loren_tensor::ops::dropkey::DropKey;
use loren_tensor::{Device, Result, Rng, Tensor};

const M: usize = 3;
const B: usize = 2;
const T: usize = 17;

fn opts() -> CheckOptions {
    CheckOptions::default()
}

/// Random inputs named and shaped by `spec`; those named in `frozen` get no gradient.
fn inputs(dev: &Device, rng: &mut Rng, spec: &[(&str, &[usize])], frozen: &[&str]) -> Vec<Input> {
    spec.iter()
        .map(|(name, shape)| Input::new(name, randn(shape, rng, dev), !frozen.contains(name)))
        .collect()
}

#[test]
fn linear_shared_weight_over_member_rows() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(1));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("x", &[M, B, T, 7]), ("w", &[1, 5, 7]), ("b", &[1, 5])],
        &[],
    );
    assert_gradients(
        ins,
        |t, v| ops::linear(t, &v[0], &v[1], Some(&v[2]), None),
        &opts(),
    );
}

#[test]
fn linear_per_member_weight_on_shared_input() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(2));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("x", &[1, B, T, 6]), ("w", &[M, 4, 6]), ("b", &[M, 4])],
        &[],
    );
    assert_gradients(
        ins,
        |t, v| ops::linear(t, &v[0], &v[1], Some(&v[2]), None),
        &opts(),
    );
}

#[test]
fn linear_per_member_weight_on_member_input_without_bias() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(3));
    let ins = inputs(&dev, &mut rng, &[("x", &[M, B, 5]), ("w", &[M, 4, 5])], &[]);
    assert_gradients(
        ins,
        |t, v| ops::linear(t, &v[0], &v[1], None, None),
        &opts(),
    );
}

/// `residual`: the groups of a residual added in the store (0: none).
fn lora_case(gx: usize, r: usize, residual: usize, seed: u64) {
    let (dev, mut rng) = (Device::cpu(), Rng::new(seed));
    let (k, n) = (6, 5);
    let shapes = [
        vec![gx, B, T, k],
        vec![1, n, k],
        vec![1, n],
        vec![M, r, k],
        vec![M, n, r],
        vec![residual, B, T, n],
    ];
    let names = ["x", "w", "bias", "a", "b", "residual"];
    let used = if residual > 0 { 6 } else { 5 };
    let spec: Vec<(&str, &[usize])> = (0..used).map(|i| (names[i], &shapes[i][..])).collect();
    let ins = inputs(&dev, &mut rng, &spec, &["w", "bias"]);
    assert_gradients(
        ins,
        |t, v| ops::lora_linear(t, &v[0], &v[1], Some(&v[2]), &v[3], &v[4], 0.7, v.get(5)),
        &opts(),
    );
}

#[test]
fn lora_linear_member_input_rank_1() {
    lora_case(M, 1, 0, 4);
}

#[test]
fn lora_linear_member_input_rank_5_member_residual() {
    lora_case(M, 5, M, 5);
}

#[test]
fn lora_linear_shared_input_rank_5_shared_residual() {
    lora_case(1, 5, 1, 6);
}

#[test]
fn lora_linear_shared_input_rank_1() {
    lora_case(1, 1, 0, 7);
}

/// The attention half of a LoRA block: x + lora(layernorm(x)), the residual joined in the
/// projection's store and its gradient taken by LayerNorm's; on the members' own streams and on
/// the shared one that the first block reads.
fn lora_sublayer_case(gx: usize, seed: u64) {
    let (dev, mut rng) = (Device::cpu(), Rng::new(seed));
    let ins = inputs(
        &dev,
        &mut rng,
        &[
            ("x", &[gx, B, T, 6]),
            ("gamma", &[1, 6]),
            ("beta", &[1, 6]),
            ("w", &[1, 6, 6]),
            ("a", &[M, 2, 6]),
            ("b", &[M, 6, 2]),
        ],
        &["gamma", "beta", "w"],
    );
    assert_gradients(
        ins,
        |t, v| {
            let h = ops::layernorm(t, &v[0], &v[1], &v[2], 1e-5)?;
            ops::lora_linear(t, &h, &v[3], None, &v[4], &v[5], 0.7, Some(&v[0]))
        },
        &opts(),
    );
}

#[test]
fn lora_sublayer_on_member_streams() {
    lora_sublayer_case(M, 8);
}

#[test]
fn lora_sublayer_on_the_shared_stream() {
    lora_sublayer_case(1, 9);
}

#[test]
fn layernorm_shared_affine_over_members() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(8));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("x", &[M, B, T, 9]), ("gamma", &[1, 9]), ("beta", &[1, 9])],
        &[],
    );
    assert_gradients(
        ins,
        |t, v| ops::layernorm(t, &v[0], &v[1], &v[2], 1e-5),
        &opts(),
    );
}

#[test]
fn layernorm_member_affine_on_shared_input() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(9));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("x", &[1, B, T, 9]), ("gamma", &[M, 9]), ("beta", &[M, 9])],
        &[],
    );
    assert_gradients(
        ins,
        |t, v| ops::layernorm(t, &v[0], &v[1], &v[2], 1e-5),
        &opts(),
    );
}

#[test]
fn layernorm_input_only_with_frozen_affine() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(10));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("x", &[M, T, 9]), ("gamma", &[1, 9]), ("beta", &[1, 9])],
        &["gamma", "beta"],
    );
    assert_gradients(
        ins,
        |t, v| ops::layernorm(t, &v[0], &v[1], &v[2], 1e-5),
        &opts(),
    );
}

#[test]
fn attention_members_batch_heads() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(11));
    let ins = inputs(
        &dev,
        &mut rng,
        &[
            ("q", &[M, B, T, 8]),
            ("k", &[M, B, T, 8]),
            ("v", &[M, B, T, 8]),
        ],
        &[],
    );
    assert_gradients(
        ins,
        |t, v| ops::attention(t, &v[0], &v[1], &v[2], 2, None),
        &opts(),
    );
}

#[test]
fn attention_member_queries_on_shared_keys_and_values() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(12));
    let ins = inputs(
        &dev,
        &mut rng,
        &[
            ("q", &[M, B, T, 6]),
            ("k", &[1, B, T, 6]),
            ("v", &[1, B, T, 6]),
        ],
        &[],
    );
    assert_gradients(
        ins,
        |t, v| ops::attention(t, &v[0], &v[1], &v[2], 3, None),
        &opts(),
    );
}

/// MC Dropout's first attention: shared Q, K, V, and a group per member, each with masks of its
/// own. At 0.85 a row keeps 2.6 of its 17 keys on average, and 6% of the rows keep none.
#[test]
fn attention_dropkey_members_from_shared_inputs() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(21));
    let ins = inputs(
        &dev,
        &mut rng,
        &[
            ("q", &[1, B, T, 6]),
            ("k", &[1, B, T, 6]),
            ("v", &[1, B, T, 6]),
        ],
        &[],
    );
    let drop = DropKey::new(0.85, 9, M).unwrap();
    assert_gradients(
        ins,
        |t, v| ops::attention(t, &v[0], &v[1], &v[2], 3, Some(drop.clone())),
        &opts(),
    );
}

#[test]
fn bias_gelu_member_input_shared_bias() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(13));
    let ins = inputs(&dev, &mut rng, &[("x", &[M, B, T, 5]), ("b", &[1, 5])], &[]);
    assert_gradients(ins, |t, v| ops::bias_gelu(t, &v[0], &v[1]), &opts());
}

#[test]
fn bias_gelu_shared_input_member_bias() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(14));
    let ins = inputs(&dev, &mut rng, &[("x", &[1, B, T, 5]), ("b", &[M, 5])], &[]);
    assert_gradients(ins, |t, v| ops::bias_gelu(t, &v[0], &v[1]), &opts());
}

#[test]
fn residual_add_broadcasts_the_shared_stream() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(15));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("a", &[1, B, T, 4]), ("b", &[M, B, T, 4])],
        &[],
    );
    assert_gradients(ins, |t, v| ops::add(t, &v[0], &v[1]), &opts());
}

#[test]
fn embed_tokens_shared_and_member_embeddings() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(16));
    let p = T - 1;
    let ins = inputs(
        &dev,
        &mut rng,
        &[("pe", &[M, B, p, 4]), ("cls", &[1, 4]), ("pos", &[M, T, 4])],
        &[],
    );
    assert_gradients(
        ins,
        |t, v| ops::embed_tokens(t, &v[0], &v[1], &v[2]),
        &opts(),
    );
}

#[test]
fn class_token_then_per_member_head() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(17));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("x", &[M, B, T, 6]), ("head", &[M, 10, 6])],
        &[],
    );
    assert_gradients(
        ins,
        |t, v| {
            let c = ops::class_token(t, &v[0])?;
            ops::linear(t, &c, &v[1], None, None)
        },
        &opts(),
    );
}

#[test]
fn softmax_cross_entropy_shared_targets() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(18));
    let targets = [3u32, 0, 9, 9, 1];
    let ins = inputs(&dev, &mut rng, &[("logits", &[M, 5, 10])], &[]);
    assert_gradients(
        ins,
        |t, v| ops::softmax_cross_entropy(t, &v[0], &targets),
        &opts(),
    );
}

/// A pre-norm residual sublayer: x + linear(layernorm(x)), the shape of a transformer block.
fn sublayer(t: &Tape, v: &[Var]) -> Result<Var> {
    let h = ops::layernorm(t, &v[0], &v[1], &v[2], 1e-5)?;
    let y = ops::linear(t, &h, &v[3], Some(&v[4]), None)?;
    ops::add(t, &v[0], &y)
}

/// [`sublayer`] as the ViT runs it: the residual joined in the linear's product.
fn joined_sublayer(t: &Tape, v: &[Var]) -> Result<Var> {
    let h = ops::layernorm(t, &v[0], &v[1], &v[2], 1e-5)?;
    ops::linear(t, &h, &v[3], Some(&v[4]), Some(&v[0]))
}

fn sublayer_inputs(seed: u64, frozen: &[&str]) -> Vec<Input> {
    let (dev, mut rng) = (Device::cpu(), Rng::new(seed));
    inputs(
        &dev,
        &mut rng,
        &[
            ("x", &[M, B, T, 6]),
            ("gamma", &[1, 6]),
            ("beta", &[1, 6]),
            ("w", &[M, 6, 6]),
            ("b", &[M, 6]),
        ],
        frozen,
    )
}

/// LayerNorm's backward takes the gradient the residual add gave x and returns dx with it
/// added (`GradSink::take`); the add hands its one dy to both inputs.
#[test]
fn pre_norm_sublayer() {
    assert_gradients(sublayer_inputs(22, &[]), sublayer, &opts());
}

#[test]
fn pre_norm_sublayer_joined_in_the_product() {
    assert_gradients(sublayer_inputs(25, &[]), joined_sublayer, &opts());
}

/// The same on the members' shared stream, normalised by each member's affine: LayerNorm sums
/// its members' dx into the shared x before the residual's gradient joins.
#[test]
fn pre_norm_sublayer_on_the_shared_stream_with_member_norms() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(23));
    let ins = inputs(
        &dev,
        &mut rng,
        &[
            ("x", &[1, B, T, 6]),
            ("gamma", &[M, 6]),
            ("beta", &[M, 6]),
            ("w", &[M, 6, 6]),
            ("b", &[M, 6]),
        ],
        &[],
    );
    let again: Vec<Input> = ins
        .iter()
        .map(|i| {
            Input::new(
                &i.name,
                i.value.copy(loren_tensor::MemTag::Workspace).unwrap(),
                true,
            )
        })
        .collect();
    assert_gradients(ins, sublayer, &opts());
    assert_gradients(again, joined_sublayer, &opts());
}

/// A gradient held by several values is added into without writing through it: x reaches the
/// output three ways, two of them one shared dy.
#[test]
fn a_shared_gradient_is_summed_not_overwritten() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(24));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("x", &[M, B, T, 4]), ("z", &[M, B, T, 4]), ("b", &[1, 4])],
        &["b"],
    );
    assert_gradients(
        ins,
        |t, v| {
            let y = ops::add(t, &v[0], &v[1])?;
            let y = ops::add(t, &y, &v[0])?;
            let y = ops::add(t, &y, &y)?;
            ops::bias_gelu(t, &y, &v[2])
        },
        &opts(),
    );
}

#[test]
fn recomputed_sublayer() {
    assert_gradients(
        sublayer_inputs(20, &[]),
        |t, v| ops::recompute(t, v, sublayer),
        &opts(),
    );
}

#[test]
fn recomputed_sublayer_with_frozen_norm() {
    assert_gradients(
        sublayer_inputs(21, &["gamma", "beta"]),
        |t, v| ops::recompute(t, v, sublayer),
        &opts(),
    );
}

/// The gradients of every input of `f` over `ins`, from a loss that weighs each output element
/// differently (so no gradient is a plain sum).
fn input_gradients(
    ins: &[Input],
    f: impl Fn(&Tape, &[Var]) -> Result<Var>,
) -> Vec<Option<Vec<f32>>> {
    let tape = Tape::new();
    let vars: Vec<Var> = ins
        .iter()
        .map(|i| {
            let v = std::sync::Arc::new(i.value.copy(loren_tensor::MemTag::Workspace).unwrap());
            if i.trainable {
                tape.input(v)
            } else {
                Var::shared(v)
            }
        })
        .collect();
    let y = f(&tape, &vars).unwrap();
    let mut rng = Rng::new(99);
    let dy = randn(y.shape().dims(), &mut rng, y.value().device());
    let wrt: Vec<_> = vars.iter().map(Var::node).collect();
    let root = y.node().unwrap();
    drop((y, vars));
    tape.gradients(root, std::sync::Arc::new(dy), &wrt)
        .unwrap()
        .into_iter()
        .map(|g| g.map(|g| g.to_vec().unwrap()))
        .collect()
}

#[test]
fn recompute_gives_the_same_gradients_bit_for_bit() {
    for frozen in [&[][..], &["gamma", "beta"][..]] {
        let ins = sublayer_inputs(22, frozen);
        let kept = input_gradients(&ins, sublayer);
        let again = input_gradients(&ins, |t, v| ops::recompute(t, v, sublayer));
        assert_eq!(kept.len(), again.len());
        for (i, (a, b)) in kept.iter().zip(&again).enumerate() {
            assert_eq!(
                a.is_some(),
                b.is_some(),
                "input {i}: a gradient on one side only"
            );
            assert!(a == b, "input {i}: gradients differ");
        }
        assert!(kept[0].is_some(), "x must get a gradient");
    }
}

/// An op whose backward is deliberately wrong by 5%: the check must catch it, or it proves
/// nothing about the real ops.
struct WrongBackward(Option<loren_autograd::NodeId>);

impl Backward for WrongBackward {
    fn name(&self) -> &'static str {
        "planted_wrong"
    }

    fn backward(self: Box<Self>, dy: std::sync::Arc<Tensor>, grads: &mut GradSink) -> Result<()> {
        let mut g = loren_autograd::unshare(dy)?;
        loren_tensor::ops::elementwise::scale_(&mut g, 1.05)?;
        grads.add(self.0, g)
    }
}

fn planted_identity(tape: &Tape, x: &Var) -> Result<Var> {
    let y = x.value().copy(loren_tensor::MemTag::Activations)?;
    Ok(tape.record(y, tape.needs_grad(&[Some(x)]), WrongBackward(x.node())))
}

#[test]
fn a_planted_wrong_gradient_fails_the_check() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(19));
    let ins = inputs(&dev, &mut rng, &[("x", &[M, B, 5])], &[]);
    let reports = check(ins, |t, v| planted_identity(t, &v[0]), &opts()).unwrap();
    assert!(
        reports[0].rel_err > opts().rel_tol,
        "rel err {}",
        reports[0].rel_err
    );
}

#[test]
fn frozen_inputs_get_no_gradient_buffer() {
    let (dev, mut rng) = (Device::cpu(), Rng::new(20));
    let ins = inputs(
        &dev,
        &mut rng,
        &[("x", &[M, B, 4]), ("w", &[1, 3, 4])],
        &["w"],
    );
    let reports = check(
        ins,
        |t, v| ops::linear(t, &v[0], &v[1], None, None),
        &opts(),
    )
    .unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].name, "x");
}
