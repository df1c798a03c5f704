//! The training loop: batches in a seeded order, forward and backward on the tape, clipping,
//! the optimizer step on a warmup-cosine schedule; checkpoints at epoch ends, from which a run
//! resumes bit-exactly on the CPU; and a stop with the step number when the loss turns NaN.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use loren_autograd::optim::{Optimizer, OptimizerKind};
use loren_autograd::schedule::WarmupCosine;
use loren_autograd::{Grads, Phase, StepTimer, Tape, ops};
use loren_tensor::{MemTag, Rng, ScalarReadback, Staged, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Entry, TensorFile};
use crate::config::{Activations, EnsembleConfig, VitConfig};
use crate::data::{Augment, Batch, Dataset, batches, epoch_order, num_batches};
use crate::error::{NnError, Result};
use crate::vit::{Draw, Vit};

/// How to train. Everything a resumed run must repeat to continue bit-exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Whole passes over the training images; at least 1. A resumed run may ask for more than
    /// the checkpoint's run did.
    pub epochs: usize,
    /// Images per optimizer step, every member seeing all of them; at least 1. An epoch is
    /// `ceil(images / batch_size)` steps, its last batch keeping the remainder.
    pub batch_size: usize,
    /// Peak learning rate, reached after the warmup.
    pub lr: f32,
    /// Where the cosine decay ends.
    pub min_lr: f32,
    /// Optimizer steps (not epochs) of linear warmup up to [`TrainConfig::lr`], from the run's
    /// first step; capped at the run's total steps, 0 for none. The cosine decay to
    /// [`TrainConfig::min_lr`] takes the steps after it.
    pub warmup_steps: u64,
    /// The warmup's first step at learning rate 0, as the LoRA-Ensemble paper's code has it
    /// (see [`WarmupCosine::from_zero`]).
    #[serde(default)]
    pub warmup_from_zero: bool,
    /// The update rule and its settings (AdamW or SGD, weight decay, ...), applied to the
    /// trainable parameters alone; the learning rate comes from the schedule each step.
    pub optimizer: OptimizerKind,
    /// Clip the global gradient norm to this, when set.
    pub grad_clip: Option<f64>,
    /// The random augmentation of each training batch (drawn from [`TrainConfig::seed`], the
    /// epoch and the batch); [`Augment::none`] for none. Only training batches are augmented.
    pub augment: Augment,
    /// A fresh seeded order of the training images every epoch; false keeps the dataset's own
    /// order, as the LoRA-Ensemble paper's code does (`shuffle: false`).
    #[serde(default = "shuffled")]
    pub shuffle: bool,
    /// Seeds the data order and augmentation (the model's start has its own seed).
    pub seed: u64,
    /// What the forward keeps for the backward; recomputing gives the same gradients, bit for
    /// bit, in less memory and more time.
    #[serde(default)]
    pub activations: Activations,
}

impl TrainConfig {
    /// Plain steps for measuring and checking a step rather than for training well: one epoch,
    /// AdamW (weight decay 0.01) at `lr` with no warm-up, gradients clipped at norm 1, no
    /// augmentation, seed 0.
    pub fn plain(batch_size: usize, lr: f32, activations: Activations) -> TrainConfig {
        TrainConfig {
            epochs: 1,
            batch_size,
            lr,
            min_lr: 0.0,
            warmup_steps: 0,
            warmup_from_zero: false,
            optimizer: OptimizerKind::adamw(0.01),
            grad_clip: Some(1.0),
            augment: Augment::none(),
            shuffle: true,
            seed: 0,
            activations,
        }
    }

    /// Check the settings before anything is built: epochs and batch size at least 1, `lr`
    /// positive and finite, `min_lr` finite, not negative and not above `lr`, `grad_clip`
    /// positive and finite where set, `lr` times the weight decay below 1, and the optimizer's
    /// and augmentation's own settings.
    /// Otherwise an [`NnError::Config`] naming the field (an [`NnError::Data`] for the
    /// augmentation). [`Trainer::new`] calls it.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(NnError::Config(m.to_string()));
        if self.epochs == 0 {
            return bad("train for at least 1 epoch (--epochs, or TrainConfig::epochs)");
        }
        if self.batch_size == 0 {
            return bad(
                "the batch size must be at least 1 (--batch-size, or TrainConfig::batch_size)",
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("the learning rate must be positive and finite (--lr, or TrainConfig::lr)");
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0) {
            return bad(
                "the final learning rate must be finite and not negative (--min-lr, or TrainConfig::min_lr)",
            );
        }
        if self.min_lr > self.lr {
            return Err(NnError::Config(format!(
                "the final learning rate (--min-lr {}) is above the peak (--lr {}): the schedule \
                 would rise as it decays (TrainConfig::min_lr and lr)",
                self.min_lr, self.lr
            )));
        }
        if self.grad_clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad(
                "the gradient clip must be positive and finite (--grad-clip, or TrainConfig::grad_clip)",
            );
        }
        self.optimizer.check().map_err(|m| {
            NnError::Config(format!("the optimizer's {m} (TrainConfig::optimizer)"))
        })?;
        // Each step scales a weight by 1 - lr·wd (AdamW's decay; SGD's penalty without
        // momentum): at 1 or more that zeroes or flips it, and the run diverges in steps that
        // the gradients' check then skips, one by one.
        let wd = self.optimizer.weight_decay();
        let product = self.lr * wd;
        if product >= 1.0 {
            let short = |x: f32| match (1e-3..1e4).contains(&x) {
                true => format!("{x}"),
                false => format!("{x:e}"),
            };
            let what = if product == 1.0 {
                "zeroing"
            } else {
                "flipping"
            };
            return Err(NnError::Config(format!(
                "the peak learning rate times the weight decay is {} (--lr {} × --weight-decay \
                 {}): each step would scale the weights by 1 − {0}, {what} them; keep the \
                 product below 1 (TrainConfig::lr and optimizer)",
                short(product),
                short(self.lr),
                short(wd),
            )));
        }
        self.augment.validate()?;
        Ok(())
    }
}

/// Checkpoints from before [`TrainConfig::shuffle`] shuffled.
fn shuffled() -> bool {
    true
}

