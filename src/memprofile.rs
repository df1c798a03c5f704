//! `loren memprofile`: memory per ensemble size for LoRA-Ensemble and the explicit ensemble.
//!
//! For each (config, method, M): the analytic prediction ([`loren_nn::memory_model`]) always,
//! and, where it is measured, the peak bytes by tag over one training step after `warmup` steps
//! (with the peaks reset in between), the relative difference, and the device's own figure
//! (cuMemGetInfo on a GPU; n/a on the CPU, whose figures are the accounted bytes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use loren_nn::config::{Activations, EnsembleConfig, Method, VitConfig};
use loren_nn::memory_model::{self, ParamCounts, Precision, StepModel, TagBytes};
use loren_nn::train::Trainer;
use loren_nn::vit::Vit;
use loren_tensor::{Device, DeviceSpec, MemTag, MemoryReport};
use serde::Serialize;

use crate::bench::{
    Budget, RunInfo, Sweep, bench_train_config, budget_for, device_memory_used, ensemble_config,
    precision, predicted_need, random_batch, recompute_hint, recompute_phrase,
};
use crate::plot::{Chart, Series, Units, palette, render};
use crate::report::{aligned_columns, bytes, count};

/// What to profile.
#[derive(Clone, Debug)]
pub struct MemprofileOptions {
    pub device: DeviceSpec,
    /// Model configs; `None` takes the device's default (CPU: tiny and vit-b-32; GPU: vit-b-32
    /// and vit-b-16).
    pub configs: Option<Vec<String>>,
    pub methods: Vec<Method>,
    /// Ensemble sizes: every one is predicted.
    pub members: Vec<usize>,
    /// The sizes that are also measured; `None`: all of them, except on the CPU for configs
    /// other than tiny, where only M <= 2 (a ViT-B step takes seconds per member there).
    pub measure: Option<Vec<usize>>,
    pub batch: usize,
    pub rank: usize,
    pub classes: usize,
    /// Training steps before the measured one; `None`: 1, except 0 for ViT-B on the CPU, whose
    /// accounting is deterministic (the same peaks every step) and whose steps take seconds.
    pub warmup: Option<usize>,
    pub memory_budget: Option<u64>,
    pub seed: u64,
    /// What the training forward keeps for the backward, for both methods alike.
    pub activations: Activations,
    pub command: String,
}

impl Default for MemprofileOptions {
    fn default() -> Self {
        MemprofileOptions {
            device: DeviceSpec::Auto,
            configs: None,
            methods: vec![Method::Lora, Method::Explicit],
            members: vec![1, 2, 4, 8, 16, 32],
            measure: None,
            batch: 32,
            rank: 8,
            classes: 10,
            warmup: None,
            memory_budget: None,
            seed: 0,
            activations: Activations::Keep,
            command: "loren memprofile".into(),
        }
    }
}

/// The largest M measured by default on the CPU for a config other than tiny.
pub const CPU_MEASURE_MAX_LARGE: usize = 2;

/// Peaks by tag and of the total.
#[derive(Clone, Debug, Serialize)]
pub struct Peaks {
    pub by_tag: TagBytes,
    pub total: u64,
}

impl From<&MemoryReport> for Peaks {
    fn from(r: &MemoryReport) -> Peaks {
        let mut by_tag = TagBytes::default();
        for (i, tag) in MemTag::ALL.iter().enumerate() {
            by_tag.0[i] = r.peak(*tag);
        }
        Peaks {
            by_tag,
            total: r.total_peak,
        }
    }
}

