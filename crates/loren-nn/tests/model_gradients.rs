//! The whole ViT's backward, for every method, against finite differences: every trainable
//! tensor is checked, and frozen ones must get no gradient at all.

use loren_autograd::gradcheck::{CheckOptions, check_params};
use loren_autograd::{Params, Tape, ops};
use loren_nn::config::{Activations, EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::vit::{Draw, Vit};
use loren_tensor::{Device, MemTag, Rng, Tensor};

fn micro() -> VitConfig {
    VitConfig {
        name: "micro".into(),
        image_size: 4,
        channels: 2,
        patch: 2,
        dim: 8,
        depth: 2,
        heads: 2,
        mlp_dim: 12,
        ln_eps: 1e-6,
    }
}

/// A model of `method` whose every weight is moved off its start (B is zero there, which would
/// make A's gradient vanish and the check prove nothing).
fn model(method: Method, members: usize, rank: usize, seed: u64) -> Vit {
    let ens = EnsembleConfig {
        // Above the paper's 0.2 so that rows with every key dropped (5 tokens here) occur too.
        drop_key: 0.5,
        method,
        members,
        classes: 3,
        lora: LoraConfig {
            rank,
            init_gain: 1.0,
            ..LoraConfig::default()
        },
    };
    let mut vit = Vit::new(&micro(), &ens, &Device::cpu(), seed).unwrap();
    let mut rng = Rng::new(seed + 100);
    let params = vit.params_mut();
    let ids: Vec<_> = params.iter().map(|(id, _)| id).collect();
    for id in ids {
        let v: Vec<f32> = params
            .get(id)
            .to_vec()
            .unwrap()
            .iter()
            .map(|x| x + 0.3 * rng.normal())
            .collect();
        params.set(id, &v).unwrap();
    }
    vit
}

fn check_method(method: Method, members: usize, rank: usize) {
    check_with(method, members, rank, Activations::Keep);
}

fn check_with(method: Method, members: usize, rank: usize, activations: Activations) {
    let mut vit = model(method, members, rank, 7);
    let dev = vit.device().clone();
    let mut rng = Rng::new(1);
    let images = Tensor::randn([3, 2, 4, 4], 1.0, &mut rng, MemTag::Workspace, &dev).unwrap();
    let labels = [2u32, 0, 1];
    let opts = CheckOptions {
        samples: 12,
        ..CheckOptions::default()
    };
    let reports = check_params(
        &mut vit,
        |v: &mut Vit| -> &mut Params { v.params_mut() },
        |tape: &Tape, v: &Vit| {
            let logits = v
                .forward(tape, &images, activations, Draw::step(0, 1))
                .map_err(|e| loren_tensor::Error::invalid("model", e.to_string()))?;
            ops::softmax_cross_entropy(tape, &logits, &labels)
        },
        &opts,
    )
    .unwrap();
    let trainable = vit.params().trainable_ids().len();
    assert_eq!(
        reports.len(),
        trainable,
        "every trainable tensor is checked"
    );
    for r in &reports {
        if r.name.ends_with("attn.k.bias") {
            // The key bias adds q·b to every score of a row, which softmax cancels: its true
            // gradient is exactly zero, so both sides must be at the noise floor.
            let (_, analytic, numeric) = r.worst.unwrap();
            assert!(
                analytic.abs() < 1e-6 && numeric.abs() < 1e-4,
                "{method}: {} = {analytic}, {numeric}",
                r.name
            );
            continue;
        }
        assert!(
            r.grad_norm > 1e-7,
            "{method}: {} has a vanishing gradient",
            r.name
        );
        assert!(
            r.rel_err < opts.rel_tol,
            "{method}: {} relative error {:.3e}, worst {:?}",
            r.name,
            r.rel_err,
            r.worst
        );
    }
}

#[test]
fn lora_ensemble_gradients() {
    check_method(Method::Lora, 3, 2);
}

#[test]
fn lora_ensemble_rank_1_gradients() {
    check_method(Method::Lora, 3, 1);
}

#[test]
fn explicit_ensemble_gradients() {
    check_method(Method::Explicit, 3, 0);
}

#[test]
fn single_network_gradients() {
    check_method(Method::Single, 1, 0);
}

#[test]
fn single_lora_gradients() {
    check_method(Method::SingleLora, 1, 4);
}

/// The masks are a fixed function of the draw, so the loss is as smooth as without them.
#[test]
fn mc_dropout_gradients() {
    check_method(Method::McDropout, 3, 0);
}

#[test]
fn recomputed_mc_dropout_gradients() {
    check_with(Method::McDropout, 2, 0, Activations::Recompute);
}

#[test]
fn recomputed_lora_ensemble_gradients() {
    check_with(Method::Lora, 3, 2, Activations::Recompute);
}

#[test]
fn recomputed_explicit_ensemble_gradients() {
    check_with(Method::Explicit, 2, 0, Activations::Recompute);
}