/// What a step reports to an [`Observer`].
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    /// The epoch the step belongs to, 0-based (unlike [`EpochInfo::epoch`], counted from 1).
    pub epoch: usize,
    /// Global 0-based step.
    pub step: u64,
    /// The run's steps in all, [`Trainer::total_steps`].
    pub total_steps: u64,
    /// The batch's loss: softmax cross-entropy in nats, the mean over members and images.
    /// Always finite: a step whose loss is not ends the epoch with [`NnError::NonFinite`]
    /// before it is reported.
    pub loss: f32,
    /// The learning rate the step's update used.
    pub lr: f32,
    /// Images in the batch: the batch size, or fewer in an epoch's last.
    pub images: usize,
    /// Wall-clock seconds from waiting for the batch to reading its loss back. On a GPU the
    /// loss is read while the step's backward and update may still run, so their time can
    /// fall in a later step's figure.
    pub seconds: f64,
}

/// What an epoch reports.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct EpochInfo {
    /// Counted from 1, as the progress lines print it and report.json keeps it.
    pub epoch: usize,
    pub mean_loss: f64,
    /// The epoch's training steps, without its validation.
    pub seconds: f64,
    /// The validation part scored at the epoch's end, where it was (see
    /// [`Trainer::validate_every`]).
    #[serde(default)]
    pub val: Option<EpochVal>,
    /// The epoch's steps that changed nothing because their gradients were not finite while their
    /// loss was: a diverging run ([`Optimizer::step`]; counted only with clipping on, as
    /// [`TrainConfig::grad_clip`] is by default). Their losses are in the mean all the same.
    #[serde(default)]
    pub skipped_steps: u64,
}

/// The validation part's figures at an epoch's end.
///
/// The [`Validate`] closure given to [`Trainer::validate_every`] makes them, so they mean what
/// it computed; the `loren` command fills them from [`crate::metrics::calibration`] of the
/// validation part's predictions, as the units below say.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochVal {
    /// Accuracy of the mean prediction, a fraction in [0, 1].
    pub accuracy: f64,
    /// Mean negative log-likelihood of the mean prediction, in nats.
    pub nll: f64,
    /// Expected calibration error over [`crate::metrics::NUM_BINS`] equal-width bins, in [0, 1].
    pub ece: f64,
    /// Wall-clock seconds the scoring took: [`Trainer::fit`] adds them to
    /// [`TrainSummary::validation_seconds`], not to its training time.
    pub seconds: f64,
}

/// Scores the model at an epoch's end; `None` when a stop was asked for meanwhile, so that the
/// epoch still ends and is checkpointed. `Send`, so that a [`Trainer`] may move to a thread of its
/// own.
pub type Validate<'m> = Box<dyn FnMut(&Vit) -> Result<Option<EpochVal>> + Send + 'm>;

/// Watches training: the CLI draws progress bars with it.
pub trait Observer {
    fn start(&mut self, _total_steps: u64, _first_step: u64) {}
    fn step(&mut self, _info: &StepInfo) {}
    /// Epoch `epoch` (counted from 1) has trained, and the validation part is being scored.
    fn validating(&mut self, _epoch: usize) {}
    fn epoch(&mut self, _info: &EpochInfo) {}
    /// Whether training should stop ([`NnError::Interrupted`]): asked after every step, and
    /// after each epoch's checkpoint (a stop asked for while the epoch's end was scored).
    fn stop_requested(&self) -> bool {
        false
    }
}

/// An observer that watches nothing.
pub struct Quiet;

impl Observer for Quiet {}

/// Where training keeps its checkpoint, and what to put in its metadata besides its own.
#[derive(Clone, Debug, Default)]
pub struct CheckpointSpec {
    /// Where [`Trainer::fit`] writes its checkpoint at every epoch's end, replacing the last
    /// (written to a temporary file and renamed); checked writable before the first step. None
    /// writes no checkpoint.
    pub path: Option<PathBuf>,
    /// Keys added to the checkpoint's metadata, such as what `loren eval` needs to find the
    /// data (`data`, `normalize`, ...). The keys the trainer writes itself replace any of the
    /// same name: `format`, `vit`, `ensemble`, `train`, `epoch`, `step`, `epoch_history`,
    /// `optimizer_steps`, the backbone's `backbone` and `backbone_fingerprint` (where the model
    /// loaded one), and the data's `norm_mean`, `norm_std` and `class_names`.
    pub metadata: HashMap<String, String>,
    /// An earlier run's files beside `path` (its report, say), removed when this run's first
    /// checkpoint replaces that run's: until then the earlier run stays whole.
    pub replaces: Vec<PathBuf>,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// Every epoch trained, a resumed run's earlier ones included (the rest are this run's).
    pub epochs: Vec<EpochInfo>,
    pub steps: u64,
    /// This run's training, without the validation at epoch ends.
    pub seconds: f64,
    pub images_per_second: f64,
    /// This run's validation at epoch ends.
    pub validation_seconds: f64,
}

/// A model being trained, with its optimizer, gradients and schedule.
pub struct Trainer<'m> {
    model: &'m mut Vit,
    config: TrainConfig,
    optimizer: Optimizer,
    grads: Grads,
    schedule: WarmupCosine,
    /// Where each step's loss comes back to the host, read once the step is queued.
    loss: ScalarReadback,
    step: u64,
    epoch: usize,
    steps_per_epoch: u64,
    /// The epochs trained so far, from the start of the run (kept in the checkpoint).
    history: Vec<EpochInfo>,
    /// The optimizer's skip count at the last epoch's end, from which the next epoch's is told.
    skipped_before: u64,
    /// The checkpoint [`Trainer::resume`] read, and the epochs its run was started for: what a
    /// stop before this run's first checkpoint tells to resume again.
    resumed_from: Option<(PathBuf, usize)>,
    /// Every how many epochs, and how, to score the validation part.
    validation: Option<(usize, Validate<'m>)>,
}

/// The metadata `format` of a training checkpoint.
pub const FORMAT: &str = "loren-train-v1";
/// The checkpoint's metadata key of the epochs trained so far.
const HISTORY: &str = "epoch_history";

