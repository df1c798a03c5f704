//! `loren compare`: the methods side by side on the same backbone, data, seed and budget.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::args::{
    Common, DataArgs, EnsembleArgs, ModelArgs, OptimArgs, SeedArgs, check_out_outside_data,
    f32_arg, first_repeated, methods, note_unused, out_dir, run_spec, splits, text_path,
    unused_flags, write_outputs,
};

use super::say;
use loren::backbone;
use loren::bench::budget_for;
use loren::curves::comparison_curves_svg;
use loren::outputs::remove_stale;
use loren::progress::Verbosity;
use loren::rates::{Diverged, choose_rates, rate_table};
use loren::report::{
    compare_legend, comparison_table, growth_per_member, rate, seed_summaries, seed_summary_table,
};
use loren::run::{REPORT_FILES, RUN_FILES, RunSpec, check_fits_within, run};
use loren_nn::checkpoint::write_atomic;
use loren_nn::config::{Method, VitConfig};
use loren_nn::data::Splits;

// The shared --method is train's: compare runs every one of --methods, so it is hidden here, and
// an empty default tells a given one (even `--method lora`) from none.
#[derive(Args, Clone)]
#[command(mut_arg("method", |a| a.hide(true).default_value("")))]
pub struct CompareArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub seed: SeedArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub ensemble: EnsembleArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Methods to compare, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single,single-lora,mc-dropout,explicit,lora"
    )]
    pub methods: Vec<String>,
    /// Ensemble sizes to run each ensemble method at, in place of -m/--members (not with it; e.g.
    /// 1,4,16): one row per size, then what each method adds per member, to see how parameters
    /// and memory grow with M.
    #[arg(long, value_delimiter = ',', conflicts_with = "members")]
    pub sizes: Vec<usize>,
    /// Seeds to train every run with, in place of --seed (not with it; e.g. 0,1,2,3): a table
    /// per seed, then each method's mean ± standard deviation over them (also written to
    /// DIR/summary.json). The data split is the same for every seed.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "seed",
        allow_negative_numbers = true
    )]
    pub seeds: Vec<u64>,
    /// A peak learning rate for some of the methods, over --lr and their defaults (e.g.
    /// explicit=1e-3,mc-dropout=2e-3): to compare each method at a rate tuned for it.
    #[arg(long, value_delimiter = ',', value_name = "METHOD=LR")]
    pub method_lr: Vec<String>,
    /// Peak learning rates to try every method at (e.g. 3e-4,1e-3,3e-3), in place of --lr and
    /// --method-lr: each method trains at each rate, and the comparison shows it at the one its
    /// validation NLL picks: the lowest, then the next while that one is lower at every seed
    /// (--seeds). A rate whose loss stops being a number is recorded as diverged, below any
    /// that did not. The choice is printed first and written to DIR/rates.json; compare.json
    /// keeps every run that finished.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        value_parser = f32_arg,
        conflicts_with_all = ["lr", "method_lr"]
    )]
    pub lrs: Vec<f32>,
    /// Output folder. Default: runs/compare, or runs/compare-2, runs/compare-3, ... when it holds
    /// an earlier comparison, so that none takes another's place; a folder named here is used as
    /// it is: the methods run again replace their reports in it, and the others stay.
    #[arg(long, value_parser = text_path, default_value = "runs/compare")]
    pub out: PathBuf,
}

/// One run of the comparison: a method at an ensemble size and a seed, settled before any
/// trains.
struct Planned {
    method: Method,
    members: usize,
    spec: RunSpec,
    /// Where its report goes.
    dir: PathBuf,
}