/// One (config, method, M).
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    pub config: String,
    pub method: Method,
    pub members: usize,
    /// "measured", "predicted" (not measured by choice), "oom" (predicted not to fit), "error" or
    /// "stopped" (not measured: Ctrl-C stopped the run before it).
    pub status: String,
    pub note: Option<String>,
    pub predicted: Peaks,
    pub measured: Option<Peaks>,
    /// (predicted − measured) / measured, for the total and each tag with a measured peak.
    pub rel_diff_total: Option<f64>,
    pub rel_diff: BTreeMap<String, f64>,
    /// The device's own figure (cuMemGetInfo's used bytes after the step, which hold the
    /// configuration's peak: freed memory is kept for reuse); `None` on the CPU.
    pub device_used: Option<u64>,
    pub trainable_params: usize,
    /// Training steps run before the measured one.
    pub warmup: usize,
    /// The analytic model's total peak with the GPU's element sizes (bf16 activations and frozen
    /// weights, f32 trainable state), whatever the device.
    pub predicted_gpu_total: u64,
    /// When the activations were kept: the predicted total peak with `--recompute`, with this
    /// device's element sizes and with the GPU's.
    pub predicted_recompute_total: Option<u64>,
    pub predicted_recompute_gpu_total: Option<u64>,
}

/// LoRA-Ensemble's peak over the explicit ensemble's at one M.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub config: String,
    pub members: usize,
    /// Measured on this device, when both were measured.
    pub measured: Option<f64>,
    /// Predicted with this device's element sizes.
    pub predicted: f64,
    /// Predicted with the GPU's element sizes.
    pub predicted_gpu: f64,
    /// When the activations were kept: the same predictions with both recomputing the blocks.
    pub predicted_recompute: Option<f64>,
    pub predicted_recompute_gpu: Option<f64>,
}

/// What one more member costs, from the configs.
#[derive(Clone, Debug, Serialize)]
pub struct Growth {
    pub config: String,
    pub method: Method,
    pub params: ParamCounts,
    pub trainable_bytes_per_member: u64,
    pub gradient_bytes_per_member: u64,
    pub optimizer_bytes_per_member: u64,
    /// The same read off the measured rows (difference of the two most distant measured sizes),
    /// when two were measured.
    pub measured_trainable_bytes_per_member: Option<f64>,
    pub measured_optimizer_bytes_per_member: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemprofileReport {
    pub device: String,
    pub note: String,
    pub info: RunInfo,
    pub configs: Vec<String>,
    pub batch: usize,
    pub rank: usize,
    /// What the training forward kept for the backward, in every row.
    pub activations: Activations,
    pub precision: Precision,
    pub budget: Option<Budget>,
    pub rows: Vec<ProfileRow>,
    pub growth: Vec<Growth>,
    /// LoRA over explicit peak memory, per config, at M = 16 (or the largest M profiled).
    pub ratios: Vec<Ratio>,
    /// The largest |relative difference| of the total over the measured rows.
    pub max_rel_diff_total: Option<f64>,
}

/// a / b, when both are there.
fn ratio(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    Some(a? as f64 / b? as f64)
}

fn default_configs(device: &Device) -> Vec<String> {
    if device.is_cpu() {
        vec!["tiny".into(), "vit-b-32".into()]
    } else {
        vec!["vit-b-32".into(), "vit-b-16".into()]
    }
}

fn measured_by_default(is_cpu: bool, config: &str, m: usize) -> bool {
    !is_cpu || config == "tiny" || m <= CPU_MEASURE_MAX_LARGE
}

/// One training step's peaks after `warmup` steps, on a fresh device.
fn measure_step(
    o: &MemprofileOptions,
    vit: &VitConfig,
    ens: &EnsembleConfig,
    device: &Device,
    warmup: usize,
) -> Result<(MemoryReport, Option<u64>)> {
    // The device figure below is then this configuration's own peak.
    device.release_cached_memory()?;
    let mut model = Vit::new(vit, ens, device, o.seed)?;
    let batch = random_batch(vit, o.batch, o.classes, o.seed);
    let mut trainer = Trainer::new(
        &mut model,
        &bench_train_config(o.batch, o.seed, o.activations),
        (warmup + 1).saturating_mul(o.batch),
    )?;
    for _ in 0..warmup {
        trainer.step(&batch)?;
    }
    device.synchronize()?;
    device.memory().reset_peaks();
    trainer.step(&batch)?;
    device.synchronize()?;
    Ok((device.memory().report(), device_memory_used(device)))
}

fn rel(p: u64, m: u64) -> Option<f64> {
    (m > 0).then(|| (p as f64 - m as f64) / m as f64)
}

/// Only sizes in `members` are profiled, so a measured size outside them would quietly measure
/// nothing.
fn check_measure(o: &MemprofileOptions) -> Result<()> {
    let outside = o.measure.iter().flatten().find(|m| !o.members.contains(m));
    match outside {
        Some(m) => {
            let members: Vec<String> = o.members.iter().map(usize::to_string).collect();
            Err(anyhow!(
                "--measure {m}: not one of the --members sizes ({}); add it to --members to \
                 measure it",
                members.join(",")
            ))
        }
        None => Ok(()),
    }
}

/// Run the profile. `progress` is told what is about to be measured.
pub fn run_memprofile(
    o: &MemprofileOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<MemprofileReport> {
    plan_memprofile(o)?.run(progress)
}

/// A profile checked whole and ready to measure.
pub struct MemprofilePlan<'a> {
    o: &'a MemprofileOptions,
    sweep: Sweep,
}

/// Everything a profile can refuse, refused before anything is measured: the options, the
/// device, and every row the analytic model cannot describe (a bad rank or class count, a size
/// the engine does not build), so that no row measured is lost to a later one.
pub fn plan_memprofile(o: &MemprofileOptions) -> Result<MemprofilePlan<'_>> {
    check_measure(o)?;
    if let Some(w) = o.warmup {
        crate::bench::check_steps("--warmup", w)?;
    }
    let sweep = Sweep::open(
        &o.device,
        o.configs.as_deref(),
        default_configs,
        &o.members,
        &o.methods,
        o.batch,
    )?;
    for vit in &sweep.vits {
        for &method in &o.methods {
            for &m in row_sizes(method, &sweep.members) {
                let ens = ensemble_config(method, m, o.classes, o.rank);
                for precision in [precision(&sweep.probe), Precision::GPU_BF16] {
                    memory_model::predict(vit, &ens, o.batch, 2, precision, o.activations)?;
                }
            }
        }
    }
    Ok(MemprofilePlan { o, sweep })
}