impl<'m> Trainer<'m> {
    /// A trainer for `train_len` training images.
    pub fn new(model: &'m mut Vit, config: &TrainConfig, train_len: usize) -> Result<Trainer<'m>> {
        config.validate()?;
        let steps_per_epoch = num_batches(train_len, config.batch_size)? as u64;
        if steps_per_epoch == 0 {
            return Err(NnError::Config("the training set is empty".into()));
        }
        let total = steps_per_epoch
            .checked_mul(config.epochs as u64)
            .ok_or_else(|| {
                NnError::Config(format!(
                    "{} epochs of {steps_per_epoch} steps: more steps than loren counts (2^64)",
                    config.epochs
                ))
            })?;
        let optimizer = Optimizer::new(config.optimizer, model.params())?;
        let grads = Grads::new(model.params())?;
        let loss = ScalarReadback::new(model.device())?;
        model.set_prediction_seed(config.seed);
        Ok(Trainer {
            model,
            optimizer,
            grads,
            loss,
            schedule: WarmupCosine {
                base_lr: config.lr,
                min_lr: config.min_lr,
                warmup: config.warmup_steps.min(total),
                total,
                from_zero: config.warmup_from_zero,
            },
            config: config.clone(),
            step: 0,
            epoch: 0,
            steps_per_epoch,
            history: Vec::new(),
            skipped_before: 0,
            resumed_from: None,
            validation: None,
        })
    }

    /// Score the model with `validate` after every `epochs`-th epoch and after the last, into
    /// each such epoch's [`EpochInfo::val`]; 0 never does. It reads the model alone, so the
    /// training is the same bit for bit with or without it.
    pub fn validate_every(&mut self, epochs: usize, validate: Validate<'m>) {
        self.validation = (epochs > 0).then_some((epochs, validate));
    }

    /// The model being trained, as the last step left it.
    pub fn model(&self) -> &Vit {
        self.model
    }

    /// The optimizer: its state (AdamW's moments) and its step count.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The gradients of the last step (before the optimizer used them).
    pub fn grads(&self) -> &Grads {
        &self.grads
    }

    /// The next epoch to run (0-based).
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// One optimizer step on a batch; returns the loss. A loss that is not finite is
    /// [`NnError::NonFinite`], and that step has changed no parameter and no optimizer state.
    pub fn step(&mut self, batch: &Batch) -> Result<f32> {
        let images = batch.stage(self.model.device())?;
        self.step_timed(batch, images, None)
    }

    /// [`Trainer::step`] with the batch's images already staged for the model's device
    /// ([`Batch::stage`], perhaps on the thread that made the batch), so this thread only queues
    /// their copy.
    pub fn step_staged(&mut self, batch: &Batch, images: Staged) -> Result<f32> {
        self.step_timed(batch, images, None)
    }

    /// [`Trainer::step_staged`], marking `timer` after each op and each stage of the step (see
    /// [`loren_autograd::timing`]): where the step's time goes.
    pub fn step_timed(
        &mut self,
        batch: &Batch,
        images: Staged,
        timer: Option<&Rc<RefCell<StepTimer>>>,
    ) -> Result<f32> {
        let mark = |phase, what| {
            if let Some(t) = timer {
                t.borrow_mut().mark(phase, what);
            }
        };
        let shape = batch.image_shape();
        if !images.device().same(self.model.device()) {
            return Err(NnError::Config(
                "the staged images are for another device than the model's".into(),
            ));
        }
        if images.shape().dims() != shape {
            return Err(NnError::Config(format!(
                "the staged images are {}, the batch's [{}, {}, {}, {}]",
                images.shape(),
                shape[0],
                shape[1],
                shape[2],
                shape[3]
            )));
        }
        let images = Tensor::from_staged(images, MemTag::Workspace)?;
        self.grads.zero()?;
        mark(Phase::Forward, "images in, gradients zeroed");
        // The step waits for the GPU once, at its end, for the loss's copy alone
        // (`loren_tensor::readback`): the copy is queued where the loss is made and read once the
        // backward and the update are queued behind it; the update itself reads the loss on the
        // device and skips a non-finite one.
        let loss = {
            let tape = match timer {
                Some(t) => Tape::new().timed(t.clone()),
                None => Tape::new(),
            };
            let draw = Draw::step(self.config.seed, self.step);
            let logits = self
                .model
                .forward(&tape, &images, self.config.activations, draw)?;
            let loss = ops::softmax_cross_entropy(&tape, &logits, &batch.labels)?;
            drop(logits);
            self.loss.queue(loss.value())?;
            mark(Phase::Forward, "loss copied out");
            tape.backward(&loss, &mut self.grads)?;
            loss
        };
        let lr = self.schedule.lr(self.step);
        self.optimizer.step(
            self.model.params_mut(),
            &mut self.grads,
            lr,
            self.config.grad_clip,
            Some(loss.value()),
        )?;
        mark(Phase::Update, "optimizer step, clipping");
        let value = self.loss.wait()?;
        if !value.is_finite() {
            self.optimizer.uncount_skipped_step();
            return Err(self.non_finite(value));
        }
        self.step += 1;
        Ok(value)
    }

    fn non_finite(&self, value: f32) -> NnError {
        NnError::NonFinite {
            step: self.step,
            epoch: self.epoch + 1,
            loss: value,
            kept: String::new(),
        }
    }

    /// Run one epoch over `data` in its seeded order. A stop the observer asks for during the
    /// epoch's last step lets the epoch end: it is whole, and its checkpoint worth writing.
    pub fn run_epoch(&mut self, data: &Dataset, observer: &mut dyn Observer) -> Result<EpochInfo> {
        self.check_at_epoch_end("an epoch runs from its start")?;
        self.check_epoch_data(data)?;
        let start = Instant::now();
        let order = if self.config.shuffle {
            epoch_order(data.len(), self.config.seed, self.epoch as u64)
        } else {
            (0..data.len()).collect()
        };
        let (mut sum, mut count) = (0.0f64, 0usize);
        // --- prefetch (issue 5): batches are made on a background thread, in the same order and
        // from the same streams as before, while the previous step computes.
        let chunks: Vec<&[usize]> = batches(&order, self.config.batch_size)?.collect();
        let (seed, epoch) = (self.config.seed, self.epoch as u64);
        let augment = self.config.augment.clone();
        let device = self.model.device().clone();
        std::thread::scope(|scope| -> Result<()> {
            let chunks = &chunks;
            let make = move |i: usize| {
                let mut rng = augment_stream(seed, epoch, i);
                let batch = data.batch(chunks[i], Some((&augment, &mut rng)));
                // The host's pass over the images, here rather than on the thread that issues
                // the step.
                let images = batch.stage(&device);
                (batch, images)
            };
            let depth = crate::data::prefetch::DEPTH;
            let mut made = crate::data::prefetch::prefetch(scope, chunks.len(), depth, make);
            let last = chunks.len().saturating_sub(1);
            for (i, idx) in chunks.iter().enumerate() {
                // The step's time includes any wait for its batch.
                let t0 = Instant::now();
                let (batch, images) = made.next().expect("one batch per chunk");
                let lr = self.schedule.lr(self.step);
                let loss = self.step_staged(&batch, images?)?;
                sum += loss as f64 * idx.len() as f64;
                count += idx.len();
                observer.step(&StepInfo {
                    epoch: self.epoch,
                    step: self.step - 1,
                    total_steps: self.total_steps(),
                    loss,
                    lr,
                    images: idx.len(),
                    seconds: t0.elapsed().as_secs_f64(),
                });
                if observer.stop_requested() && i < last {
                    return Err(NnError::Interrupted {
                        step: self.step,
                        kept: String::new(),
                    });
                }
            }
            Ok(())
        })?;
        // --- end prefetch
        // The one read of the GPU's skip count an epoch, outside any step: it waits for the last
        // step's backward and update, which the loss's wait does not (an epoch's checkpoint, where
        // one is written, would wait for them too).
        let skipped = self.optimizer.skipped_steps()?;
        let mut info = EpochInfo {
            epoch: self.epoch + 1,
            mean_loss: sum / count.max(1) as f64,
            seconds: start.elapsed().as_secs_f64(),
            val: None,
            skipped_steps: skipped.saturating_sub(self.skipped_before),
        };
        self.skipped_before = skipped;
        self.epoch += 1;
        if self.scores(self.epoch)
            && let Some((_, validate)) = &mut self.validation
        {
            observer.validating(self.epoch);
            info.val = validate(self.model).map_err(|e| match e {
                NnError::NotANumber {
                    member,
                    image,
                    value,
                } => NnError::Diverged {
                    epoch: self.epoch,
                    step: self.step,
                    what: format!(
                        "member {member}'s probabilities for validation image {image} are {value}: \
                         the weights have diverged"
                    ),
                    kept: String::new(),
                },
                e => e,
            })?;
        }
        self.history.push(info);
        observer.epoch(&info);
        Ok(info)
    }

    /// `data` is what this trainer was made for: what its model takes, and as many steps an
    /// epoch as the `train_len` it was made with (its schedule's length comes from them).
    fn check_epoch_data(&self, data: &Dataset) -> Result<()> {
        self.model.check_data(data)?;
        let steps = num_batches(data.len(), self.config.batch_size)? as u64;
        if steps != self.steps_per_epoch {
            return Err(NnError::Config(format!(
                "{} images make {steps} steps an epoch at batch size {}, and the trainer was made \
                 for {} (Trainer::new's train_len): its learning-rate schedule would end in the \
                 wrong place",
                data.len(),
                self.config.batch_size,
                self.steps_per_epoch
            )));
        }
        Ok(())
    }

    /// Whether the validation part is scored at the end of (1-based) `epoch`: every
    /// [`Trainer::validate_every`] epochs, and at the last.
    fn scores(&self, epoch: usize) -> bool {
        match &self.validation {
            Some((every, _)) => epoch.is_multiple_of(*every) || epoch == self.config.epochs,
            None => false,
        }
    }

    /// A resumed run's last epoch whose scoring a stop cut short (Ctrl-C while the validation
    /// part was scored keeps the epoch, unscored), scored now from the weights that epoch ended
    /// with, so that the history is the one the run would have had unstopped. Its seconds, when
    /// it was scored.
    fn score_unscored_last_epoch(&mut self, observer: &mut dyn Observer) -> Result<Option<f64>> {
        let epoch = self.epoch;
        let unscored = self.history.last().is_some_and(|e| e.val.is_none());
        if !(unscored && self.scores(epoch)) {
            return Ok(None);
        }
        let Some((_, validate)) = &mut self.validation else {
            return Ok(None);
        };
        observer.validating(epoch);
        let val = validate(self.model)?;
        let last = self.history.len() - 1;
        self.history[last].val = val;
        Ok(val.map(|v| v.seconds))
    }

    /// The steps of the whole run, the length of its learning-rate schedule:
    /// `ceil(train_len / batch_size)` an epoch, times [`TrainConfig::epochs`] (a resumed run's
    /// earlier steps included).
    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch * self.config.epochs as u64
    }

