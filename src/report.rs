//! Reports for people: the calibration report of one run and the side-by-side comparison.

use std::fmt::Write;

use serde::Serialize;

use loren_autograd::optim::OptimizerKind;
use loren_nn::eval::EvalReport;
use loren_nn::metrics::{NUM_BINS, OodReport, ShiftRow, SizeRow};
use loren_nn::train::{TrainConfig, TrainSummary};
use loren_nn::{Activations, EnsembleConfig, Method};

use crate::run::RunResult;

/// Bytes in the unit a person reads best.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    // Compared as printed: 1023.96 KiB would otherwise read "1024.0 KiB".
    let shown = |v: f64| format!("{v:.1}").parse::<f64>().unwrap_or(v);
    while u + 1 < UNITS.len() && shown(v) >= 1024.0 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Rows of cells as text columns two spaces apart, each as wide as its widest cell: the first
/// `left` columns (names) aligned left, the rest (numbers) right.
pub fn aligned_columns(rows: &[Vec<String>], left: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, &w))| {
                if c < left {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect();
        let _ = writeln!(s, "{}", cells.join("  ").trim_end());
    }
    s
}

/// A count with thousands separators.
pub fn count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "LoRA-Ensemble (M=8, rank 8)" and the like.
pub fn method_title(method: Method, members: usize, rank: Option<usize>) -> String {
    let name = match method {
        Method::Lora => "LoRA-Ensemble",
        Method::Explicit => "Explicit ensemble",
        Method::Single => "Single network",
        Method::SingleLora => "Single network with LoRA",
        Method::McDropout => "MC Dropout",
    };
    match rank {
        Some(rank) => format!("{name} (M={members}, rank {rank})"),
        None => format!("{name} (M={members})"),
    }
}

/// "the digits test split" for the dataset named "digits/test".
pub fn split_phrase(dataset: &str) -> String {
    match dataset.rsplit_once('/') {
        Some((data, split)) => format!("the {data} {split} split"),
        None => dataset.to_string(),
    }
}

/// The calibration report on `dataset` (a split's name, such as "digits/test"): test metrics,
/// then shift and OOD detection when evaluated.
pub fn calibration_report(title: &str, dataset: &str, report: &EvalReport) -> String {
    let t = &report.test;
    let mut s = String::new();
    let on = split_phrase(dataset);
    let _ = writeln!(s, "{title} on {on} ({} images)", t.samples);
    let _ = writeln!(s, "  accuracy             {:>7.2}%", 100.0 * t.accuracy);
    let _ = writeln!(s, "  ECE (15 bins)        {:>8.4}", t.ece);
    let _ = writeln!(s, "  adaptive ECE         {:>8.4}", t.adaptive_ece);
    let _ = writeln!(s, "  NLL                  {:>8.4}", t.nll);
    let _ = writeln!(
        s,
        "  Brier                {:>8.4}   (sum over classes, mean over samples)",
        t.brier
    );
    let (lo, hi) = t
        .member_accuracy
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
            (lo.min(a), hi.max(a))
        });
    let _ = writeln!(
        s,
        "  member accuracy      {:>7.2}%   (min {:.2}%, max {:.2}%)",
        100.0 * t.mean_member_accuracy,
        100.0 * lo,
        100.0 * hi
    );
    let _ = writeln!(s, "  disagreement         {:>8.4}", t.disagreement);
    let _ = writeln!(
        s,
        "  predictive entropy   {:>8.4}   mutual information {:.4}",
        t.predictive_entropy, t.mutual_information
    );
    if let Some(t) = &report.tempered {
        let bound = match t.at_bound {
            true => "; stopped at the search's bound, the validation NLL still falling",
            false => "",
        };
        let _ = writeln!(
            s,
            "  temperature-scaled   ECE {:.4}, NLL {:.4}, Brier {:.4}   (T = {:.3}, fitted on validation{bound})",
            t.ece, t.nll, t.brier, t.temperature
        );
    }
    if report.by_size.len() > 1 {
        size_block(&mut s, &report.by_size);
    }
    if !report.shift.is_empty() {
        let _ = writeln!(s, "  under shift, accuracy % / ECE by severity 1..5:");
        for kind in unique(report.shift.iter().map(|r| r.kind.clone())) {
            let cells: Vec<String> = report
                .shift
                .iter()
                .filter(|row| row.kind == kind)
                .map(|row| format!("{:5.1}/{:.3}", 100.0 * row.accuracy, row.ece))
                .collect();
            let _ = writeln!(s, "    {kind:<15} {}", cells.join("  "));
        }
        let rows = &report.shift;
        let mean = |f: fn(&ShiftRow) -> Option<f64>| shift_mean(rows, f).unwrap_or(f64::NAN);
        let at_t = shift_mean(rows, |r| r.ece_tempered).map_or(String::new(), |e| {
            format!("; {e:.3} at the temperature fitted on validation")
        });
        let _ = writeln!(
            s,
            "    mean of the {}: accuracy {:.1}%, ECE {:.3}{at_t}",
            rows.len(),
            100.0 * mean(|r| Some(r.accuracy)),
            mean(|r| Some(r.ece))
        );
    }
    if let Some(o) = &report.ood {
        ood_block(&mut s, "OOD detection", o, report.members);
    }
    for set in &report.ood_sets {
        let title = format!("OOD detection against {}", split_phrase(&set.dataset));
        ood_block(&mut s, &title, &set.report, report.members);
    }
    s
}