/// The sizes `method` is profiled at: a single network is one row, whatever sizes the
/// ensembles are profiled at.
fn row_sizes(method: Method, members: &[usize]) -> &[usize] {
    match method.is_single() {
        true => &[1],
        false => members,
    }
}

impl MemprofilePlan<'_> {
    /// Measure and predict every row. `progress` is told what is about to be measured.
    pub fn run(self, progress: &mut dyn FnMut(&str)) -> Result<MemprofileReport> {
        let MemprofilePlan { o, sweep } = self;
        let device = sweep.device_label(&o.device);
        let Sweep {
            probe,
            configs,
            vits,
            members,
        } = sweep;
        let is_cpu = probe.is_cpu();
        let prec = precision(&probe);
        let budget = budget_for(&probe, o.memory_budget);
        let note = if is_cpu {
            let mut n = String::from(
                "CPU: f32, figures are the device's accounted bytes (deterministic); the device \
                 column (cuMemGetInfo) is n/a on the CPU.",
            );
            if o.measure.is_none() && vits.iter().any(|v| v.name != "tiny") {
                let _ = write!(
                    n,
                    " Measured: M <= {CPU_MEASURE_MAX_LARGE} for ViT-B (a ViT-B step takes seconds \
                     per member here), without a warm-up step (the accounting is deterministic); the \
                     analytic model covers every M."
                );
            }
            n
        } else {
            "GPU: bf16 weight matrices and activations, f32 trainable state; the device column is \
             cuMemGetInfo's used bytes after the step (context and other processes included), which \
             with freed memory kept for reuse is the configuration's peak reserved memory."
                .to_string()
        };
        drop(probe);

        let mut rows = Vec::new();
        let mut growth = Vec::new();
        for vit in &vits {
            for &method in &o.methods {
                let mut first: Option<StepModel> = None;
                let mut measured_pts: Vec<(usize, u64, u64)> = Vec::new();
                let warmup = o
                    .warmup
                    .unwrap_or(if is_cpu && vit.name != "tiny" { 0 } else { 1 });
                for &m in row_sizes(method, &members) {
                    let ens = ensemble_config(method, m, o.classes, o.rank);
                    let at = |precision, activations| {
                        memory_model::predict(vit, &ens, o.batch, 2, precision, activations)
                    };
                    let model = at(prec, o.activations)?;
                    let gpu = at(Precision::GPU_BF16, o.activations)?;
                    let recompute_total = |precision| -> Result<Option<u64>> {
                        Ok(match o.activations {
                            Activations::Keep => {
                                Some(at(precision, Activations::Recompute)?.train.total_peak)
                            }
                            Activations::Recompute => None,
                        })
                    };
                    let mut row = ProfileRow {
                        config: vit.name.clone(),
                        method,
                        members: ens.members,
                        status: "predicted".into(),
                        note: None,
                        predicted: Peaks {
                            by_tag: model.train.peak,
                            total: model.train.total_peak,
                        },
                        measured: None,
                        rel_diff_total: None,
                        rel_diff: BTreeMap::new(),
                        device_used: None,
                        trainable_params: model.params.trainable,
                        warmup,
                        predicted_gpu_total: gpu.train.total_peak,
                        predicted_recompute_total: recompute_total(prec)?,
                        predicted_recompute_gpu_total: recompute_total(Precision::GPU_BF16)?,
                    };
                    let want = match &o.measure {
                        // The single network is the baseline of whichever sizes are measured.
                        Some(list) if method.is_single() => !list.is_empty(),
                        Some(list) => list.contains(&m),
                        None => measured_by_default(is_cpu, &vit.name, m),
                    };
                    if want && crate::interrupt::requested() {
                        row.status = "stopped".into();
                    } else if want {
                        let device = crate::open_device(o.device)?;
                        let need = predicted_need(&model, &device);
                        match budget.as_ref().filter(|b| need > b.bytes) {
                            Some(b) => {
                                row.status = "oom".into();
                                row.note = Some(format!(
                                    "OOM at M={m}: predicted to need {}, {} available ({}){}",
                                    bytes(need),
                                    bytes(b.bytes),
                                    b.source,
                                    recompute_hint(
                                        vit,
                                        &ens,
                                        o.batch,
                                        o.activations,
                                        &device,
                                        b.bytes
                                    )
                                ));
                            }
                            None => {
                                progress(&format!("measuring {} {method} M={m}", vit.name));
                                match measure_step(o, vit, &ens, &device, warmup) {
                                    Ok((r, dev_used)) => {
                                        let p = Peaks::from(&r);
                                        row.rel_diff_total = rel(row.predicted.total, p.total);
                                        for tag in MemTag::ALL {
                                            if let Some(d) = rel(
                                                row.predicted.by_tag.get(tag),
                                                p.by_tag.get(tag),
                                            ) {
                                                row.rel_diff.insert(tag.name().to_string(), d);
                                            }
                                        }
                                        measured_pts.push((
                                            m,
                                            p.by_tag.get(MemTag::Trainable),
                                            p.by_tag.get(MemTag::OptimizerState),
                                        ));
                                        row.measured = Some(p);
                                        row.device_used = dev_used;
                                        row.status = "measured".into();
                                    }
                                    Err(e) if crate::bench::is_oom(&e) => {
                                        row.status = "oom".into();
                                        row.note = Some(format!("OOM at M={m}: {e:#}"));
                                    }
                                    Err(e) => {
                                        row.status = "error".into();
                                        row.note = Some(format!("{e:#}"));
                                    }
                                }
                                // Each row as it is done, so a run cut short still leaves it.
                                progress(&match (&row.measured, row.rel_diff_total) {
                                    (Some(p), Some(d)) => format!(
                                        "{} {method} M={m}: peak {}, predicted {} ({:+.2}%)",
                                        vit.name,
                                        bytes(p.total),
                                        bytes(row.predicted.total),
                                        100.0 * d
                                    ),
                                    _ => format!(
                                        "{} {method} M={m}: {}",
                                        vit.name,
                                        row.note.as_deref().unwrap_or("no figures")
                                    ),
                                });
                            }
                        }
                    }
                    if first.is_none() {
                        first = Some(model);
                    }
                    rows.push(row);
                }
                // A single network has no members to add.
                if let (Some(model), false) = (first, method.is_single()) {
                    // One member more, from the model: the trainable tensors (with their bf16
                    // shadows on a GPU), their gradients and the optimizer state.
                    let at = |m| {
                        let ens = ensemble_config(method, m, o.classes, o.rank);
                        memory_model::predict(vit, &ens, o.batch, 2, prec, o.activations)
                    };
                    let (one, two) = (at(1)?, at(2)?);
                    let step = |tag| two.train.start.get(tag) - one.train.start.get(tag);
                    let slope = |i: usize| -> Option<f64> {
                        let (a, b) = (measured_pts.first()?, measured_pts.last()?);
                        let (va, vb) = if i == 0 { (a.1, b.1) } else { (a.2, b.2) };
                        (b.0 > a.0).then(|| (vb as f64 - va as f64) / (b.0 - a.0) as f64)
                    };
                    growth.push(Growth {
                        config: vit.name.clone(),
                        method,
                        params: model.params,
                        trainable_bytes_per_member: step(MemTag::Trainable),
                        gradient_bytes_per_member: step(MemTag::Gradients),
                        optimizer_bytes_per_member: step(MemTag::OptimizerState),
                        measured_trainable_bytes_per_member: slope(0),
                        measured_optimizer_bytes_per_member: slope(1),
                    });
                }
            }
        }
        let mut ratios = Vec::new();
        for config in &configs {
            let at = |method: Method, m: usize| {
                rows.iter()
                    .find(|r| &r.config == config && r.method == method && r.members == m)
            };
            let m = members
                .iter()
                .copied()
                .filter(|&m| m <= 16)
                .max()
                .unwrap_or(members[0]);
            if let (Some(l), Some(e)) = (at(Method::Lora, m), at(Method::Explicit, m)) {
                ratios.push(Ratio {
                    config: config.clone(),
                    members: m,
                    measured: match (&l.measured, &e.measured) {
                        (Some(a), Some(b)) => Some(a.total as f64 / b.total as f64),
                        _ => None,
                    },
                    predicted: l.predicted.total as f64 / e.predicted.total as f64,
                    predicted_gpu: l.predicted_gpu_total as f64 / e.predicted_gpu_total as f64,
                    predicted_recompute: ratio(
                        l.predicted_recompute_total,
                        e.predicted_recompute_total,
                    ),
                    predicted_recompute_gpu: ratio(
                        l.predicted_recompute_gpu_total,
                        e.predicted_recompute_gpu_total,
                    ),
                });
            }
        }
        let max_rel_diff_total = rows
            .iter()
            .filter_map(|r| r.rel_diff_total)
            .map(f64::abs)
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            });
        Ok(MemprofileReport {
            device,
            note,
            info: RunInfo::collect(&o.command),
            configs,
            batch: o.batch,
            rank: o.rank,
            activations: o.activations,
            precision: prec,
            budget,
            rows,
            growth,
            ratios,
            max_rel_diff_total,
        })
    }
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:+.2}%", 100.0 * v))
        .unwrap_or_else(|| "-".into())
}