    /// Train the remaining epochs, checkpointing after each (none remain for a resumed run that
    /// had trained them all: its history is returned as it was). On a NaN loss the error names
    /// the step and the checkpoint of the last good epoch, which is left as it was.
    pub fn fit(
        &mut self,
        data: &Dataset,
        ckpt: &CheckpointSpec,
        observer: &mut dyn Observer,
    ) -> Result<TrainSummary> {
        self.check_epoch_data(data)?;
        if let Some(path) = &ckpt.path {
            crate::checkpoint::check_writable(path)?;
            crate::checkpoint::check_room(path, self.checkpoint_bytes())?;
        }
        let start = Instant::now();
        let (first_step, first_epoch) = (self.step, self.history.len());
        // What an ensemble needs to read its inputs and name its classes, as `data` has them.
        let mut metadata = ckpt.metadata.clone();
        metadata.extend(input_metadata(data));
        observer.start(self.total_steps(), first_step);
        let rescored = self.score_unscored_last_epoch(observer)?;
        // Only a checkpoint this run wrote is its last good one: the file at the path may be
        // another run's.
        let earlier = ckpt.path.as_ref().filter(|p| first_step == 0 && p.exists());
        // A resumed run stopped before its first checkpoint: how to go on, extending as it did.
        let resumed_kept = match &self.resumed_from {
            Some((p, epochs)) => {
                let extend = match *epochs < self.config.epochs {
                    true => format!(" --epochs {}", self.config.epochs),
                    false => String::new(),
                };
                format!(
                    "the checkpoint it resumed from, {0}, is the last good one (--resume \
                     {0}{extend} continues from it)",
                    p.display()
                )
            }
            None => "the checkpoint it resumed from is the last good one".to_string(),
        };
        let kept = |saved: bool| match (&ckpt.path, earlier) {
            (Some(p), _) if saved => {
                format!("the last good checkpoint is kept at {}", p.display())
            }
            _ if first_step > 0 => resumed_kept.clone(),
            (_, Some(p)) => format!(
                "no checkpoint had been written yet, and {} is still the earlier run's",
                p.display()
            ),
            (Some(_), None) => {
                "no checkpoint had been written yet, so there is nothing to resume".to_string()
            }
            // A fit that writes none (a comparison's run, pretraining) has none to speak of.
            (None, None) => String::new(),
        };
        // What a stop that is no fault of the training keeps, and how to go on from it.
        let resumable = |saved: bool| {
            let mut kept = kept(saved);
            if let (Some(p), true) = (&ckpt.path, saved) {
                kept += &format!(" (--resume {} continues from its epoch's end)", p.display());
            }
            kept
        };
        let interrupted = |step: u64, saved: bool| NnError::Interrupted {
            step,
            kept: resumable(saved),
        };
        let mut saved = false;
        while self.epoch < self.config.epochs {
            let epoch_start = self.step;
            match self.run_epoch(data, observer) {
                Ok(_) => {}
                Err(NnError::NonFinite {
                    step, epoch, loss, ..
                }) => {
                    // The epoch's steps skipped for their gradients, on the way to this loss,
                    // which no epoch's end reported.
                    let skipped = self.optimizer.skipped_steps()?;
                    let before = match skipped.saturating_sub(self.skipped_before) {
                        0 => String::new(),
                        n => format!(
                            "{n} step{} of this epoch before it left the parameters as they were, \
                             {} gradients not finite",
                            if n == 1 { "" } else { "s" },
                            if n == 1 { "its" } else { "their" }
                        ),
                    };
                    // An epoch's first step starts from the weights its checkpoint was just
                    // written from: that loss may be theirs.
                    let last = match (&ckpt.path, saved && step == epoch_start) {
                        (Some(p), true) => format!(
                            "the last checkpoint written, {}, holds the weights that step began \
                             from (epoch {}'s end), so they may have diverged already",
                            p.display(),
                            epoch - 1
                        ),
                        _ => kept(saved),
                    };
                    let kept = [before, last]
                        .into_iter()
                        .filter(|part| !part.is_empty())
                        .collect::<Vec<_>>()
                        .join("; ");
                    return Err(NnError::NonFinite {
                        step,
                        epoch,
                        loss,
                        kept,
                    });
                }
                Err(e @ NnError::Diverged { .. }) => return Err(e.keeping(kept(saved))),
                Err(NnError::Interrupted { step, .. }) => return Err(interrupted(step, saved)),
                Err(e) => return Err(e),
            }
            if let Some(path) = &ckpt.path {
                self.save_keeping(path, &metadata, resumable(saved))
                    .map_err(|e| e.keeping(kept(saved)))?;
                if !saved {
                    remove_files(&ckpt.replaces)?;
                }
                saved = true;
            }
            // A stop asked for while the epoch's end was scored: the epoch is kept, and no step
            // of the next is begun (the last epoch ends, and the caller's scoring stops).
            if observer.stop_requested() && self.epoch < self.config.epochs {
                return Err(interrupted(self.step, saved));
            }
        }
        // A run resumed with no epoch left writes its checkpoint where this one writes, when
        // that is elsewhere (replacing what is there as any run does) or an epoch was scored
        // since; in place, its own reports and eval's stay, for the same weights.
        if let (Some(path), true) = (&ckpt.path, self.history.len() == first_epoch) {
            let in_place = (self.resumed_from.as_ref()).is_some_and(|(p, _)| same_path(p, path));
            if !in_place || rescored.is_some() {
                self.save_keeping(path, &metadata, kept(false))?;
            }
            if !in_place {
                remove_files(&ckpt.replaces)?;
            }
        }
        let validation_seconds: f64 = rescored.unwrap_or(0.0)
            + self.history[first_epoch..]
                .iter()
                .filter_map(|e| e.val.map(|v| v.seconds))
                .sum::<f64>();
        let seconds = start.elapsed().as_secs_f64() - validation_seconds;
        // Whole epochs, each of every image: a last batch may be short, or the one batch all.
        let images = ((self.history.len() - first_epoch) * data.len()) as f64;
        Ok(TrainSummary {
            epochs: self.history.clone(),
            steps: self.step,
            seconds,
            images_per_second: images / seconds.max(1e-9),
            validation_seconds,
        })
    }