/// The test scores of smaller ensembles made of the members, a column per size.
fn size_block(s: &mut String, rows: &[SizeRow]) {
    let _ = writeln!(
        s,
        "  by ensemble size (mean over disjoint groups of that many members):"
    );
    type Cell = fn(&SizeRow) -> String;
    let lines: [(&str, Cell); 4] = [
        ("members", |r| r.members.to_string()),
        ("accuracy", |r| format!("{:.2}%", 100.0 * r.accuracy)),
        ("ECE", |r| format!("{:.4}", r.ece)),
        ("NLL", |r| format!("{:.4}", r.nll)),
    ];
    for (name, cell) in lines {
        let cells: Vec<String> = rows.iter().map(|r| format!("{:>8}", cell(r))).collect();
        let _ = writeln!(s, "    {name:<10}{}", cells.concat());
    }
}

/// The mean of `f` over the shifted sets; none without them, or where a set lacks the figure.
fn shift_mean(rows: &[ShiftRow], f: fn(&ShiftRow) -> Option<f64>) -> Option<f64> {
    let values: Option<Vec<f64>> = rows.iter().map(f).collect();
    values
        .filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// One OOD report of an ensemble of `members`: its three scores' AUROC, AUPR and FPR at 95% TPR.
fn ood_block(s: &mut String, title: &str, o: &OodReport, members: usize) {
    let _ = writeln!(
        s,
        "  {title} ({} in, {} out; OOD positive): AUROC / AUPR / FPR@95%TPR",
        o.in_samples, o.ood_samples
    );
    for (name, d) in [
        ("max-probability", &o.max_prob),
        ("entropy", &o.entropy),
        ("mutual info", &o.mutual_information),
    ] {
        // One member's mutual information is 0 for every image: its figures are those of a
        // score that tells nothing, which the line says rather than leave them to be read.
        let note = match (name, members) {
            ("mutual info", 1) => "   (one member: 0 for every image, no score)",
            _ => "",
        };
        let _ = writeln!(
            s,
            "    {name:<15} {:.4} / {:.4} / {:.4}{note}",
            d.auroc, d.aupr, d.fpr95
        );
    }
}

/// The validation figures, when the run kept a validation part, how it trained, then what
/// training cost: parameters, memory and time.
pub fn training_line(r: &RunResult) -> String {
    let val = match (r.val_accuracy, r.val_nll, r.val_ece) {
        (Some(acc), Some(nll), Some(ece)) => format!(
            "  validation: accuracy {:.2}%, NLL {nll:.4}, ECE {ece:.4}\n",
            100.0 * acc
        ),
        _ => "  validation: none (--train-on-val trained on it)\n".to_string(),
    };
    let validating = match r.validation_seconds {
        s if s > 0.0 => format!(", validation {s:.1}s"),
        _ => String::new(),
    };
    let cost = format!(
        "  trainable parameters {} of {}; peak tensor memory {} training, {} scoring, on {}{}; \
         training {:.1}s{validating}, evaluation {:.1}s\n",
        count(r.trainable_params),
        count(r.total_params),
        bytes(r.memory.total_peak),
        bytes(r.scoring_peak),
        r.device,
        match r.activations {
            Activations::Keep => "",
            Activations::Recompute => " (blocks recomputed)",
        },
        r.train_seconds,
        r.eval_seconds
    );
    val + &settings_line(&r.settings.train, &r.settings.ensemble, r.train.steps)
        + &skipped_line(&r.train)
        + &cost
}

/// The steps that changed nothing, their gradients not finite, when any did: each epoch's
/// warning said so as it ended, and a report read later says it too.
fn skipped_line(t: &TrainSummary) -> String {
    let skipped: u64 = t.epochs.iter().map(|e| e.skipped_steps).sum();
    match skipped {
        0 => String::new(),
        n => format!(
            "  skipped: {n} of the run's {} steps left the parameters as they were, their \
             gradients not finite (a diverging run)\n",
            t.steps
        ),
    }
}

/// How the run trained, over its `steps`: the learning rate (whose default depends on the
/// method) and its schedule as it ran, the optimizer and the budget.
fn settings_line(t: &TrainConfig, ens: &EnsembleConfig, steps: u64) -> String {
    let warmup = match t.warmup_steps {
        1 => "1 warmup step".to_string(),
        n => format!("{n} warmup steps"),
    };
    let schedule = match t.warmup_steps >= steps {
        // The schedule as asked would mislead: the warm-up was cut to the run (as the Trainer
        // cuts it), which ends as the rate reaches its peak, with no decay.
        true => {
            let reached = steps.saturating_sub(u64::from(t.warmup_from_zero));
            format!(
                "{warmup}, the run's {steps} all warm-up (the rate rising to {:.0}% \
                 of it at the last, no decay)",
                100.0 * reached as f64 / steps.max(1) as f64
            )
        }
        false => format!("{warmup}, cosine to {}", rate(t.min_lr)),
    };
    let optimizer = match t.optimizer {
        OptimizerKind::AdamW { weight_decay, .. } => format!("AdamW (weight decay {weight_decay})"),
        OptimizerKind::Sgd {
            momentum,
            weight_decay,
        } => format!("SGD (momentum {momentum}, weight decay {weight_decay})"),
    };
    // Members of their own weights are clipped as one, as the paper's code does: the norm is
    // over every member's gradients, which couples the members, said so that no one reads it
    // as M networks each clipped alone.
    let together = match ens.members {
        m if m > 1 && ens.method != Method::McDropout => format!(" (the {m} members' as one)"),
        _ => String::new(),
    };
    let clip = t
        .grad_clip
        .map(|c| format!(", gradients clipped at norm {c}{together}"))
        .unwrap_or_default();
    let order = if t.shuffle { "" } else { " in file order" };
    format!(
        "  trained: lr {}, {schedule}; {optimizer}{clip}; {} epoch{} of batch {}{order}, {}\n",
        rate(t.lr),
        t.epochs,
        if t.epochs == 1 { "" } else { "s" },
        t.batch_size,
        t.augment
    )
}

/// A learning rate as one is written: 1e-3, 2.5e-4, 0.
pub fn rate(lr: f32) -> String {
    if lr == 0.0 {
        "0".to_string()
    } else {
        format!("{lr:e}")
    }
}

/// Each item once, in the order first seen.
pub(crate) fn unique<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut seen = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen
}