/// The profile as a table for people.
pub fn table(r: &MemprofileReport) -> String {
    let mut s = String::new();
    let mut warmups: Vec<String> = Vec::new();
    for c in &r.configs {
        if let Some(row) = r
            .rows
            .iter()
            .find(|x| &x.config == c && x.measured.is_some())
        {
            warmups.push(match row.warmup {
                0 => format!("no warm-up step for {c}"),
                1 => format!("after 1 warm-up step for {c}"),
                n => format!("after {n} warm-up steps for {c}"),
            });
        }
    }
    let _ = writeln!(
        s,
        "loren memprofile on {} (batch {}, rank {}, AdamW{}): peaks over one training step, \
         {}",
        r.device,
        r.batch,
        r.rank,
        recompute_phrase(r.activations),
        if warmups.is_empty() {
            "no step measured".to_string()
        } else {
            warmups.join(", ")
        }
    );
    let _ = writeln!(s, "{}", r.note);
    if let Some(b) = &r.budget {
        let _ = writeln!(s, "memory budget: {} ({})", bytes(b.bytes), b.source);
    }
    let with_recompute = r.rows.iter().any(|x| x.predicted_recompute_total.is_some());
    let _ = writeln!(
        s,
        "tag columns: each tag's own peak, reached at different moments of the step; total: the \
         peak of all tags together, so the tag columns can add up to more than it; measured, or \
         the prediction marked * where not measured; diff = (predicted - measured) / measured of \
         the total peak{}",
        if with_recompute {
            "; with --recompute = the predicted total peak if the blocks were recomputed"
        } else {
            ""
        }
    );
    let _ = writeln!(s);
    let mut head = vec![
        "config",
        "method",
        "M",
        "frozen",
        "trainable",
        "gradients",
        "optimizer",
        "activations",
        "workspace",
        "total",
        "predicted",
        "diff",
        "device",
    ];
    if with_recompute {
        head.push("with --recompute");
    }
    let mut lines: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    let mut notes = Vec::new();
    for row in &r.rows {
        let mut l = vec![
            row.config.clone(),
            row.method.to_string(),
            row.members.to_string(),
        ];
        let (src, star) = match &row.measured {
            Some(m) => (m, ""),
            None => (&row.predicted, "*"),
        };
        for tag in MemTag::ALL {
            l.push(format!("{}{star}", bytes(src.by_tag.get(tag))));
        }
        l.push(match &row.measured {
            Some(m) => bytes(m.total),
            None if row.status == "oom" => format!("OOM at M={}", row.members),
            None if row.status == "error" => "error".into(),
            None if row.status == "stopped" => "stopped".into(),
            None => "-".into(),
        });
        l.push(bytes(row.predicted.total));
        l.push(pct(row.rel_diff_total));
        l.push(match (row.device_used, r.device.as_str()) {
            (Some(b), _) => bytes(b),
            (None, _) => "n/a".into(),
        });
        if with_recompute {
            l.push(row.predicted_recompute_total.map_or("-".into(), bytes));
        }
        if let Some(n) = &row.note {
            notes.push(format!(
                "{} {} M={}: {n}",
                row.config, row.method, row.members
            ));
        }
        lines.push(l);
    }
    s.push_str(&aligned_columns(&lines, 2));
    for n in notes {
        let _ = writeln!(s, "{n}");
    }
    if let Some(d) = r.max_rel_diff_total {
        let _ = writeln!(
            s,
            "analytic model vs measured total peak: largest |diff| {:.2}% over the measured rows",
            100.0 * d
        );
    }
    for q in &r.ratios {
        let measured = q
            .measured
            .map(|v| format!("measured {v:.2}, "))
            .unwrap_or_default();
        let recompute = match (q.predicted_recompute, q.predicted_recompute_gpu) {
            (Some(here), Some(gpu)) => {
                format!("; both with --recompute: {here:.2} here, {gpu:.2} for a GPU")
            }
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{} at M={}: LoRA-Ensemble peak / explicit peak = {measured}predicted {:.2} here, \
             {:.2} predicted for a GPU (bf16){recompute}",
            q.config, q.members, q.predicted, q.predicted_gpu
        );
    }
    if !r.growth.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "What one more member adds (trainable state, AdamW):");
    }
    for g in &r.growth {
        let what = match g.method {
            Method::Lora | Method::SingleLora => format!(
                "adapters {} + head {} params",
                count(g.params.adapters_per_member),
                count(g.params.head_per_member)
            ),
            // The members share the one trained backbone.
            Method::McDropout => {
                format!("a head: {} params", count(g.params.head_per_member))
            }
            Method::Explicit | Method::Single => format!(
                "a full model: backbone {} + head {} params",
                count(g.params.backbone),
                count(g.params.head_per_member)
            ),
        };
        let measured = match (
            g.measured_trainable_bytes_per_member,
            g.measured_optimizer_bytes_per_member,
        ) {
            (Some(t), Some(o)) => format!(
                "; measured {} and {}",
                bytes(t.round() as u64),
                bytes(o.round() as u64)
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "  {:<9} {:<10} trainable +{}, gradients +{}, optimizer state +{} ({what}){measured}",
            g.config,
            g.method.to_string(),
            bytes(g.trainable_bytes_per_member),
            bytes(g.gradient_bytes_per_member),
            bytes(g.optimizer_bytes_per_member),
        );
    }
    s
}