    /// [`Trainer::save`] within `fit`: a failure says what was `kept`.
    fn save_keeping(
        &self,
        path: &Path,
        meta: &HashMap<String, String>,
        kept: String,
    ) -> Result<()> {
        self.save(path, meta).map_err(|e| match e {
            // Not a write that failed: the caller says what is kept.
            NnError::Diverged { .. } => e,
            e => NnError::NotSaved {
                error: Box::new(e),
                kept,
            },
        })
    }

    /// About the bytes of a checkpoint [`Trainer::save`] writes: the trainable tensors and their
    /// optimizer state, in f32, and room for the header (names, settings, the epochs' history).
    pub fn checkpoint_bytes(&self) -> u64 {
        const HEADER_ROOM: u64 = 1 << 20;
        let values: u64 = (self.model.params().iter())
            .filter(|(_, p)| p.trainable())
            .map(|(_, p)| p.value().numel() as u64)
            .sum();
        values * 4 * (1 + self.config.optimizer.state_tensors()) + HEADER_ROOM
    }

    /// Write the trainable tensors, the optimizer state and the position in training: an
    /// epoch's end, where a resumed run starts. `extra` is added to the metadata; with
    /// [`input_metadata`] of the training data in it, `loren::Ensemble::load` reads the file.
    pub fn save(&self, path: &Path, extra: &HashMap<String, String>) -> Result<()> {
        self.check_at_epoch_end(
            "a checkpoint is written at an epoch's end, where a resumed run starts",
        )?;
        let mut tensors = self.model.tensors(|_, trainable| trainable)?;
        for (id, st) in self.optimizer.state() {
            let name = self.model.params().param(*id).name().to_string();
            tensors.push((format!("optim.m.{name}"), entry(&st.m)?));
            if let Some(v) = &st.v {
                tensors.push((format!("optim.v.{name}"), entry(v)?));
            }
        }
        // A checkpoint is a place to go on from, which one that is not all numbers is not (and
        // every reader refuses it).
        for (name, e) in &tensors {
            if let Some(i) = e.data.iter().position(|v| !v.is_finite()) {
                let what = match name.starts_with("optim.") {
                    true => "the optimizer's state has diverged",
                    false => "the weights have diverged",
                };
                return Err(NnError::Diverged {
                    epoch: self.epoch,
                    step: self.step,
                    what: format!("tensor '{name}' holds {} at element {i}: {what}", e.data[i]),
                    kept: String::new(),
                });
            }
        }
        let mut meta = extra.clone();
        meta.extend([
            ("format".to_string(), FORMAT.to_string()),
            ("vit".to_string(), json(&self.model.config)),
            ("ensemble".to_string(), json(&self.model.ensemble)),
            ("train".to_string(), json(&self.config)),
            ("epoch".to_string(), self.epoch.to_string()),
            ("step".to_string(), self.step.to_string()),
            (HISTORY.to_string(), json(&self.history)),
            (
                "optimizer_steps".to_string(),
                self.optimizer.steps().to_string(),
            ),
        ]);
        if let Some(b) = self.model.backbone_source() {
            meta.insert("backbone".to_string(), b.path.display().to_string());
            meta.insert(BACKBONE_FINGERPRINT.to_string(), b.fingerprint.clone());
        }
        checkpoint::write(path, &tensors, meta)
    }