/// For each ensemble method run at two or more sizes, what one more member adds between the
/// smallest and the largest: trainable parameters and peak memory while training.
pub fn growth_per_member(runs: &[RunResult]) -> String {
    let sized: Vec<RunSize> = runs
        .iter()
        .map(|r| RunSize {
            method: r.method,
            members: r.members,
            trainable_params: r.trainable_params,
            peak: r.memory.total_peak,
        })
        .collect();
    growth_lines(&sized)
}

/// What [`growth_per_member`] reads of a run.
struct RunSize {
    method: Method,
    members: usize,
    trainable_params: usize,
    peak: u64,
}

fn growth_lines(runs: &[RunSize]) -> String {
    let mut s = String::new();
    for method in unique(runs.iter().map(|r| r.method)) {
        let rows: Vec<&RunSize> = runs.iter().filter(|r| r.method == method).collect();
        let (Some(lo), Some(hi)) = (
            rows.iter().min_by_key(|r| r.members),
            rows.iter().max_by_key(|r| r.members),
        ) else {
            continue;
        };
        if hi.members == lo.members {
            continue;
        }
        let steps = (hi.members - lo.members) as f64;
        let params = (hi.trainable_params as f64 - lo.trainable_params as f64) / steps;
        let peak = (hi.peak as f64 - lo.peak as f64) / steps;
        let _ = writeln!(
            s,
            "{:<10} one more member adds {} trainable parameters and {} of peak tensor memory (M={} to M={})",
            method.name(),
            count(params.round() as usize),
            bytes(peak.max(0.0).round() as u64),
            lo.members,
            hi.members
        );
    }
    s
}

