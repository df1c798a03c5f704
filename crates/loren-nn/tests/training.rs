//! Training end to end on the bundled digits: resuming from a checkpoint continues bit-exactly,
//! and a loss that turns NaN stops training with the step, keeping the last good checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use loren_autograd::optim::OptimizerKind;
use loren_autograd::schedule::WarmupCosine;
use loren_nn::checkpoint::TensorFile;
use loren_nn::config::{EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::{Augment, Dataset, SplitOptions, bundled_digits, split_digits};
use loren_nn::error::NnError;
use loren_nn::train::{CheckpointSpec, EpochVal, Observer, Quiet, StepInfo, TrainConfig, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::{Device, MemTag, Tensor};

mod common;
use common::param_bits;

fn train_split() -> Dataset {
    let all = bundled_digits().unwrap();
    split_digits(&all, &SplitOptions::default()).unwrap().train
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 64,
        lr: 1e-3,
        min_lr: 1e-5,
        warmup_steps: 5,
        warmup_from_zero: false,
        optimizer: OptimizerKind::adamw(0.01),
        grad_clip: Some(1.0),
        augment: Augment::digits(),
        shuffle: true,
        seed: 3,
        activations: loren_nn::config::Activations::Keep,
    }
}

fn model(method: Method) -> Vit {
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method,
        members: 2,
        classes: 10,
        lora: LoraConfig {
            rank: 4,
            ..LoraConfig::default()
        },
    };
    Vit::new(&VitConfig::tiny(), &ens, &Device::cpu(), 11).unwrap()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loren-training-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("checkpoint.safetensors")
}