    /// Continue from a checkpoint written by [`Trainer::save`] for this same model.
    pub fn resume(&mut self, file: &TensorFile) -> Result<()> {
        if file.meta("format")? != FORMAT {
            return Err(NnError::checkpoint(
                file.path(),
                "not a loren training checkpoint",
            ));
        }
        check_resumable(file, &self.model.config, &self.model.ensemble, &self.config)?;
        let number = |key: &str| -> Result<u64> {
            file.meta(key)?.parse().map_err(|_| {
                NnError::checkpoint(file.path(), format!("metadata '{key}' is not a number"))
            })
        };
        let (epoch, step, opt_steps) = (
            number("epoch")?,
            number("step")?,
            number("optimizer_steps")?,
        );
        self.check_same_training(file, epoch as usize)?;
        // check_same_training held the epoch under this run's, whose steps Trainer::new counted.
        if step != epoch * self.steps_per_epoch {
            return Err(NnError::checkpoint(
                file.path(),
                format!(
                    "it was saved at step {step} after {epoch} epoch{}, which is no epoch's end \
                     at this trainer's {} steps an epoch (Trainer::new's train_len at batch size \
                     {}): saved inside an epoch, or made for other data",
                    if epoch == 1 { "" } else { "s" },
                    self.steps_per_epoch,
                    self.config.batch_size
                ),
            ));
        }
        self.check_same_backbone(file)?;
        self.model.load_tensors(file, |_, trainable| trainable)?;
        let names: HashMap<_, _> = self
            .model
            .params()
            .iter()
            .map(|(id, p)| (id, p.name().to_string()))
            .collect();
        self.optimizer.restore(opt_steps, |id, which, t| {
            let name = format!("optim.{which}.{}", names[&id]);
            let values = file
                .get_shaped(&name, t.dims())
                .map_err(|e| loren_tensor::Error::invalid("resuming", e.to_string()))?;
            t.copy_from_host(values)
        })?;
        self.epoch = epoch as usize;
        self.step = step;
        let started_for: TrainConfig = file.meta_json("train")?;
        self.resumed_from = Some((file.path().to_path_buf(), started_for.epochs));
        // Checkpoints from before the history was kept resume without it.
        self.history = match file.metadata().get(HISTORY) {
            Some(_) => file.meta_json(HISTORY)?,
            None => Vec::new(),
        };
        Ok(())
    }
}

impl Trainer<'_> {
    /// This trainer is at an epoch's end: an epoch's order, augmentation and schedule are the
    /// epoch's own, so an epoch begun again from inside, or a checkpoint of no epoch's end, would
    /// train otherwise than the run did.
    fn check_at_epoch_end(&self, what: &str) -> Result<()> {
        let began = self.epoch as u64 * self.steps_per_epoch;
        if self.step == began {
            return Ok(());
        }
        Err(NnError::Config(format!(
            "{what}, and this trainer is at step {}, inside epoch {} (which began at step \
             {began}): stopped inside an epoch (Ctrl-C, a loss that was not finite) or stepped by \
             hand (Trainer::step), it is at no epoch's end; make a new Trainer and resume it from \
             its last checkpoint (Trainer::resume)",
            self.step,
            self.epoch + 1
        )))
    }

    /// A frozen backbone is the one the saved run trained on, where it recorded one: its
    /// adapters mean nothing on other weights, and the next save would record these.
    fn check_same_backbone(&self, file: &TensorFile) -> Result<()> {
        let frozen = self.model.params().iter().any(|(_, p)| !p.trainable());
        let ours = self.model.backbone_source();
        match frozen {
            true => same_fingerprint(
                file,
                ours.map(|b| (b.fingerprint.as_str(), b.path.as_path())),
            ),
            false => Ok(()),
        }
    }

    /// The epochs of a resumed run ([`check_resumable`] checks the rest): no fewer than the saved
    /// run was started for (its schedule would be cut short). None may be left after the `done`
    /// it has trained: a run stopped after its last checkpoint (killed while it was scored) is
    /// then finished.
    fn check_same_training(&self, file: &TensorFile, done: usize) -> Result<()> {
        let theirs: TrainConfig = file.meta_json("train")?;
        if self.config.epochs < theirs.epochs {
            return Err(NnError::checkpoint(
                file.path(),
                format!(
                    "it was started for {} epochs, and --epochs {} would cut its learning-rate \
                     schedule short; resume with --epochs {} (or more, to extend it; \
                     TrainConfig::epochs from a program)",
                    theirs.epochs, self.config.epochs, theirs.epochs
                ),
            ));
        }
        if done > theirs.epochs {
            return Err(NnError::checkpoint(
                file.path(),
                format!(
                    "it records {done} epochs trained, past the {} it was started for: a \
                     damaged or hand-made checkpoint",
                    theirs.epochs
                ),
            ));
        }
        Ok(())
    }
}

/// Whether `a` and `b` name the same file, however spelled.
fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn remove_files(files: &[PathBuf]) -> Result<()> {
    for f in files.iter().filter(|f| f.exists()) {
        std::fs::remove_file(f).map_err(|e| NnError::io(f, e))?;
    }
    Ok(())
}

/// The checkpoint metadata of the inputs a model was trained on: the per-channel normalisation
/// its images need and its classes' names, each as JSON, as an exported ensemble keeps them.
pub const INPUT_KEYS: [&str; 3] = ["norm_mean", "norm_std", "class_names"];

/// [`INPUT_KEYS`] for `data`: what [`Trainer::fit`] adds to its checkpoints' metadata, for a
/// program that calls [`Trainer::save`] itself (`extra`) to give `loren::Ensemble::load` what it
/// needs to scale inputs and name classes.
pub fn input_metadata(data: &Dataset) -> [(String, String); 3] {
    let [mean, std, names] = INPUT_KEYS.map(String::from);
    [
        (mean, json(&data.norm_mean)),
        (std, json(&data.norm_std)),
        (names, json(&data.class_names)),
    ]
}

/// The metadata key of the backbone's [`TensorFile::fingerprint`] in a training checkpoint.
pub const BACKBONE_FINGERPRINT: &str = "backbone_fingerprint";