/// Per config: the total peak (measured and predicted) and the training state (trainable +
/// gradients + optimizer) against M, both methods.
pub fn svg(r: &MemprofileReport) -> String {
    let mut charts = Vec::new();
    for config in &r.configs {
        let mut total = Chart::new(
            format!("{config}: peak memory of a training step"),
            "ensemble size M",
            "bytes",
        );
        let mut state = Chart::new(
            format!("{config}: trainable + gradients + optimizer"),
            "ensemble size M",
            "bytes",
        );
        for c in [&mut total, &mut state] {
            c.log_x = true;
            c.log_y = true;
            c.y_units = Units::Bytes;
        }
        let mut methods: Vec<Method> = r
            .rows
            .iter()
            .filter(|x| &x.config == config)
            .map(|x| x.method)
            .collect();
        methods.dedup();
        for (i, method) in methods.iter().enumerate() {
            let rows: Vec<&ProfileRow> = r
                .rows
                .iter()
                .filter(|x| &x.config == config && x.method == *method)
                .collect();
            let color = palette(i);
            let state_of = |p: &Peaks| {
                (p.by_tag.get(MemTag::Trainable)
                    + p.by_tag.get(MemTag::Gradients)
                    + p.by_tag.get(MemTag::OptimizerState)) as f64
            };
            let measured = |f: &dyn Fn(&Peaks) -> f64| -> Vec<(f64, f64)> {
                rows.iter()
                    .filter_map(|x| x.measured.as_ref().map(|p| (x.members as f64, f(p))))
                    .collect()
            };
            let predicted = |f: &dyn Fn(&Peaks) -> f64| -> Vec<(f64, f64)> {
                rows.iter()
                    .map(|x| (x.members as f64, f(&x.predicted)))
                    .collect()
            };
            let series = |name: String, points, dashed| Series {
                name,
                points,
                color: color.clone(),
                dashed,
            };
            total.series.push(series(
                format!("{method}: measured"),
                measured(&|p| p.total as f64),
                false,
            ));
            total.series.push(series(
                format!("{method}: predicted"),
                predicted(&|p| p.total as f64),
                true,
            ));
            state.series.push(series(
                format!("{method}: measured"),
                measured(&state_of),
                false,
            ));
            state.series.push(series(
                format!("{method}: predicted"),
                predicted(&state_of),
                true,
            ));
            for x in rows.iter().filter(|x| x.status == "oom") {
                total
                    .marks
                    .push((x.members as f64, format!("{method} OOM"), color.clone()));
            }
        }
        charts.push(total);
        charts.push(state);
    }
    let subtitle = format!(
        "{}; batch {}, rank {}; solid: measured, dashed: analytic model; {}",
        r.device, r.batch, r.rank, r.info.date
    );
    render("loren memprofile", &subtitle, &charts, 2)
}

/// Write memprofile.json, memprofile.svg and memprofile.md under `dir`; returns their paths.
pub fn write(r: &MemprofileReport, dir: &Path) -> Result<[PathBuf; 3]> {
    r.info
        .write_files(dir, "memprofile", r, &r.device, &table(r), &svg(r))
}