fn trained_tensors(path: &Path) -> Vec<(String, Vec<u32>)> {
    let f = TensorFile::read(path).unwrap();
    f.names()
        .map(|n| {
            (
                n.to_string(),
                f.get(n).unwrap().data.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

/// Train `model` for `epochs` on `data`, checkpointing to `path`.
fn fit_into(model: &mut Vit, epochs: usize, data: &Dataset, path: &Path) {
    Trainer::new(model, &config(epochs), data.len())
        .unwrap()
        .fit(
            data,
            &CheckpointSpec {
                path: Some(path.to_path_buf()),
                ..Default::default()
            },
            &mut Quiet,
        )
        .unwrap();
}

fn resume_is_bit_exact(method: Method) {
    let data = train_split();
    // Straight through two epochs.
    let straight = temp(&format!("straight-{method}"));
    fit_into(&mut model(method), 2, &data, &straight);

    // One epoch, a checkpoint, and a fresh process-alike picking up from it.
    let halfway = temp(&format!("halfway-{method}"));
    let mut b = model(method);
    let mut tb = Trainer::new(&mut b, &config(2), data.len()).unwrap();
    tb.run_epoch(&data, &mut Quiet).unwrap();
    tb.save(&halfway, &Default::default()).unwrap();

    let resumed = temp(&format!("resumed-{method}"));
    let mut c = model(method);
    let mut tc = Trainer::new(&mut c, &config(2), data.len()).unwrap();
    tc.resume(&TensorFile::read(&halfway).unwrap()).unwrap();
    assert_eq!(tc.epoch(), 1);
    tc.fit(
        &data,
        &CheckpointSpec {
            path: Some(resumed.clone()),
            ..Default::default()
        },
        &mut Quiet,
    )
    .unwrap();

    let (x, y) = (trained_tensors(&straight), trained_tensors(&resumed));
    assert_eq!(x.len(), y.len());
    assert!(
        x.iter().any(|(n, _)| n.starts_with("optim.v.")),
        "the optimizer state is checkpointed"
    );
    for ((na, va), (nb, vb)) in x.iter().zip(&y) {
        assert_eq!(na, nb);
        assert!(va == vb, "{method}: tensor {na} differs after resuming");
    }
}

#[test]
fn lora_ensemble_resumes_bit_exactly() {
    resume_is_bit_exact(Method::Lora);
}

#[test]
fn explicit_ensemble_resumes_bit_exactly() {
    resume_is_bit_exact(Method::Explicit);
}

/// Without shuffling the training seed orders nothing (with no augmentation it touches nothing
/// else), so two seeds train to the same bits; with it they do not.
#[test]
fn an_unshuffled_epoch_takes_the_images_in_order_whatever_the_seed() {
    let data = train_split();
    let trained = |shuffle: bool, seed: u64| {
        let mut cfg = TrainConfig {
            augment: Augment::none(),
            shuffle,
            seed,
            ..config(1)
        };
        cfg.batch_size = 128;
        let mut m = model(Method::Lora);
        let mut t = Trainer::new(&mut m, &cfg, data.len()).unwrap();
        t.run_epoch(&data, &mut Quiet).unwrap();
        param_bits(t.model())
    };
    assert!(trained(false, 1) == trained(false, 2));
    assert!(trained(true, 1) != trained(true, 2));
}

#[test]
fn more_steps_than_a_u64_counts_are_refused() {
    let mut m = model(Method::Lora);
    // 17 steps of 64 for 1080 images: 17·(2^64/17 + 1) wraps to a few steps if unchecked.
    let epochs = (u64::MAX / 17 + 1) as usize;
    let e = Trainer::new(&mut m, &config(epochs), 1080)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("more steps than loren counts"), "{e}");
    assert!(Trainer::new(&mut m, &config(epochs - 1), 1080).is_ok());
}

#[test]
fn resuming_a_different_model_is_refused() {
    let data = train_split();
    let path = temp("mismatch");
    let mut a = model(Method::Lora);
    let ta = Trainer::new(&mut a, &config(1), data.len()).unwrap();
    ta.save(&path, &Default::default()).unwrap();
    let mut b = model(Method::Explicit);
    let mut tb = Trainer::new(&mut b, &config(1), data.len()).unwrap();
    let e = tb
        .resume(&TensorFile::read(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("checkpoint.safetensors") && e.contains("ensemble"),
        "{e}"
    );
}

#[test]
fn an_earlier_runs_report_goes_with_its_checkpoint() {
    let data = train_split();
    let path = temp("replaced");
    std::fs::write(&path, b"an earlier run's checkpoint").unwrap();
    let report = path.with_extension("json");
    std::fs::write(&report, b"{}").unwrap();
    let mut a = model(Method::Lora);
    Trainer::new(&mut a, &config(1), data.len())
        .unwrap()
        .fit(
            &data,
            &CheckpointSpec {
                path: Some(path.clone()),
                replaces: vec![report.clone()],
                ..Default::default()
            },
            &mut Quiet,
        )
        .unwrap();
    assert!(
        !report.exists(),
        "the earlier run's report outlived its checkpoint"
    );
    assert!(TensorFile::read(&path).is_ok());
}

#[test]
fn a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let data = train_split();
    let path = temp("nan");
    let mut a = model(Method::Lora);
    fit_into(&mut a, 1, &data, &path);
    let good = std::fs::read(&path).unwrap();

    // Resume for more epochs with a frozen weight (which the checkpoint does not hold) blown up
    // to overflow: the first resumed step's loss is not finite.
    let mut b = model(Method::Lora);
    let (id, n) = b
        .params()
        .iter()
        .find(|(_, p)| !p.trainable() && p.name().ends_with("fc1.weight"))
        .map(|(id, p)| (id, p.value().numel()))
        .expect("a frozen fc1 weight");
    b.params_mut().set(id, &vec![3e38; n]).unwrap();
    let mut tb = Trainer::new(&mut b, &config(3), data.len()).unwrap();
    tb.resume(&TensorFile::read(&path).unwrap()).unwrap();
    let err = tb
        .fit(
            &data,
            &CheckpointSpec {
                path: Some(path.clone()),
                ..Default::default()
            },
            &mut Quiet,
        )
        .unwrap_err();
    let NnError::NonFinite { step, ref kept, .. } = err else {
        panic!("expected a non-finite loss, got {err}");
    };
    let steps_per_epoch = data.len().div_ceil(64) as u64;
    assert_eq!(
        step, steps_per_epoch,
        "stopped at step {step}, not the resumed epoch's first"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("step {}, in epoch 2", step + 1)) && kept.contains("resumed from"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        good,
        "the last good checkpoint is untouched"
    );
}

/// The training loop stages each batch's images on the thread that makes the batches
/// (`Batch::stage`, then `step_staged`): the same steps, bit for bit, as `step` on the
/// batch; staged images of another shape are an error, not a step.
#[test]
fn images_staged_on_another_thread_give_the_same_step() {
    let data = train_split();
    let cfg = config(1);
    let idx: Vec<usize> = (0..32).collect();
    let batch = data.batch(&idx, None);
    let (mut a, mut b) = (model(Method::Lora), model(Method::Lora));
    let mut ta = Trainer::new(&mut a, &cfg, data.len()).unwrap();
    let mut tb = Trainer::new(&mut b, &cfg, data.len()).unwrap();
    let device = tb.model().device().clone();
    for _ in 0..3 {
        let la = ta.step(&batch).unwrap();
        let staged =
            std::thread::scope(|s| s.spawn(|| batch.stage(&device).unwrap()).join().unwrap());
        let lb = tb.step_staged(&batch, staged).unwrap();
        assert_eq!(la.to_bits(), lb.to_bits());
    }
    let bits = |t: &Trainer| param_bits(t.model());
    assert!(
        bits(&ta) == bits(&tb),
        "the parameters differ after three steps"
    );

    let half: Vec<usize> = (0..16).collect();
    let other = data.batch(&half, None).stage(&device).unwrap();
    let e = tb.step_staged(&batch, other).unwrap_err().to_string();
    assert!(e.contains("staged images are [16"), "{e}");
    let elsewhere = batch.stage(&Device::cpu()).unwrap();
    let e = tb.step_staged(&batch, elsewhere).unwrap_err().to_string();
    assert!(e.contains("another device"), "{e}");
}

/// The LoRA-Ensemble paper's warmup (`--warmup-from-zero`): its first step is at learning rate
/// 0, so it moves no weight (AdamW's decoupled decay included) but feeds AdamW's moments and
/// counts for its bias correction. Two such steps on one batch therefore move the weights as
/// the default's one step at the same rate does, up to rounding: the bias-corrected moments are
/// g and g² either way (with the count left at 1, the move would be 1.9/√1.999 times as large).
#[test]
fn a_warmup_from_zero_moves_nothing_on_its_first_step_but_feeds_the_moments() {
    let data = train_split();
    let cfg = TrainConfig {
        augment: Augment::none(),
        warmup_from_zero: true,
        ..config(1)
    };
    let idx: Vec<usize> = (0..32).collect();
    let batch = data.batch(&idx, None);
    let mut paper = model(Method::Lora);
    let start = param_bits(&paper);
    let mut t = Trainer::new(&mut paper, &cfg, data.len()).unwrap();
    t.step(&batch).unwrap();
    assert!(
        param_bits(t.model()) == start,
        "the step at rate 0 moved a weight"
    );
    let fed = t
        .optimizer()
        .state()
        .iter()
        .any(|(_, st)| st.m.to_vec().unwrap().iter().any(|&x| x != 0.0));
    assert!(fed, "the step at rate 0 left AdamW's moments at zero");
    t.step(&batch).unwrap();
    let after_two = param_bits(t.model());

    let ours = TrainConfig {
        warmup_from_zero: false,
        ..cfg.clone()
    };
    let mut default = model(Method::Lora);
    let mut t = Trainer::new(&mut default, &ours, data.len()).unwrap();
    t.step(&batch).unwrap();
    let after_one = param_bits(t.model());
    let (mut largest, mut moved) = (0f32, false);
    for ((a, b), s) in after_two.iter().zip(&after_one).zip(&start) {
        for ((&a, &b), &s) in a.iter().zip(b).zip(s) {
            let (a, b, s) = (f32::from_bits(a), f32::from_bits(b), f32::from_bits(s));
            largest = std::cmp::max_by(largest, (a - b).abs(), f32::total_cmp);
            moved |= a != s;
        }
    }
    assert!(moved, "the second step moved nothing");
    // Each element moves by about the rate, 1e-3/5 here.
    assert!(
        largest < 1e-6,
        "two steps from zero differ from one by {largest}"
    );
}

/// `validate_every(2, ..)` over three epochs scores the second and the last; a scoring that was
/// stopped (`None`) leaves its epoch unscored and training goes on.
#[test]
fn validation_runs_every_nth_epoch_and_after_the_last() {
    let data = train_split();
    let mut cfg = TrainConfig {
        augment: Augment::none(),
        ..config(3)
    };
    cfg.batch_size = 256;
    let calls = AtomicUsize::new(0);
    let mut m = model(Method::Lora);
    let mut t = Trainer::new(&mut m, &cfg, data.len()).unwrap();
    let counted = &calls;
    t.validate_every(
        2,
        Box::new(move |_model: &Vit| {
            let call = counted.fetch_add(1, Ordering::Relaxed) + 1;
            Ok((call == 1).then_some(EpochVal {
                accuracy: 0.5,
                nll: 1.0,
                ece: 0.25,
                seconds: 0.0,
            }))
        }),
    );
    let summary = t
        .fit(&data, &CheckpointSpec::default(), &mut Quiet)
        .unwrap();
    let scored: Vec<Option<f64>> = summary
        .epochs
        .iter()
        .map(|e| e.val.map(|v| v.accuracy))
        .collect();
    assert_eq!(scored, [None, Some(0.5), None]);
    assert_eq!(
        calls.load(Ordering::Relaxed),
        2,
        "the last epoch was not scored"
    );
    assert_eq!(summary.steps, 3 * 3);
}

/// Every step's report, as the progress bar sees it.
#[derive(Default)]
struct Steps(Vec<StepInfo>);

impl Observer for Steps {
    fn step(&mut self, info: &StepInfo) {
        self.0.push(*info);
    }
}

/// The epoch's mean loss (report.json's learning curve) is over images: the last, partial
/// batch weighs by the images it holds, not as a whole batch.
#[test]
fn an_epochs_mean_loss_weighs_each_step_by_its_images() {
    let data = train_split();
    let mut m = model(Method::Lora);
    let mut t = Trainer::new(&mut m, &config(1), data.len()).unwrap();
    let mut seen = Steps::default();
    let info = t.run_epoch(&data, &mut seen).unwrap();
    let last = seen.0.last().unwrap().images;
    assert!(last < 64, "the test needs a partial last batch, got {last}");
    let images: usize = seen.0.iter().map(|s| s.images).sum();
    assert_eq!(images, data.len());
    let sum: f64 = seen.0.iter().map(|s| s.loss as f64 * s.images as f64).sum();
    let want = sum / images as f64;
    assert!(
        (info.mean_loss - want).abs() < 1e-12,
        "{} against {want}",
        info.mean_loss
    );
}

/// One warm-up and cosine over the whole run, not over an epoch, with a warm-up longer than
/// the run cut to it.
#[test]
fn the_learning_rate_follows_one_warmup_cosine_over_the_whole_run() {
    let data = train_split();
    for (epochs, warmup) in [(3, 5), (2, 10_000)] {
        let cfg = TrainConfig {
            warmup_steps: warmup,
            ..config(epochs)
        };
        let mut m = model(Method::Lora);
        let mut t = Trainer::new(&mut m, &cfg, data.len()).unwrap();
        let total = t.total_steps();
        assert_eq!(total, data.len().div_ceil(64) as u64 * epochs as u64);
        let mut seen = Steps::default();
        t.fit(&data, &CheckpointSpec::default(), &mut seen).unwrap();
        let want = WarmupCosine {
            base_lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup: warmup.min(total),
            total,
            from_zero: false,
        };
        assert_eq!(seen.0.len() as u64, total);
        for &StepInfo { step, lr, .. } in &seen.0 {
            assert_eq!(lr, want.lr(step), "step {step} of {total}");
        }
        let last = seen.0.last().unwrap().lr;
        if warmup < total {
            assert!(
                last < 0.05 * cfg.lr && last >= cfg.min_lr,
                "the last rate {last}"
            );
        } else {
            assert_eq!(
                last, cfg.lr,
                "a warm-up as long as the run peaks at its last step"
            );
        }
    }
}

/// Asks to stop once the validation part is being scored, as a Ctrl-C then would.
struct StopWhileScoring(bool);

impl Observer for StopWhileScoring {
    fn validating(&mut self, _epoch: usize) {
        self.0 = true;
    }
    fn stop_requested(&self) -> bool {
        self.0
    }
}

/// A stop asked for while an epoch's end is scored keeps that epoch (its checkpoint is
/// written) and begins no step of the next.
#[test]
fn a_stop_while_the_validation_part_is_scored_keeps_the_epoch_and_runs_no_more_steps() {
    let data = train_split();
    let cfg = TrainConfig {
        augment: Augment::none(),
        ..config(3)
    };
    let mut m = model(Method::Lora);
    let mut t = Trainer::new(&mut m, &cfg, data.len()).unwrap();
    let per_epoch = t.total_steps() / 3;
    t.validate_every(1, Box::new(|_: &Vit| Ok(None)));
    let dir = std::env::temp_dir().join(format!("loren-stop-scoring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("checkpoint.safetensors");
    let spec = CheckpointSpec {
        path: Some(path.clone()),
        ..Default::default()
    };
    let e = t
        .fit(&data, &spec, &mut StopWhileScoring(false))
        .unwrap_err();
    match e {
        NnError::Interrupted { step, kept } => {
            assert_eq!(step, per_epoch, "steps run after the stop");
            assert!(kept.contains("--resume"), "{kept}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(t.epoch(), 1);
    assert!(
        path.exists(),
        "the scored epoch's checkpoint was not written"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Each step draws fresh masks from (seed, step), so a resumed run draws the ones it would have.
#[test]
fn mc_dropout_resumes_bit_exactly() {
    resume_is_bit_exact(Method::McDropout);
}

/// With one member and nothing dropped, MC Dropout is the single network: same start, same
/// steps, bit for bit. So the dropout and the members are all it adds.
#[test]
fn mc_dropout_of_one_member_dropping_nothing_trains_as_the_single_network() {
    let data = train_split();
    let trained = |method: Method| {
        let ens = EnsembleConfig {
            drop_key: 0.0,
            method,
            members: 1,
            classes: 10,
            lora: LoraConfig::default(),
        };
        let mut vit = Vit::new(&VitConfig::tiny(), &ens, &Device::cpu(), 11).unwrap();
        let path = temp(&format!("one-member-{method}"));
        fit_into(&mut vit, 1, &data, &path);
        trained_tensors(&path)
    };
    let (single, mc) = (trained(Method::Single), trained(Method::McDropout));
    assert_eq!(single.len(), mc.len());
    for ((na, va), (nb, vb)) in single.iter().zip(&mc) {
        assert_eq!(na, nb);
        assert!(va == vb, "tensor {na} differs");
    }
}

/// Members with the very same head still predict apart, each from masks of its own, and a
/// prediction draws the same masks every time.
#[test]
fn mc_dropout_members_draw_their_own_masks_and_predictions_repeat() {
    let mut vit = model(Method::McDropout);
    let params = vit.params_mut();
    let head: Vec<_> = params
        .iter()
        .filter(|(_, p)| p.name().starts_with("head."))
        .map(|(id, _)| id)
        .collect();
    for id in head {
        let v = params.get(id).to_vec().unwrap();
        let half = v.len() / 2;
        let same: Vec<f32> = v[..half].iter().chain(&v[..half]).copied().collect();
        params.set(id, &same).unwrap();
    }
    let data = train_split();
    let b = data.batch(&(0..8).collect::<Vec<_>>(), None);
    let dims = [b.batch, b.channels, b.height, b.width];
    let keys = vit.image_keys(&b.images);
    let images = Tensor::from_vec(b.images, dims, MemTag::Workspace, vit.device()).unwrap();
    let p = vit.predict(&images, &keys).unwrap().to_vec().unwrap();
    let (m0, m1) = p.split_at(p.len() / 2);
    let apart = m0
        .iter()
        .zip(m1)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        apart > 1e-3,
        "members 0 and 1 predict alike (largest difference {apart})"
    );
    assert_eq!(vit.predict(&images, &keys).unwrap().to_vec().unwrap(), p);
    // The masks follow the keys: other keys, another draw; too few, a clear error.
    let other: Vec<u64> = keys.iter().map(|k| k ^ 1).collect();
    assert_ne!(vit.predict(&images, &other).unwrap().to_vec().unwrap(), p);
    let e = vit.predict(&images, &keys[1..]).unwrap_err().to_string();
    assert!(e.contains("7 keys for 8 images"), "{e}");
    // A model that draws no masks reads none.
    let lora = model(Method::Lora);
    let one = data.batch(&[0], None);
    assert!(lora.image_keys(&one.images).is_empty());
    let shape = one.image_shape();
    let one = Tensor::from_vec(one.images, shape, MemTag::Workspace, lora.device()).unwrap();
    lora.predict(&one, &[]).unwrap();
}

/// The DropKey rate is part of an MC Dropout run: resuming at another is refused, naming it. A
/// method without dropout records the rate it never used, and another one passes.
#[test]
fn resuming_mc_dropout_at_another_rate_is_refused_and_other_methods_ignore_it() {
    use loren_nn::train::check_resumable;
    for (method, refused) in [(Method::McDropout, true), (Method::Lora, false)] {
        let mut vit = model(method);
        let path = temp(&format!("rate-{method}"));
        let (vit_config, ensemble) = (vit.config.clone(), vit.ensemble.clone());
        Trainer::new(&mut vit, &config(1), 1)
            .unwrap()
            .save(&path, &Default::default())
            .unwrap();
        let file = TensorFile::read(&path).unwrap();
        let other = EnsembleConfig {
            drop_key: 0.3,
            ..ensemble
        };
        let got = check_resumable(&file, &vit_config, &other, &config(1));
        match refused {
            true => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains("ensemble.drop_key: saved 0.2, now 0.3"), "{e}");
            }
            false => got.unwrap(),
        }
    }
}

/// A checkpoint that cannot be written is named before the first step: found at the first
/// epoch's end, it would cost the epoch.
#[test]
fn an_unwritable_checkpoint_is_refused_before_the_first_step() {
    struct CountSteps(usize);
    impl Observer for CountSteps {
        fn step(&mut self, _: &StepInfo) {
            self.0 += 1;
        }
    }
    let data = train_split();
    let folder = temp("unwritable");
    let dir = folder.parent().unwrap();
    // A file where its folder would be.
    let blocked = dir.join("a-file");
    std::fs::write(&blocked, b"not a folder").unwrap();
    for (path, says) in [
        (dir.to_path_buf(), "is a folder"),
        (blocked.join("checkpoint.safetensors"), "a-file"),
    ] {
        let mut m = model(Method::Lora);
        let mut steps = CountSteps(0);
        let e = Trainer::new(&mut m, &config(1), data.len())
            .unwrap()
            .fit(
                &data,
                &CheckpointSpec {
                    path: Some(path.clone()),
                    ..Default::default()
                },
                &mut steps,
            )
            .unwrap_err();
        assert!(e.to_string().contains(says), "{}: {e}", path.display());
        assert_eq!(steps.0, 0, "{}: trained before refusing", path.display());
    }
    assert_eq!(std::fs::read(&blocked).unwrap(), b"not a folder");
}