/// `loren compare`; `out_named`: whether --out was given (else the default folder moves on).
/// `loren compare`; `given` holds the command line's own flags.
pub fn compare(a: &CompareArgs, given: Option<&clap::ArgMatches>) -> Result<()> {
    let is_given = |id: &str| {
        given.is_some_and(|m| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    };
    let out_named = is_given("out");
    // Everything that can be refused is, before the data is read and the first method trains.
    if !a.ensemble.method.is_empty() {
        bail!(
            "--method {}: compare takes --methods (e.g. --methods {0})",
            a.ensemble.method
        );
    }
    let methods = methods(&a.methods, "each method is one run, into its own folder")?;
    let rates = method_rates(&a.method_lr, &methods)?;
    check_lrs(&a.lrs, a.optim.train_on_val)?;
    check_sizes(&a.sizes)?;
    if let Some(twice) = first_repeated(&a.seeds) {
        bail!("--seeds names {twice} twice: each seed is one run per method, into its own folder");
    }
    a.optim.check()?;
    a.ensemble.check()?;
    a.data.check()?;
    if a.common.verbosity() == Verbosity::Normal {
        let mut unused = unused_flags(&methods, &a.optim, &is_given);
        if methods.iter().all(|m| m.is_single()) && !a.sizes.is_empty() {
            unused.push("--sizes (each method is one network)".to_string());
        }
        note_unused(&unused, "comparison");
    }
    // Before any folder is made for it, default or named.
    check_out_outside_data(&a.out, &a.data)?;
    let mut out = out_dir(&a.out, out_named, a.common.verbosity() == Verbosity::Quiet)?;
    let a = &CompareArgs {
        out: out.path.clone(),
        ..a.clone()
    };
    loren::outputs::writable_dir(&a.out, "--out")?;
    let mut vit = VitConfig::by_name(&a.model.config)?;
    let data = splits(&a.data, &vit, a.optim.train_on_val, a.common.verbosity())?;
    out.hold()?;
    if !a.lrs.is_empty() && data.val.is_none() {
        bail!("--lrs chooses on the validation part, and this data has none");
    }
    let plan = plan(a, &methods, &rates, &data)?;
    check_all_fit(&plan, &data)?;
    let backbone = backbone::resolve(
        a.model.backbone.as_deref(),
        &mut vit,
        &data,
        a.common.verbosity(),
    )?;
    out.say_where();
    if a.common.verbosity() == Verbosity::Normal {
        note_earlier_reports(&a.out, &plan);
    }
    let mut results = Vec::new();
    let (runs, mut finished) = (plan.len(), Vec::new());
    // In a rate sweep, a rate too high is an outcome: the rule ranks it below the rest.
    let (sweep, mut diverged) = (!a.lrs.is_empty(), Vec::new());
    for Planned {
        method,
        members: m,
        mut spec,
        dir,
    } in plan
    {
        spec.vit = vit.clone();
        let (seed, lr) = (spec.train.seed, rate(spec.train.lr));
        let r = match run(&spec, &data, &backbone) {
            Ok(r) => Some(r),
            Err(e) => match diverged_at(&e).filter(|_| sweep) {
                Some(why) => {
                    if a.common.verbosity() == Verbosity::Normal {
                        loren::note!(
                            "note: {method} (M={m}) at lr {lr}, seed {seed}: {why}; the sweep \
                             counts it worse than any rate that did not diverge"
                        );
                    }
                    None
                }
                None => {
                    note_stopped(&finished, diverged.len(), runs);
                    let what = format!("method {method} (M={m}), seed {seed}, lr {lr}");
                    return Err(e.context(what));
                }
            },
        };
        // An earlier comparison's summaries stop describing the folder once one of its runs is
        // replaced: they go with the first (a run stopped after it leaves no summary that
        // disagrees with the runs beside it).
        if finished.is_empty() && diverged.is_empty() {
            SUMMARIES
                .iter()
                .try_for_each(|f| remove_stale(&a.out.join(f)))?;
        }
        let Some(mut r) = r else {
            // An earlier run's files in its folder would stand for it: they go.
            RUN_FILES[..REPORT_FILES]
                .iter()
                .try_for_each(|f| remove_stale(&dir.join(f)))?;
            diverged.push(Diverged {
                method,
                members: m,
                seed,
                lr: spec.train.lr,
            });
            continue;
        };
        write_outputs(&dir, &r, &data.test)?;
        finished.push(dir);
        // Written with the run; the comparison needs only the report.
        r.report.predictions = Vec::new();
        results.push(r);
    }
    // Chosen before anything is written: a sweep refused writes no summary.
    let choices = match sweep {
        true => choose_rates(&results, &diverged).inspect_err(|_| {
            note_stopped(&finished, diverged.len(), runs);
        })?,
        false => Vec::new(),
    };
    // Written before the tables are printed: a reader that stops early (| head) loses nothing.
    let json = a.out.join("compare.json");
    write_atomic(&json, serde_json::to_string_pretty(&results)?.as_bytes())?;
    let mut written = vec![json];
    let rates_json = a.out.join("rates.json");
    if sweep {
        write_atomic(
            &rates_json,
            serde_json::to_string_pretty(&choices)?.as_bytes(),
        )?;
        written.push(rates_json);
        // From here on, each method at the rate picked for it.
        results.retain(|r| {
            choices.iter().any(|c| {
                (c.method, c.members, c.picked()) == (r.method, r.members, r.settings.train.lr)
            })
        });
    } else {
        remove_stale(&rates_json)?;
    }
    let curves = a.out.join("curves.svg");
    write_atomic(&curves, comparison_curves_svg(&results).as_bytes())?;
    written.push(curves);
    if !choices.is_empty() {
        say(format_args!("{}\n", rate_table(&choices)))?;
    }
    let summary = a.out.join("summary.json");
    if !a.seeds.is_empty() {
        let summaries = seed_summaries(&results);
        write_atomic(
            &summary,
            serde_json::to_string_pretty(&summaries)?.as_bytes(),
        )?;
        written.push(summary);
        for &seed in &a.seeds {
            let runs: Vec<_> = results.iter().filter(|r| r.seed == seed).cloned().collect();
            say(format_args!("seed {seed}\n{}\n", comparison_table(&runs)))?;
        }
        let n = a.seeds.len();
        say(format_args!(
            "over {n} seed{}\n{}{}",
            match n {
                1 => ": its figures (a standard deviation needs two or more --seeds)",
                _ => "s: mean ± standard deviation",
            },
            seed_summary_table(&summaries),
            compare_legend(&summaries)
        ))?;
    } else {
        remove_stale(&summary)?;
        say(format_args!(
            "{}{}",
            comparison_table(&results),
            compare_legend(&[])
        ))?;
    }
    say(format_args!("{}", growth_per_member(&results)))?;
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    let per_run = match a.data.save_predictions {
        true => "report.json, reliability.svg, training.svg and predictions.safetensors",
        false => "report.json, reliability.svg and training.svg",
    };
    say(format_args!(
        "wrote {} and a {per_run} per run under {}\n",
        names.join(", "),
        a.out.display()
    ))?;
    Ok(())
}

/// Every run, in order (seed by seed, each seed's methods in order), each one's settings
/// validated.
fn plan(
    a: &CompareArgs,
    methods: &[Method],
    rates: &[(Method, f32)],
    data: &Splits,
) -> Result<Vec<Planned>> {
    let sizes = if a.sizes.is_empty() {
        vec![a.ensemble.members()]
    } else {
        a.sizes.clone()
    };
    let seeds = if a.seeds.is_empty() {
        vec![a.seed.seed]
    } else {
        a.seeds.clone()
    };
    let lrs: Vec<Option<f32>> = if a.lrs.is_empty() {
        vec![None]
    } else {
        a.lrs.iter().copied().map(Some).collect()
    };
    let mut plan = Vec::new();
    for &seed in &seeds {
        for &method in methods {
            let members: &[usize] = if method.is_single() { &[1] } else { &sizes };
            for (&m, lr) in members
                .iter()
                .flat_map(|m| lrs.iter().map(move |lr| (m, lr)))
            {
                let ensemble = EnsembleArgs {
                    members: Some(m),
                    ..a.ensemble.clone()
                };
                let optim = OptimArgs {
                    lr: lr.or_else(|| {
                        rates
                            .iter()
                            .find(|r| r.0 == method)
                            .map(|r| r.1)
                            .or(a.optim.lr)
                    }),
                    ..a.optim.clone()
                };
                let spec = run_spec(
                    &a.common,
                    seed,
                    &a.model,
                    &ensemble,
                    &optim,
                    &a.data,
                    method,
                    data.train.classes,
                    None,
                )
                .with_context(|| {
                    let at = match lr {
                        Some(lr) => format!(" at --lrs {}", rate(*lr)),
                        None if rates.iter().any(|r| r.0 == method) => {
                            " at its --method-lr rate".to_string()
                        }
                        None => String::new(),
                    };
                    format!("method {method}{at}")
                })?;
                let mut dir = method.name().to_string();
                if a.sizes.len() > 1 && !method.is_single() {
                    dir += &format!("-M{m}");
                }
                if let (Some(lr), true) = (lr, lrs.len() > 1) {
                    dir += &format!("-lr{}", rate(*lr));
                }
                if seeds.len() > 1 {
                    dir += &format!("-s{seed}");
                }
                plan.push(Planned {
                    method,
                    members: m,
                    spec,
                    dir: a.out.join(dir),
                });
            }
        }
    }
    Ok(plan)
}

/// Rates to choose among: each positive and finite, once, and a validation part to choose by.
fn check_lrs(lrs: &[f32], train_on_val: bool) -> Result<()> {
    if let Some(bad) = lrs.iter().find(|lr| !(lr.is_finite() && **lr > 0.0)) {
        bail!("--lrs {bad}: a learning rate must be positive and finite");
    }
    if let Some(twice) = first_repeated(lrs) {
        bail!("--lrs names {} twice", rate(*twice));
    }
    if !lrs.is_empty() && train_on_val {
        bail!(
            "--lrs chooses each method's rate on the validation part, which --train-on-val \
             trains on"
        );
    }
    Ok(())
}

/// Each size once, and at least one member: every size is one run, into its own folder.
fn check_sizes(sizes: &[usize]) -> Result<()> {
    if sizes.contains(&0) {
        bail!("--sizes: an ensemble has at least 1 member");
    }
    if let Some(twice) = first_repeated(sizes) {
        bail!("--sizes names {twice} twice: each size is one run, into its own folder");
    }
    Ok(())
}

/// `--method-lr`'s METHOD=LR entries: each of a method being compared, at most once.
fn method_rates(entries: &[String], methods: &[Method]) -> Result<Vec<(Method, f32)>> {
    let mut rates = Vec::new();
    for entry in entries {
        let Some((name, lr)) = entry.split_once('=') else {
            bail!("--method-lr {entry}: expected METHOD=LR, e.g. explicit=1e-3");
        };
        let method: Method = name
            .trim()
            .parse()
            .with_context(|| format!("--method-lr {entry}"))?;
        if !methods.contains(&method) {
            bail!("--method-lr {entry}: {method} is not among --methods");
        }
        let lr = f32_arg(lr).map_err(|e| anyhow::anyhow!("--method-lr {entry}: {e}"))?;
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--method-lr {entry}: a learning rate must be positive and finite");
        }
        rates.push((method, lr));
    }
    let named: Vec<Method> = rates.iter().map(|r| r.0).collect();
    if let Some(twice) = first_repeated(&named) {
        bail!("--method-lr gives {} two rates", twice.name());
    }
    Ok(rates)
}