/// The side-by-side table of `loren compare`. ECE@T is the test ECE after temperature scaling
/// fitted on validation (see the calibration report).
pub fn comparison_table(runs: &[RunResult]) -> String {
    let mut s = String::new();
    let header = [
        "method",
        "M",
        "acc %",
        "ECE",
        "NLL",
        "Brier",
        "ECE@T",
        "trainable",
        "frozen",
        "trainable",
        "grads",
        "optim",
        "activ",
        "work",
        "peak",
        "train s",
        "eval s",
    ];
    let _ = writeln!(
        s,
        "{:<12} {:>3} {:>6} {:>7} {:>7} {:>7} {:>7} {:>10} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>7} {:>6}",
        header[0],
        header[1],
        header[2],
        header[3],
        header[4],
        header[5],
        header[6],
        "params",
        header[8],
        header[9],
        header[10],
        header[11],
        header[12],
        header[13],
        header[14],
        header[15],
        header[16]
    );
    let _ = writeln!(
        s,
        "{:<67}| {:^69} |",
        "", "peak tensor memory while training, by tag"
    );
    for r in runs {
        let t = &r.report.test;
        let p = |tag: &str| bytes(r.memory.peak.get(tag).copied().unwrap_or(0));
        let _ = writeln!(
            s,
            "{:<12} {:>3} {:>6.2} {:>7.4} {:>7.4} {:>7.4} {:>7} {:>10} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>7.1} {:>6.1}",
            r.method.name(),
            r.members,
            100.0 * t.accuracy,
            t.ece,
            t.nll,
            t.brier,
            // A fit stopped at its bound is marked: the figure is of a nearly one-hot (or uniform)
            // prediction.
            r.report
                .tempered
                .as_ref()
                .map_or("-".to_string(), |t| format!(
                    "{:.4}{}",
                    t.ece,
                    if t.at_bound { "*" } else { "" }
                )),
            count(r.trainable_params),
            p("frozen_weights"),
            p("trainable"),
            p("gradients"),
            p("optimizer_state"),
            p("activations"),
            p("workspace"),
            bytes(r.memory.total_peak),
            r.train_seconds,
            r.eval_seconds
        );
    }
    if runs
        .iter()
        .any(|r| r.report.tempered.as_ref().is_some_and(|t| t.at_bound))
    {
        let _ = writeln!(
            s,
            "* its temperature fit stopped at the search's bound, the validation NLL still \
             falling: at T = 0.01 (no validation error to fit) the scaled prediction is nearly \
             one-hot, at T = 100 nearly uniform"
        );
    }
    // The default learning rate depends on the method: say what each one trained at.
    let rates = unique(
        runs.iter()
            .map(|r| format!("{} {}", r.method.name(), rate(r.settings.train.lr))),
    );
    if !rates.is_empty() {
        let _ = writeln!(s, "peak learning rates: {}", rates.join(", "));
    }
    s
}

/// The legend printed once under `loren compare`'s tables: what each ECE bins and what AUROC
/// separates, said here rather than in headers as wide as the figures. `summaries` are those of
/// the seed summary printed (none without --seeds): its paper ECE and AUROC columns get a line.
pub fn compare_legend(summaries: &[SeedSummary]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ECE: top-label, {NUM_BINS} equal-width bins, on the mean of the members' probabilities; \
         {}: the same after temperature scaling fitted on validation",
        if summaries.is_empty() {
            "ECE@T"
        } else {
            "ECE@T, ECE at T"
        }
    );
    if !summaries.is_empty() {
        let _ = writeln!(
            s,
            "paper ECE: as the LoRA-Ensemble paper's code computes it, 10 equal-width bins \
             (k/10, (k+1)/10] on the softmax of the members' mean logits"
        );
    }
    if summaries.iter().any(|x| x.ood_auroc_entropy.is_some()) {
        let _ = writeln!(
            s,
            "AUROC (entropy): predictive entropy separating the test images from the built-in OOD \
             set (every test image inverted, as many noise images, and the --holdout-classes \
             images if any)"
        );
    }
    s
}

/// A figure over seeds: their mean and sample standard deviation (none for one seed, where a 0
/// would read as no spread; null in JSON).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: Option<f64>,
}

impl MeanSd {
    pub fn of(xs: &[f64]) -> MeanSd {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let sd = (xs.len() > 1)
            .then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
        MeanSd { mean, sd }
    }

    /// "98.47 ± 0.16": `scale` times each, to `digits` places; the mean alone without a spread.
    fn cell(self, scale: f64, digits: usize) -> String {
        match self.sd {
            Some(sd) => format!("{:.digits$} ± {:.digits$}", scale * self.mean, scale * sd),
            None => format!("{:.digits$}", scale * self.mean),
        }
    }
}

/// One method at one ensemble size, over the seeds it was trained with (`loren compare
/// --seeds`). The test figures are those of the calibration report; the shift figures are the
/// means over every shifted set; a figure a run did not measure (no validation part, no shift,
/// no OOD) is absent.
#[derive(Clone, Debug, Serialize)]
pub struct SeedSummary {
    pub method: Method,
    pub members: usize,
    pub seeds: Vec<u64>,
    pub accuracy: MeanSd,
    pub ece: MeanSd,
    pub ece_paper: MeanSd,
    pub nll: MeanSd,
    pub brier: MeanSd,
    /// The test ECE of the prediction scaled by the temperature fitted on validation.
    pub ece_tempered: Option<MeanSd>,
    pub val_ece: Option<MeanSd>,
    pub shift_accuracy: Option<MeanSd>,
    pub shift_ece: Option<MeanSd>,
    /// The shifted sets' mean ECE at the temperature fitted on (unshifted) validation.
    pub shift_ece_tempered: Option<MeanSd>,
    pub ood_auroc_entropy: Option<MeanSd>,
}