/// A checkpoint that recorded the fingerprint of the backbone it was trained from must be used
/// with those weights, where the model keeps them frozen (LoRA methods); one that predates the
/// record is taken as it is.
pub fn check_backbone(file: &TensorFile, backbone: &TensorFile) -> Result<()> {
    same_fingerprint(file, Some((&backbone.fingerprint(), backbone.path())))
}

/// The backbone `file` recorded is the one `found` (its fingerprint and file; None for weights
/// not loaded from one), where it recorded one.
fn same_fingerprint(file: &TensorFile, found: Option<(&str, &Path)>) -> Result<()> {
    let Some(recorded) = file.metadata().get(BACKBONE_FINGERPRINT) else {
        return Ok(());
    };
    let found = match found {
        Some((fingerprint, _)) if fingerprint == recorded => return Ok(()),
        Some((fingerprint, path)) => format!("{} has {fingerprint}", path.display()),
        None => "the model's was not loaded from a file".to_string(),
    };
    Err(NnError::checkpoint(
        file.path(),
        format!(
            "it was trained from a backbone with fingerprint {recorded}, and {found}: give it the \
             weights it was trained from (--backbone, Ensemble::open's backbone, or \
             Vit::load_backbone before Trainer::resume)"
        ),
    ))
}

/// Require a training checkpoint written by [`Trainer::save`].
pub fn check_format(file: &TensorFile) -> Result<()> {
    match file.metadata().get("format") {
        Some(f) if f == FORMAT => Ok(()),
        _ => Err(NnError::checkpoint(
            file.path(),
            "not a loren training checkpoint",
        )),
    }
}

/// Separates the augmentation stream from the data order's.
const AUGMENT_STREAM: u64 = 0x4155_474D_0000_0004;

/// Batch `batch` of epoch `epoch`'s augmentation draws: one stream for each, so that resuming
/// needs no saved state, and an unshuffled run still augments each epoch afresh.
fn augment_stream(seed: u64, epoch: u64, batch: usize) -> Rng {
    Rng::new(seed)
        .fork(AUGMENT_STREAM)
        .fork(epoch)
        .fork(batch as u64)
}

fn entry(t: &Tensor) -> Result<Entry> {
    Ok(Entry {
        shape: t.dims().to_vec(),
        data: t.to_vec()?,
    })
}

/// A training checkpoint continues only the run it was saved from: the same model, ensemble and
/// training settings, but for the epochs (more may be asked for) and whether activations are
/// recomputed. Every difference is named, in one error.
pub fn check_resumable(
    file: &TensorFile,
    vit: &VitConfig,
    ensemble: &EnsembleConfig,
    train: &TrainConfig,
) -> Result<()> {
    let saved: TrainConfig = file.meta_json("train")?;
    let free = TrainConfig {
        epochs: train.epochs,
        activations: train.activations,
        ..saved
    };
    // The model's and ensemble's fields under their names (vit.depth), the training's bare (lr);
    // another named config is one difference, not one per field.
    let saved_vit: VitConfig = file.meta_json("vit")?;
    let mut diffs = match saved_vit.name == vit.name {
        true => differences("vit", &json_value(&saved_vit), &json_value(vit)),
        false => vec![format!(
            "config: saved {}, now {}",
            saved_vit.name, vit.name
        )],
    };
    // A method records settings it never uses (LoRA's without adapters, the DropKey rate
    // without dropout): they cannot differ.
    let saved_ensemble: EnsembleConfig = file.meta_json("ensemble")?;
    let mut ours = ensemble.clone();
    if saved_ensemble.method == ensemble.method {
        if !ensemble.method.uses_lora() {
            ours.lora = saved_ensemble.lora;
        }
        if !ensemble.method.drops_keys() {
            ours.drop_key = saved_ensemble.drop_key;
        }
    }
    diffs.extend(differences(
        "ensemble",
        &json_value(&saved_ensemble),
        &json_value(&ours),
    ));
    diffs.extend(differences("", &json_value(&free), &json_value(train)));
    match diffs.is_empty() {
        true => Ok(()),
        false => Err(NnError::checkpoint(
            file.path(),
            format!(
                "it was trained with other settings; resume with the same ones ({})",
                diffs.join("; ")
            ),
        )),
    }
}

fn json_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("configs are plain data and always serialize")
}

/// Where two configs differ, one `field: saved X, now Y` per leaf, nested fields dotted after
/// `root` (when not empty).
fn differences(root: &str, saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    fn walk(path: String, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                let null = serde_json::Value::Null;
                for k in keys {
                    let sub = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        sub,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: saved {}, now {}", show(a), show(b))),
            _ => {}
        }
    }
    // Settings held as f32 serialize widened (0.001 as 0.0010000000474974513): shown as f32,
    // inside a nested value too (an optimizer's whole settings when its kind changed).
    fn show(v: &serde_json::Value) -> String {
        use serde_json::Value;
        match v {
            Value::Number(_) => match v.as_f64() {
                Some(x) if v.is_f64() && (x as f32) as f64 == x => (x as f32).to_string(),
                _ => v.to_string(),
            },
            Value::Object(m) => {
                let fields: Vec<String> =
                    m.iter().map(|(k, x)| format!("{k}: {}", show(x))).collect();
                format!("{{{}}}", fields.join(", "))
            }
            Value::Array(a) => {
                let items: Vec<String> = a.iter().map(show).collect();
                format!("[{}]", items.join(", "))
            }
            _ => v.to_string(),
        }
    }
    let mut out = Vec::new();
    walk(root.to_string(), saved, now, &mut out);
    out
}

/// The configs in `file`'s metadata describe a model whose parameters the files it is read from
/// hold (`held` values, `file`'s and its backbone's): corrupt or crafted metadata is refused
/// before a model of its size is allocated (an allocation too large aborts the process).
pub fn check_described_model(
    vit: &VitConfig,
    ens: &EnsembleConfig,
    file: &TensorFile,
    held: usize,
) -> Result<()> {
    ens.validate(vit)?;
    let needed = crate::memory_model::ParamCounts::estimate(vit, ens).total();
    if needed > held as f64 {
        return Err(NnError::checkpoint(
            file.path(),
            format!(
                "its metadata describe a model of {needed} parameters (a {} of {} members and {} \
                 classes on {}), and its files hold {held} values: the metadata do not match the \
                 tensors",
                ens.method, ens.members, ens.classes, vit.name
            ),
        ));
    }
    Ok(())
}

