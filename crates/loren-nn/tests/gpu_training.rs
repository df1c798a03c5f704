//! A whole training step of the tiny ViT on the GPU against the CPU: the loss, every gradient and
//! every parameter after AdamW. Both start from the same weights (the GPU's, whose frozen
//! matrices are bf16) and take the same batch. With no usable GPU the tests say so and pass.
//!
//! Bounds: the GPU runs the whole network in bf16 activations with f32 accumulation, so the
//! gradients at the end of ~60 ops carry several bf16 roundings (2⁻⁹ each); 5e-2 relative is the
//! bound for them and 1e-2 for the loss.
//!
//! Two things are not compared as plain relative errors, because their exact values make that
//! meaningless:
//! - The key bias's gradient is exactly zero (softmax ignores a shift shared by all keys), so both
//!   sides hold rounding alone; its size is bounded against the model's gradient instead.
//! - The first AdamW step moves every element by ±lr by the sign of its gradient alone (m̂/√v̂ =
//!   g/|g|), so an element whose gradient is within rounding of zero may move either way on the
//!   two sides. The parameters are therefore checked against the CPU's AdamW replayed on the
//!   GPU's own gradients (to 1e-5, f32 arithmetic on both sides), and so is the optimizer's
//!   state (the moments, or SGD's momentum buffer), which holds the clipping factor that sign
//!   hides: with the gradient check, that covers the whole step, the optimizer and its clipping
//!   included.
//!
//! The clipping itself differs in one visible way: the CPU scales the gradients in place (as
//! torch's clip_grad_norm_ does), the GPU applies the factor inside the update and leaves them as
//! they were, so the GPU's gradients are compared after scaling them by the same rule.
//!
//! A step whose loss is not finite must change nothing on either device: on the GPU the update is
//! queued before the host reads the loss, and the kernel skips it (checked here on both). Nor may
//! a step whose loss is finite and whose gradients are not (a diverging run), where clipping
//! computes their norm: the GPU's kernels decide it on the device, the optimizer counts it (checked
//! here on both, through the optimizer and the GPU's one-launch table).