/// What a run of a sweep that diverged says of it ("the loss is NaN at step 4"), or None for
/// any other failure.
fn diverged_at(e: &anyhow::Error) -> Option<String> {
    match e.downcast_ref::<loren_nn::NnError>()? {
        loren_nn::NnError::NonFinite { step, loss, .. } => {
            Some(format!("the loss is {loss} at step {}", step + 1))
        }
        loren_nn::NnError::Diverged {
            epoch, step, what, ..
        } => Some(format!("after epoch {epoch} (step {step}), {what}")),
        // Scored once trained: the weights it ended with.
        e @ loren_nn::NnError::NotANumber { .. } => Some(format!("once trained, {e}")),
        _ => None,
    }
}

/// What a comparison writes beside its runs' folders, each file describing all of them.
const SUMMARIES: [&str; 4] = ["compare.json", "rates.json", "curves.svg", "summary.json"];

/// Where a comparison that stopped before its summaries left the runs it finished (and how many
/// it had found to diverge, which wrote nothing): said under -q too, as the error it comes with.
fn note_stopped(finished: &[PathBuf], diverged: usize, runs: usize) {
    if finished.is_empty() && diverged == 0 {
        return;
    }
    let dirs: Vec<String> = finished.iter().map(|d| d.display().to_string()).collect();
    let mut done = Vec::new();
    if !dirs.is_empty() {
        done.push(format!(
            "{} written to its folder, {}",
            dirs.len(),
            dirs.join(", ")
        ));
    }
    if diverged > 0 {
        done.push(format!("{diverged} that diverged"));
    }
    loren::note!(
        "note: the comparison stopped after {} of its {runs} runs ({}); it wrote no {}",
        finished.len() + diverged,
        done.join("; "),
        SUMMARIES.join(", ")
    );
}

/// Reports an earlier comparison left in `out` that this one does not rerun stay as they were;
/// say so, so that the folder is not read as one comparison.
fn note_earlier_reports(out: &std::path::Path, plan: &[Planned]) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    let mut stale: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| d.join("report.json").is_file() && !plan.iter().any(|p| &p.dir == d))
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if stale.is_empty() {
        return;
    }
    stale.sort();
    loren::note!(
        "note: {} holds reports of an earlier comparison that this one does not rerun ({}); \
         they stay as they were (--out DIR starts a clean one)",
        out.display(),
        stale.join(", ")
    );
}

/// The memory check each run makes as it starts, made for all of them first: a size too large
/// fails now, not after the runs before it have trained.
fn check_all_fit(plan: &[Planned], data: &Splits) -> Result<()> {
    let Some(first) = plan.first() else {
        return Ok(());
    };
    let device = loren::open_device(first.spec.device)?;
    let Some(budget) = budget_for(&device, None) else {
        return Ok(());
    };
    plan.iter()
        .try_for_each(|p| check_fits_within(&p.spec, data, &device, &budget))
}