/// The runs grouped by method and ensemble size, the groups in the order they first appear.
pub(crate) fn by_method_and_size(runs: &[RunResult]) -> Vec<Vec<&RunResult>> {
    let mut groups: Vec<Vec<&RunResult>> = Vec::new();
    for r in runs {
        match groups
            .iter_mut()
            .find(|g| (g[0].method, g[0].members) == (r.method, r.members))
        {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// A summary per method and size, in the order they first appear in `runs`.
pub fn seed_summaries(runs: &[RunResult]) -> Vec<SeedSummary> {
    by_method_and_size(runs)
        .iter()
        .map(|g| {
            let scored: Vec<Scored> = g
                .iter()
                .map(|r| Scored {
                    seed: r.seed,
                    val_ece: r.val_ece,
                    report: &r.report,
                })
                .collect();
            summarise(g[0].method, g[0].members, &scored)
        })
        .collect()
}

/// What a seed summary reads of one run.
struct Scored<'a> {
    seed: u64,
    val_ece: Option<f64>,
    report: &'a EvalReport,
}

fn summarise(method: Method, members: usize, runs: &[Scored]) -> SeedSummary {
    let over = |f: &dyn Fn(&Scored) -> f64| MeanSd::of(&runs.iter().map(f).collect::<Vec<_>>());
    // Present only when every run has it: a mean over some of the seeds would read as all.
    let over_all = |f: &dyn Fn(&Scored) -> Option<f64>| {
        runs.iter()
            .map(f)
            .collect::<Option<Vec<f64>>>()
            .map(|xs| MeanSd::of(&xs))
    };
    let shift_mean = |r: &Scored, f| shift_mean(&r.report.shift, f);
    SeedSummary {
        method,
        members,
        seeds: runs.iter().map(|r| r.seed).collect(),
        accuracy: over(&|r| r.report.test.accuracy),
        ece: over(&|r| r.report.test.ece),
        ece_paper: over(&|r| r.report.test.ece_paper),
        nll: over(&|r| r.report.test.nll),
        brier: over(&|r| r.report.test.brier),
        ece_tempered: over_all(&|r| r.report.tempered.as_ref().map(|t| t.ece)),
        val_ece: over_all(&|r| r.val_ece),
        shift_accuracy: over_all(&|r| shift_mean(r, |row| Some(row.accuracy))),
        shift_ece: over_all(&|r| shift_mean(r, |row| Some(row.ece))),
        shift_ece_tempered: over_all(&|r| shift_mean(r, |row| row.ece_tempered)),
        ood_auroc_entropy: over_all(&|r| r.report.ood.as_ref().map(|o| o.entropy.auroc)),
    }
}

/// The summaries as a table: mean ± sd per column, a column only where some row has it.
pub fn seed_summary_table(summaries: &[SeedSummary]) -> String {
    type Column = (&'static str, fn(&SeedSummary) -> Option<String>);
    let columns: [Column; 12] = [
        ("acc %", |s| Some(s.accuracy.cell(100.0, 2))),
        ("ECE", |s| Some(s.ece.cell(1.0, 4))),
        ("NLL", |s| Some(s.nll.cell(1.0, 4))),
        ("Brier", |s| Some(s.brier.cell(1.0, 4))),
        ("paper ECE", |s| Some(s.ece_paper.cell(1.0, 4))),
        ("ECE at T", |s| s.ece_tempered.map(|v| v.cell(1.0, 4))),
        ("val ECE", |s| s.val_ece.map(|v| v.cell(1.0, 4))),
        ("shift acc %", |s| {
            s.shift_accuracy.map(|v| v.cell(100.0, 1))
        }),
        ("shift ECE", |s| s.shift_ece.map(|v| v.cell(1.0, 4))),
        ("shift ECE at T", |s| {
            s.shift_ece_tempered.map(|v| v.cell(1.0, 4))
        }),
        ("AUROC (entropy)", |s| {
            s.ood_auroc_entropy.map(|v| v.cell(1.0, 4))
        }),
        ("seeds", |s| {
            Some(
                s.seeds
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            )
        }),
    ];
    let shown: Vec<&Column> = columns
        .iter()
        .filter(|(_, cell)| summaries.iter().any(|s| cell(s).is_some()))
        .collect();
    let mut rows = vec![
        ["method", "M"]
            .into_iter()
            .chain(shown.iter().map(|(name, _)| *name))
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    for s in summaries {
        let mut row = vec![s.method.name().to_string(), s.members.to_string()];
        row.extend(
            shown
                .iter()
                .map(|(_, cell)| cell(s).unwrap_or_else(|| "-".into())),
        );
        rows.push(row);
    }
    aligned_columns(&rows, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loren_nn::metrics::{CalibrationReport, TemperedReport};

    /// A value that rounds up to 1024 of its unit is written in the next: 1,048,575 bytes are
    /// 1023.999 KiB, which one decimal would make "1024.0 KiB".
    #[test]
    fn bytes_roll_over_to_the_next_unit_when_rounding_reaches_it() {
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(1_048_575), "1.0 MiB");
        assert_eq!(bytes(1_048_524), "1023.9 KiB");
        assert_eq!(bytes((1 << 30) - 1), "1.0 GiB");
        assert_eq!(bytes(u64::MAX), "16777216.0 TiB");
    }

    /// The legend names AUROC's OOD set where the summary has an AUROC column, and says paper
    /// ECE's binning only where a summary shows it.
    #[test]
    fn the_compare_legend_says_what_each_column_measures_once() {
        let report = distinct_report();
        let scored = Scored {
            seed: 3,
            val_ece: None,
            report: &report,
        };
        let mut summary = summarise(Method::Lora, 2, &[scored]);
        assert_eq!(compare_legend(&[]).lines().count(), 1);
        let legend = compare_legend(std::slice::from_ref(&summary));
        assert!(legend.contains("ECE@T, ECE at T: the same"), "{legend}");
        assert!(
            legend.contains("paper ECE: as the LoRA-Ensemble paper's code"),
            "{legend}"
        );
        assert!(!legend.contains("AUROC"), "{legend}");
        summary.ood_auroc_entropy = Some(MeanSd {
            mean: 0.9,
            sd: Some(0.0),
        });
        let legend = compare_legend(&[summary]);
        assert!(
            legend.contains(
                "AUROC (entropy): predictive entropy separating the test images from the \
                 built-in OOD set (every test image inverted, as many noise images,"
            ),
            "{legend}"
        );
    }

    /// The schedule is said as it ran: a run shorter than its warm-up never decayed, and its
    /// rate rose only part of the way.
    #[test]
    fn the_settings_line_says_the_schedule_as_it_ran() {
        let t = TrainConfig {
            warmup_steps: 50,
            min_lr: 1e-5,
            epochs: 2,
            ..TrainConfig::plain(32, 1e-3, Activations::Keep)
        };
        let ens = EnsembleConfig {
            method: Method::Single,
            members: 1,
            classes: 10,
            lora: Default::default(),
            drop_key: 0.0,
        };
        let whole = settings_line(&t, &ens, 500);
        assert!(
            whole.contains("lr 1e-3, 50 warmup steps, cosine to 1e-5;"),
            "{whole}"
        );
        let short = settings_line(&t, &ens, 34);
        let says = "lr 1e-3, 50 warmup steps, the run's 34 all warm-up (the rate rising to 100% \
                    of it at the last, no decay);";
        assert!(short.contains(says), "{short}");
        assert!(!short.contains("cosine"), "{short}");
        // From zero, the last step is at 33/34 of the peak.
        let from_zero = TrainConfig {
            warmup_from_zero: true,
            ..t.clone()
        };
        let short = settings_line(&from_zero, &ens, 34);
        assert!(short.contains("rising to 97% of it at the last"), "{short}");
        // A warm-up as long as the run is all of it too.
        let exact = settings_line(&t, &ens, 50);
        assert!(exact.contains("the run's 50 all warm-up"), "{exact}");
        // Members of their own weights are clipped as one; MC Dropout's passes are one network.
        let t = TrainConfig {
            grad_clip: Some(1.0),
            ..t
        };
        let alone = settings_line(&t, &ens, 500);
        assert!(alone.contains("clipped at norm 1;"), "{alone}");
        for (method, said) in [
            (Method::Lora, "clipped at norm 1 (the 8 members' as one);"),
            (
                Method::Explicit,
                "clipped at norm 1 (the 8 members' as one);",
            ),
            (Method::McDropout, "clipped at norm 1;"),
        ] {
            let ens = EnsembleConfig {
                method,
                members: 8,
                ..ens.clone()
            };
            let line = settings_line(&t, &ens, 500);
            assert!(line.contains(said), "{method}: {line}");
        }
    }

    /// Steps skipped in any epoch are summed into the report's line; none, no line.
    #[test]
    fn steps_skipped_for_their_gradients_are_said_in_the_report() {
        let epoch = |epoch, skipped_steps| loren_nn::train::EpochInfo {
            epoch,
            mean_loss: 1.0,
            seconds: 1.0,
            val: None,
            skipped_steps,
        };
        let mut summary = TrainSummary {
            epochs: vec![epoch(1, 0), epoch(2, 0)],
            steps: 34,
            seconds: 1.0,
            images_per_second: 1.0,
            validation_seconds: 0.0,
        };
        assert_eq!(skipped_line(&summary), "");
        summary.epochs = vec![epoch(1, 2), epoch(2, 17)];
        assert_eq!(
            skipped_line(&summary),
            "  skipped: 19 of the run's 34 steps left the parameters as they were, their \
             gradients not finite (a diverging run)\n"
        );
    }

    /// A report whose every figure is a different number.
    fn distinct_report() -> EvalReport {
        let test = CalibrationReport {
            samples: 359,
            members: 2,
            classes: 10,
            accuracy: 0.9111,
            mean_confidence: 0.8222,
            ece: 0.0333,
            adaptive_ece: 0.0444,
            ece_paper: 0.0555,
            nll: 0.3666,
            brier: 0.1777,
            member_accuracy: vec![0.8888, 0.8666],
            mean_member_accuracy: 0.8777,
            disagreement: 0.0999,
            predictive_entropy: 0.5111,
            expected_entropy: 0.4222,
            mutual_information: 0.0889,
            bins: Vec::new(),
        };
        let tempered = TemperedReport {
            temperature: 1.234,
            at_bound: false,
            ece: 0.0123,
            adaptive_ece: 0.0234,
            nll: 0.3456,
            brier: 0.1567,
        };
        EvalReport {
            method: "lora".into(),
            members: 2,
            test,
            by_size: Vec::new(),
            tempered: Some(tempered),
            shift: Vec::new(),
            ood: None,
            ood_sets: Vec::new(),
            predictions: Vec::new(),
        }
    }

    /// Every ensemble method run at two sizes or more gets its line (MC Dropout's too), in the
    /// order the methods ran; a method run at one size, or a single network, gets none.
    #[test]
    fn each_method_run_at_several_sizes_gets_a_growth_line() {
        let run = |method, members: usize, per: usize| RunSize {
            method,
            members,
            trainable_params: 1000 + per * members,
            peak: 1 << 20,
        };
        let lines = growth_lines(&[
            run(Method::McDropout, 1, 650),
            run(Method::Lora, 1, 17_034),
            run(Method::McDropout, 3, 650),
            run(Method::Lora, 3, 17_034),
            run(Method::Explicit, 2, 136_138),
            run(Method::Single, 1, 0),
        ]);
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("mc-dropout") && lines[0].contains("adds 650 "));
        assert!(lines[1].starts_with("lora") && lines[1].contains("adds 17,034 "));
        assert!(
            lines.iter().all(|l| l.ends_with("(M=1 to M=3)")),
            "{lines:?}"
        );
    }

    /// Every figure line shows its own field: each figure here is a different number.
    #[test]
    fn the_printed_report_shows_each_figure_in_its_place() {
        let report = distinct_report();
        let printed = calibration_report("LoRA-Ensemble", "digits", &report);
        for line in [
            "  accuracy               91.11%",
            "  ECE (15 bins)          0.0333",
            "  adaptive ECE           0.0444",
            "  NLL                    0.3666",
            "  Brier                  0.1777   (sum over classes, mean over samples)",
            "  member accuracy        87.77%   (min 86.66%, max 88.88%)",
            "  disagreement           0.0999",
            "  predictive entropy     0.5111   mutual information 0.0889",
            "  temperature-scaled   ECE 0.0123, NLL 0.3456, Brier 0.1567   (T = 1.234, fitted on \
             validation)",
        ] {
            assert!(
                printed.lines().any(|l| l == line),
                "no line {line:?} in\n{printed}"
            );
        }
    }

    /// One member's mutual-information line says it scores nothing; an ensemble's says nothing
    /// more.
    #[test]
    fn one_members_mutual_information_is_said_to_score_nothing() {
        use loren_nn::metrics::{DetectionMetrics, OodReport};
        let d = DetectionMetrics {
            auroc: 0.5,
            aupr: 0.6667,
            fpr95: 1.0,
        };
        let ood = OodReport {
            in_samples: 359,
            ood_samples: 718,
            max_prob: d.clone(),
            entropy: d.clone(),
            mutual_information: d,
        };
        let said = "(one member: 0 for every image, no score)";
        for (members, noted) in [(1, true), (2, false)] {
            let report = EvalReport {
                members,
                ood: Some(ood.clone()),
                ..distinct_report()
            };
            let printed = calibration_report("single", "digits", &report);
            let line = printed
                .lines()
                .find(|l| l.contains("mutual info "))
                .unwrap();
            assert_eq!(line.ends_with(said), noted, "{line}");
            assert_eq!(printed.matches(said).count(), noted as usize, "{printed}");
        }
    }

    /// Each summary column is the mean over the seeds of its own figure: the shifted sets' mean
    /// accuracy, ECE and ECE at the fitted temperature, and the OOD AUROC by entropy, as well as
    /// the test figures.
    #[test]
    fn each_seed_summary_column_averages_its_own_figure() {
        use loren_nn::metrics::{DetectionMetrics, OodReport, ShiftRow};
        let row = |severity, accuracy, ece, ece_tempered| ShiftRow {
            kind: "rotation".into(),
            severity,
            accuracy,
            ece,
            ece_tempered: Some(ece_tempered),
        };
        let detection = |auroc| DetectionMetrics {
            auroc,
            aupr: auroc / 2.0,
            fpr95: auroc / 3.0,
        };
        // Two runs, each figure of the second 0.01 above the first's.
        let reports: Vec<EvalReport> = [0.0, 0.01]
            .into_iter()
            .map(|d| {
                let mut r = distinct_report();
                r.test.accuracy += d;
                r.test.ece += d;
                r.test.ece_paper += d;
                r.test.nll += d;
                r.test.brier += d;
                r.tempered.as_mut().unwrap().ece += d;
                r.shift = vec![
                    row(1, 0.61 + d, 0.071 + d, 0.031 + d),
                    row(2, 0.52 + d, 0.092 + d, 0.042 + d),
                ];
                r.ood = Some(OodReport {
                    in_samples: 10,
                    ood_samples: 20,
                    max_prob: detection(0.71 + d),
                    entropy: detection(0.83 + d),
                    mutual_information: detection(0.64 + d),
                });
                r
            })
            .collect();
        let runs: Vec<Scored> = reports
            .iter()
            .zip([(4, 0.0211), (7, 0.0311)])
            .map(|(report, (seed, val_ece))| Scored {
                seed,
                val_ece: Some(val_ece),
                report,
            })
            .collect();
        let s = summarise(Method::Lora, 2, &runs);
        assert_eq!(s.seeds, [4, 7]);
        let mean = |m: Option<MeanSd>| m.map(|m| (m.mean * 1e6).round() / 1e6);
        for (column, got, want) in [
            ("accuracy", Some(s.accuracy), 0.9111 + 0.005),
            ("ece", Some(s.ece), 0.0333 + 0.005),
            ("ece_paper", Some(s.ece_paper), 0.0555 + 0.005),
            ("nll", Some(s.nll), 0.3666 + 0.005),
            ("brier", Some(s.brier), 0.1777 + 0.005),
            ("ece_tempered", s.ece_tempered, 0.0123 + 0.005),
            ("val_ece", s.val_ece, 0.0261),
            ("shift_accuracy", s.shift_accuracy, 0.565 + 0.005),
            ("shift_ece", s.shift_ece, 0.0815 + 0.005),
            ("shift_ece_tempered", s.shift_ece_tempered, 0.0365 + 0.005),
            ("ood_auroc_entropy", s.ood_auroc_entropy, 0.83 + 0.005),
        ] {
            assert_eq!(mean(got), Some((want * 1e6_f64).round() / 1e6), "{column}");
        }
        // A figure one run lacks is no figure: a mean over some seeds would read as over all.
        let mut partial = reports[1].clone();
        partial.shift[0].ece_tempered = None;
        let runs = [
            Scored {
                seed: 4,
                val_ece: None,
                report: &reports[0],
            },
            Scored {
                seed: 7,
                val_ece: Some(0.0311),
                report: &partial,
            },
        ];
        let s = summarise(Method::Lora, 2, &runs);
        assert!(s.shift_ece_tempered.is_none() && s.val_ece.is_none());
        assert!(s.shift_ece.is_some());
    }

    #[test]
    fn columns_align_names_left_and_numbers_right() {
        let rows = vec![
            vec!["method".to_string(), "ms".to_string()],
            vec!["lora".to_string(), "12.5".to_string()],
        ];
        assert_eq!(aligned_columns(&rows, 1), "method    ms\nlora    12.5\n");
    }

    #[test]
    fn the_comparison_headers_bars_line_up() {
        let t = comparison_table(&[]);
        let bars = |line: &str| -> Vec<usize> {
            line.char_indices()
                .filter(|&(_, c)| c == '|')
                .map(|(i, _)| i)
                .collect()
        };
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(bars(lines[0]), bars(lines[1]), "\n{t}");
    }

    #[test]
    fn mean_and_sample_standard_deviation() {
        let m = MeanSd::of(&[98.61, 98.33, 98.61, 98.33]);
        assert!((m.mean - 98.47).abs() < 1e-12);
        // Divided by n - 1: 0.14 would be the population's.
        assert!((m.sd.unwrap() - (4.0 * 0.14f64.powi(2) / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(m.cell(1.0, 2), "98.47 ± 0.16");
        let one = MeanSd::of(&[0.25]);
        assert_eq!(
            one,
            MeanSd {
                mean: 0.25,
                sd: None
            }
        );
        assert_eq!(one.cell(100.0, 2), "25.00");
    }

    #[test]
    fn split_names_read_as_phrases() {
        assert_eq!(split_phrase("digits/test"), "the digits test split");
        assert_eq!(split_phrase("cifar100/test"), "the cifar100 test split");
        assert_eq!(split_phrase("photos"), "photos");
    }

    #[test]
    fn units_and_separators() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(12), "12");
        assert_eq!(count(123), "123");
        assert_eq!(count(1000), "1,000");
    }
}