use loren_autograd::optim::{Optimizer, OptimizerKind};
use loren_autograd::params::{Grads, Params};
use loren_nn::config::{EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::{SplitOptions, bundled_digits, split_digits};
use loren_nn::error::NnError;
use loren_nn::train::{TrainConfig, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::{Device, MemTag, Tensor};

mod common;
use common::param_bits;

fn gpu() -> Option<Device> {
    match loren_kernels::cuda_available() {
        Ok(()) => Some(Device::cuda(0).expect("a usable GPU opens")),
        Err(e) => {
            loren_kernels::skip_without_gpu(format!("no CUDA device ({e})"));
            None
        }
    }
}

/// Every gradient, on the host, in the parameters' order.
fn on_host(grads: &Grads) -> Vec<Vec<f32>> {
    grads.iter().map(|(_, g)| g.to_vec().unwrap()).collect()
}

fn sum_sq<'a>(v: impl Iterator<Item = &'a f32>) -> f64 {
    v.map(|x| (*x as f64).powi(2)).sum()
}

/// `e` under `bound`; NaN is not.
fn within(e: f64, bound: f64) -> bool {
    e < bound
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

/// One step of `method` with `optimizer` on both devices. AdamW's weight decay is 0.5, so that
/// its placement moves each parameter by 5e-4 of itself, 50 times the bound; the optimizer's
/// state is compared too, which the first AdamW step's sign-only update would not show.
fn step_matches(method: Method, members: usize, optimizer: OptimizerKind) {
    let Some(gdev) = gpu() else { return };
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method,
        members,
        classes: 10,
        lora: LoraConfig {
            rank: 4,
            init_gain: 1.0,
            ..LoraConfig::default()
        },
    };
    let vit = VitConfig::tiny();
    let mut on_gpu = Vit::new(&vit, &ens, &gdev, 5).unwrap();
    let mut on_cpu = Vit::new(&vit, &ens, &Device::cpu(), 5).unwrap();
    // LoRA's B starts at zero, which would leave dA and the forward's low-rank term zero on both
    // sides: random values make the step exercise them.
    let mut rng = loren_tensor::Rng::new(9);
    let lora_b: Vec<_> = on_gpu
        .params()
        .iter()
        .filter(|(_, p)| p.name().ends_with(".lora_b"))
        .map(|(id, p)| (id, p.value().numel()))
        .collect();
    for (id, n) in lora_b {
        let v: Vec<f32> = (0..n).map(|_| 0.05 * rng.normal()).collect();
        on_gpu.params_mut().set(id, &v).unwrap();
    }
    // The CPU starts from exactly the GPU's weights (bf16-rounded frozen matrices included).
    let ids: Vec<_> = on_gpu.params().iter().map(|(id, _)| id).collect();
    for id in ids {
        let v = on_gpu.params().get(id).to_vec().unwrap();
        on_cpu.params_mut().set(id, &v).unwrap();
    }
    let data = split_digits(&bundled_digits().unwrap(), &SplitOptions::default())
        .unwrap()
        .train;
    let batch = data.batch(&(0..32).collect::<Vec<_>>(), None);
    let cfg = TrainConfig {
        optimizer,
        ..TrainConfig::plain(32, 1e-3, loren_nn::config::Activations::Keep)
    };
    let start: Vec<Vec<f32>> = on_gpu
        .params()
        .iter()
        .map(|(_, p)| p.value().to_vec().unwrap())
        .collect();
    let mut tg = Trainer::new(&mut on_gpu, &cfg, 32).unwrap();
    let mut tc = Trainer::new(&mut on_cpu, &cfg, 32).unwrap();
    let (lg, lc) = (tg.step(&batch).unwrap(), tc.step(&batch).unwrap());
    let le = ((lg - lc) / lc).abs() as f64;
    println!("{method} M={members}: loss gpu {lg:.6} cpu {lc:.6}, relative error {le:.3e}");
    // Every gradient and parameter is printed before any is judged: one run shows them all.
    let mut failures = Vec::new();
    if !within(le, 1e-2) {
        failures.push(format!("loss differs: {lg} vs {lc}"));
    }

    // The GPU's gradients as they were, and scaled as the CPU's clipping scaled its own.
    let (gpu_grads, cpu_grads) = (on_host(tg.grads()), on_host(tc.grads()));
    let norm = sum_sq(gpu_grads.iter().flatten()).sqrt();
    let coef = (cfg.grad_clip.unwrap() / (norm + 1e-6)).min(1.0);
    let cpu_norm = sum_sq(cpu_grads.iter().flatten()).sqrt();
    let cpu_rms = cpu_norm / (cpu_grads.iter().map(Vec::len).sum::<usize>() as f64).sqrt();
    println!(
        "  gradient norm gpu {norm:.4e} (clip factor {coef:.4e}), cpu after clipping {cpu_norm:.4e}"
    );
    for (((id, _), g), c) in tg.grads().iter().zip(&gpu_grads).zip(&cpu_grads) {
        let name = tg.model().params().param(id).name().to_string();
        let scaled: Vec<f32> = g.iter().map(|x| (*x as f64 * coef) as f32).collect();
        if name.ends_with("attn.k.bias") {
            let rms = (sum_sq(scaled.iter()) / scaled.len() as f64).sqrt();
            let e = rms / cpu_rms;
            println!("  grad {name:<32} rms {e:.3e} of the model's (exact 0, bound 1e-2)");
            if !within(e, 1e-2) {
                failures.push(format!(
                    "gradient of {name}, exactly 0, has rms {e:e} of the model's"
                ));
            }
            continue;
        }
        let e = rel(&scaled, c);
        println!("  grad {name:<32} relative error {e:.3e}");
        if !within(e, 5e-2) {
            failures.push(format!("gradient of {name} differs by {e:e}"));
        }
    }

    // The CPU's AdamW on the GPU's gradients, from the same start.
    let cpu = Device::cpu();
    let mut replay = Vit::new(&vit, &ens, &cpu, 5).unwrap();
    for ((id, _), v) in tg.model().params().iter().zip(&start) {
        replay.params_mut().set(id, v).unwrap();
    }
    let mut grads = Grads::new(replay.params()).unwrap();
    for ((id, g), v) in tg.grads().iter().zip(&gpu_grads) {
        let t = Tensor::from_vec(v.clone(), g.dims().to_vec(), MemTag::Workspace, &cpu).unwrap();
        grads.accumulate(id, &t).unwrap();
    }
    let mut opt = Optimizer::new(cfg.optimizer, replay.params()).unwrap();
    opt.step(replay.params_mut(), &mut grads, cfg.lr, cfg.grad_clip, None)
        .unwrap();
    for ((id, p), p0) in tg.model().params().iter().zip(&start) {
        let after = p.value().to_vec().unwrap();
        let e = rel(&after, &replay.params().get(id).to_vec().unwrap());
        // A step that left a trainable parameter where it was would compare equal trivially.
        let moved = after.iter().zip(p0).any(|(a, b)| a != b);
        println!(
            "  param {:<31} relative error {e:.3e} (AdamW replayed on the CPU){}",
            p.name(),
            match (p.trainable(), moved) {
                (false, _) => ", frozen",
                (true, false) => ", NOT MOVED",
                (true, true) => "",
            }
        );
        if p.trainable() && !moved {
            failures.push(format!("parameter {} did not move in the step", p.name()));
        }
        if !within(e, 1e-5) {
            failures.push(format!(
                "parameter {} after the step differs by {e:e}",
                p.name()
            ));
        }
    }
    // The state (the clipped gradients' moments, or SGD's momentum buffer) holds what the
    // parameters' first step hides.
    let names = tg.model().params();
    for ((id, theirs), (_, ours)) in tg.optimizer().state().iter().zip(opt.state()) {
        let pairs = [
            ("m", Some(&theirs.m), Some(&ours.m)),
            ("v", theirs.v.as_ref(), ours.v.as_ref()),
        ];
        for (which, g, c) in pairs {
            let (Some(g), Some(c)) = (g, c) else { continue };
            let e = rel(&g.to_vec().unwrap(), &c.to_vec().unwrap());
            let name = names.param(*id).name();
            println!("  state {which} of {name:<27} relative error {e:.3e} (replayed on the CPU)");
            if !within(e, 1e-5) {
                failures.push(format!(
                    "optimizer state {which} of {name} differs by {e:e}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{method}:\n{}", failures.join("\n"));
}

fn adamw() -> OptimizerKind {
    OptimizerKind::adamw(0.5)
}

#[test]
fn lora_ensemble_step_matches_the_cpu() {
    step_matches(Method::Lora, 3, adamw());
}

/// SGD with momentum through the trainer: the fused SGD update, its clipping factor and its
/// momentum buffer (in the state compared).
#[test]
fn lora_ensemble_sgd_step_matches_the_cpu() {
    let sgd = OptimizerKind::Sgd {
        momentum: 0.9,
        weight_decay: 0.01,
    };
    step_matches(Method::Lora, 2, sgd);
}

#[test]
fn explicit_ensemble_step_matches_the_cpu() {
    step_matches(Method::Explicit, 3, adamw());
}

/// Two members: the emulated GPU in CI pays for every member's stream, and the kernels' DropKey
/// parity at three members is in loren-tensor's suite.
#[test]
fn mc_dropout_step_matches_the_cpu() {
    step_matches(Method::McDropout, 2, adamw());
}

#[test]
fn single_network_step_matches_the_cpu() {
    step_matches(Method::Single, 1, adamw());
}

/// A batch with one NaN pixel: its step is [`NnError::NonFinite`] and leaves every parameter as
/// it was, and the optimizer as if it had not been taken: a good step after it leaves the same
/// parameters, bit for bit, as the first step of a trainer that never saw the bad batch (AdamW's
/// bias correction tells a first step from a second). A batch of 4 keeps the emulated GPU quick.
fn non_finite_step_changes_nothing(device: &Device) {
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method: Method::Lora,
        members: 2,
        classes: 10,
        lora: LoraConfig {
            rank: 4,
            ..LoraConfig::default()
        },
    };
    let vit = VitConfig::tiny();
    let (mut a, mut b) = (
        Vit::new(&vit, &ens, device, 5).unwrap(),
        Vit::new(&vit, &ens, device, 5).unwrap(),
    );
    let data = split_digits(&bundled_digits().unwrap(), &SplitOptions::default())
        .unwrap()
        .train;
    let good = data.batch(&(0..4).collect::<Vec<_>>(), None);
    let mut bad = good.clone();
    bad.images[100] = f32::NAN;
    let mut cfg = TrainConfig::plain(4, 1e-2, loren_nn::config::Activations::Keep);
    cfg.grad_clip = Some(1.0);
    let bits = |t: &Trainer| param_bits(t.model());
    let mut ta = Trainer::new(&mut a, &cfg, 4).unwrap();
    let mut tb = Trainer::new(&mut b, &cfg, 4).unwrap();
    let before = bits(&tb);
    match tb.step(&bad) {
        Err(NnError::NonFinite { step: 0, loss, .. }) => assert!(loss.is_nan(), "{loss}"),
        other => panic!("{device}: expected a non-finite loss at step 0, got {other:?}"),
    }
    assert!(
        bits(&tb) == before,
        "{device}: the bad step changed parameters"
    );
    let (la, lb) = (ta.step(&good).unwrap(), tb.step(&good).unwrap());
    assert_eq!(la.to_bits(), lb.to_bits(), "{device}: the good step's loss");
    assert!(
        bits(&ta) == bits(&tb),
        "{device}: the parameters differ after the good step"
    );
}

#[test]
fn a_non_finite_step_changes_nothing_on_the_cpu() {
    non_finite_step_changes_nothing(&Device::cpu());
}

#[test]
fn a_non_finite_step_changes_nothing_on_a_gpu() {
    let Some(gdev) = gpu() else { return };
    non_finite_step_changes_nothing(&gdev);
}

/// Every bit the optimizer owns or writes: the parameters, their bf16 copies (on a GPU) and the
/// state (moments, momentum buffer).
fn optimizer_bits(params: &mut Params, opt: &Optimizer) -> Vec<Vec<u32>> {
    let bits =
        |t: &Tensor| -> Vec<u32> { t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect() };
    let mut out = Vec::new();
    for t in params.trainable_mut().unwrap() {
        out.push(bits(t.value));
        out.extend(t.shadow.map(|s| bits(s)));
    }
    for (_, st) in opt.state() {
        out.push(bits(&st.m));
        out.extend(st.v.as_ref().map(bits));
    }
    out
}

/// The optimizer alone, clipping at norm 1: a step whose gradients hold an infinity or a NaN while
/// its loss is finite changes no bit of the parameters, their bf16 copies or the state, and is
/// counted once ([`Optimizer::skipped_steps`]); the same gradients under a NaN loss are the loss's
/// to stop, and not counted. The skipped step still counts in [`Optimizer::steps`], on both
/// devices: the next good step makes, bit for bit, what a twin makes that never saw the bad one
/// and was restored to the same step count. AdamW and SGD, over a GEMM weight (a bf16 copy on a
/// GPU) of two blocks and a bit, the bad element in the second, and a bias.
fn non_finite_gradients_change_nothing(device: &Device) {
    let sizes = [4097usize, 3];
    let mut rng = loren_tensor::Rng::new(11);
    let sgd = OptimizerKind::Sgd {
        momentum: 0.9,
        weight_decay: 0.01,
    };
    for kind in [adamw(), sgd] {
        for bad in [f32::INFINITY, f32::NAN] {
            let what = format!("{device}, {kind:?}, a gradient of {bad}");
            let mut draw = |scale: f32| -> Vec<Vec<f32>> {
                sizes
                    .iter()
                    .map(|&n| (0..n).map(|_| scale * rng.normal()).collect())
                    .collect()
            };
            let start = draw(1.0);
            let build = || {
                let mut p = Params::new(device);
                let tensor = |v: &Vec<f32>, dims: &[usize]| {
                    Tensor::from_vec(v.clone(), dims, MemTag::Trainable, device).unwrap()
                };
                p.add_gemm_weight("w", tensor(&start[0], &[17, 241]), true, true)
                    .unwrap();
                p.add("b", tensor(&start[1], &[3]), true, false).unwrap();
                p
            };
            let (mut pa, mut pb) = (build(), build());
            let (mut ga, mut gb) = (Grads::new(&pa).unwrap(), Grads::new(&pb).unwrap());
            let mut oa = Optimizer::new(kind, &pa).unwrap();
            let mut ob = Optimizer::new(kind, &pb).unwrap();
            let one = |v: f32| Tensor::from_vec(vec![v], [1], MemTag::Workspace, device).unwrap();
            let (loss, nan_loss) = (one(0.7), one(f32::NAN));
            let set = |grads: &mut Grads, values: &[Vec<f32>]| {
                for ((_, g), v) in grads.iter_mut().zip(values) {
                    g.copy_from_host(v).unwrap();
                }
            };
            // A good step on both first, so that the state the bad one must keep is not zero.
            // Gradients of norm about 200: clipping scales every step.
            let good = draw(3.0);
            for (p, g, o) in [(&mut pa, &mut ga, &mut oa), (&mut pb, &mut gb, &mut ob)] {
                set(g, &good);
                o.step(p, g, 1e-2, Some(1.0), Some(&loss)).unwrap();
            }
            let before = optimizer_bits(&mut pa, &oa);

            let mut worse = draw(3.0);
            worse[0][4096] = bad;
            set(&mut ga, &worse);
            oa.step(&mut pa, &mut ga, 1e-2, Some(1.0), Some(&nan_loss))
                .unwrap();
            oa.uncount_skipped_step();
            assert_eq!(oa.skipped_steps().unwrap(), 0, "{what}: a NaN loss's step");
            oa.step(&mut pa, &mut ga, 1e-2, Some(1.0), Some(&loss))
                .unwrap();
            assert!(
                optimizer_bits(&mut pa, &oa) == before,
                "{what}: a parameter, bf16 copy or state changed"
            );
            assert_eq!(oa.skipped_steps().unwrap(), 1, "{what}: steps skipped");
            assert_eq!(oa.steps(), 2, "{what}: steps counted");

            let next = draw(3.0);
            ob.restore(2, |_, _, _| Ok(())).unwrap();
            for (p, g, o) in [(&mut pa, &mut ga, &mut oa), (&mut pb, &mut gb, &mut ob)] {
                set(g, &next);
                o.step(p, g, 1e-2, Some(1.0), Some(&loss)).unwrap();
            }
            let after = optimizer_bits(&mut pa, &oa);
            assert!(
                after != before,
                "{what}: the good step after it moved nothing"
            );
            assert!(
                after == optimizer_bits(&mut pb, &ob),
                "{what}: the good step after it differs from the twin's"
            );
            assert_eq!(oa.skipped_steps().unwrap(), 1, "{what}: steps skipped");
            assert_eq!(
                ob.skipped_steps().unwrap(),
                0,
                "{what}: the twin's steps skipped"
            );
        }
    }
}

#[test]
fn non_finite_gradients_change_nothing_on_the_cpu() {
    non_finite_gradients_change_nothing(&Device::cpu());
}

#[test]
fn non_finite_gradients_change_nothing_on_a_gpu() {
    let Some(gdev) = gpu() else { return };
    non_finite_gradients_change_nothing(&gdev);
}

/// A healthy epoch of two steps reports no skipped step: on a GPU through the device count, which
/// the trainer reads once, at the epoch's end.
fn an_epoch_reports_its_skipped_steps(device: &Device) {
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method: Method::Lora,
        members: 2,
        classes: 10,
        lora: LoraConfig {
            rank: 4,
            ..LoraConfig::default()
        },
    };
    let mut model = Vit::new(&VitConfig::tiny(), &ens, device, 5).unwrap();
    let data = split_digits(&bundled_digits().unwrap(), &SplitOptions::default())
        .unwrap()
        .train
        .subset(&(0..8).collect::<Vec<_>>());
    let cfg = TrainConfig::plain(4, 1e-3, loren_nn::config::Activations::Keep);
    let mut t = Trainer::new(&mut model, &cfg, data.len()).unwrap();
    let info = t.run_epoch(&data, &mut loren_nn::train::Quiet).unwrap();
    assert_eq!(
        info.skipped_steps, 0,
        "{device}: a healthy epoch's skipped steps"
    );
    assert_eq!(t.optimizer().skipped_steps().unwrap(), 0, "{device}");
}

#[test]
fn an_epoch_reports_its_skipped_steps_on_the_cpu() {
    an_epoch_reports_its_skipped_steps(&Device::cpu());
}

#[test]
fn an_epoch_reports_its_skipped_steps_on_a_gpu() {
    let Some(gdev) = gpu() else { return };
    an_epoch_reports_its_skipped_steps(&gdev);
}