/// The seed of the run that trained the model `file` holds (a checkpoint, an export), which its
/// predictions follow ([`Vit::set_prediction_seed`]); 0 for a file that records none.
pub fn recorded_seed(file: &TensorFile) -> Result<u64> {
    match file.metadata().contains_key("train") {
        true => Ok(file.meta_json::<TrainConfig>("train")?.seed),
        false => Ok(0),
    }
}

/// Rebuild the model a training checkpoint holds. Its frozen backbone, when it has one, comes
/// from `backbone`; the trainable tensors from the checkpoint.
pub fn load_trained(
    file: &TensorFile,
    backbone: Option<&TensorFile>,
    device: &loren_tensor::Device,
) -> Result<Vit> {
    if file.meta("format")? != FORMAT {
        return Err(NnError::checkpoint(
            file.path(),
            "not a loren training checkpoint",
        ));
    }
    let (vit, ens): (VitConfig, EnsembleConfig) =
        (file.meta_json("vit")?, file.meta_json("ensemble")?);
    // Named first: without its backbone the files could not hold the model the sizes describe.
    let frozen_backbone = crate::memory_model::ParamCounts::estimate(&vit, &ens).frozen > 0.0;
    if frozen_backbone && backbone.is_none() {
        return Err(NnError::checkpoint(
            file.path(),
            "its frozen backbone is needed too",
        ));
    }
    check_described_model(
        &vit,
        &ens,
        file,
        file.values() + backbone.map_or(0, |b| b.values()),
    )?;
    let mut model = Vit::new(&vit, &ens, device, 0)?;
    model.set_prediction_seed(recorded_seed(file)?);
    // Without frozen weights the checkpoint holds every tensor: any backbone will do.
    if let Some(b) = backbone {
        if frozen_backbone {
            check_backbone(file, b)?;
        }
        model.load_backbone(b)?
    }
    model.load_tensors(file, |_, trainable| trainable)?;
    Ok(model)
}

/// A config as JSON, for checkpoint metadata.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("configs are plain data and always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_epoch_and_batch_augments_from_a_stream_of_its_own() {
        let first = |seed, epoch, batch| augment_stream(seed, epoch, batch).next_u64();
        let draws = [
            first(0, 0, 0),
            first(0, 1, 0),
            first(0, 0, 1),
            first(1, 0, 0),
        ];
        for (i, a) in draws.iter().enumerate() {
            assert!(draws[i + 1..].iter().all(|b| b != a), "{draws:x?}");
        }
        assert_eq!(first(2, 3, 4), first(2, 3, 4));
    }

    /// Settings no step can use are refused before training, whoever made them.
    #[test]
    fn the_optimizer_settings_are_checked_with_the_rest() {
        let adamw = |beta2, eps, weight_decay| OptimizerKind::AdamW {
            beta1: 0.9,
            beta2,
            eps,
            weight_decay,
        };
        let sgd = |momentum, weight_decay| OptimizerKind::Sgd {
            momentum,
            weight_decay,
        };
        let with = |optimizer| TrainConfig {
            optimizer,
            ..TrainConfig::plain(8, 1e-3, Activations::default())
        };
        for (optimizer, says) in [
            (adamw(1.0, 1e-8, 0.0), "beta2 1 must be in [0, 1)"),
            (adamw(0.999, 0.0, 0.0), "eps 0 must be positive"),
            (adamw(0.999, 1e-8, -1.0), "weight decay -1 must be"),
            (adamw(0.999, 1e-8, f32::NAN), "weight decay NaN must be"),
            (sgd(1.5, 0.0), "momentum 1.5 must be in [0, 1)"),
            (sgd(f32::NAN, 0.0), "momentum NaN must be"),
        ] {
            let e = with(optimizer).validate().unwrap_err().to_string();
            assert!(
                e.contains(says) && e.contains("TrainConfig::optimizer"),
                "{e}"
            );
        }
        for fine in [adamw(0.999, 1e-8, 0.05), sgd(0.0, 0.0), sgd(0.9, 1e-4)] {
            with(fine).validate().unwrap();
        }
    }

    /// A trained model predicts with its run's seed (MC Dropout's masks follow it), read from
    /// the file; a file that records no training settings predicts with seed 0's masks, the one
    /// set every model drew before they followed the seed.
    #[test]
    fn a_files_predictions_follow_the_seed_it_records_or_seed_0() {
        let dir = std::env::temp_dir().join(format!("loren-train-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let tensors = [(
            "w".to_string(),
            Entry {
                shape: vec![1],
                data: vec![1.0],
            },
        )];
        let seeded = TrainConfig {
            seed: 7,
            ..TrainConfig::plain(8, 1e-3, Activations::default())
        };
        let train = serde_json::to_string(&seeded).unwrap();
        for (metadata, seed) in [(vec![("train", train)], 7), (vec![], 0)] {
            let metadata = metadata
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            checkpoint::write(&path, &tensors, metadata).unwrap();
            let file = TensorFile::read(&path).unwrap();
            assert_eq!(recorded_seed(&file).unwrap(), seed);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The epoch history a checkpoint keeps as JSON comes back to the bit, so that a resumed
    /// run's report holds the figures its first part printed.
    #[test]
    fn the_epoch_history_round_trips_through_the_checkpoint_bit_for_bit() {
        let mut rng = Rng::new(7);
        let mut draw = || f64::from(rng.next_f32()) * 3.0 + f64::from(rng.next_f32()) * 1e-8;
        let history: Vec<EpochInfo> = (0..2000)
            .map(|e| EpochInfo {
                epoch: e + 1,
                mean_loss: draw(),
                seconds: draw(),
                val: Some(EpochVal {
                    accuracy: (e % 359) as f64 / 359.0,
                    nll: draw(),
                    ece: draw(),
                    seconds: draw(),
                }),
                skipped_steps: e as u64 % 3,
            })
            .collect();
        let back: Vec<EpochInfo> = serde_json::from_str(&json(&history)).unwrap();
        let bits = |h: &[EpochInfo]| -> Vec<u64> {
            h.iter()
                .flat_map(|e| {
                    let v = e.val.unwrap();
                    [e.mean_loss, e.seconds, v.accuracy, v.nll, v.ece, v.seconds]
                })
                .map(f64::to_bits)
                .collect()
        };
        assert!(bits(&back) == bits(&history));
        let skipped = |h: &[EpochInfo]| h.iter().map(|e| e.skipped_steps).collect::<Vec<_>>();
        assert_eq!(skipped(&back), skipped(&history));
    }
}
