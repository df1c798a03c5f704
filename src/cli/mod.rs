//! The `loren` command line: one module per command, and the argument groups they share.

mod args;
mod bench;
mod compare;
mod eval;
mod export;
mod memprofile;
mod predict;
mod pretrain;
mod train;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

const ABOUT: &str = "LoRA-Ensembles: calibrated uncertainty for Vision Transformers at a fraction of a deep ensemble's cost";

const LONG_ABOUT: &str = "\
LoRA-Ensembles: calibrated uncertainty for Vision Transformers at a fraction of a deep ensemble's cost.

M members share one frozen pretrained ViT. Each member trains only low-rank adapters (A_m, B_m) on
the attention projections q, k, v and o, plus its own classification head. The prediction is the
mean of the members' softmax probabilities; how the members disagree measures the uncertainty.

With no command, loren trains a LoRA-Ensemble on the bundled 8x8 digits and prints its
calibration report: `loren train` with its defaults (options go after `train`).

Examples:
  loren                                   train the default LoRA-Ensemble (M=8, rank 8)
  loren train --members 16 --rank 4       a larger ensemble of smaller adapters
  loren compare                           single, single-lora, mc-dropout, explicit and lora
                                          side by side
  loren compare --seeds 0,1,2,3           the same at four seeds, then each method's mean ± sd
  loren compare --lrs 3e-4,1e-3,3e-3 --seeds 0,1,2,3
                                          each method at the rate its validation NLL picks
  loren eval --checkpoint runs/train/checkpoint.safetensors
  loren eval --checkpoint DIR --ood-data cifar100:DIR
                                          OOD detection against another dataset too
  loren predict --model runs/train assets/examples
                                          each image's class, probability and uncertainty
                                          (--out FILE.csv or .json: every image, every member)
  loren pretrain --out FILE               pretrain a backbone like the bundled one (--force: replace it)
  loren train --config vit-b-32 --backbone vit_b_32.safetensors --data cifar100:DIR
                                          real weights and data (README: the paper's setup)
  loren bench --device cuda               step time, throughput and MFU, lora against explicit
                                          (--methods lora,mc-dropout,explicit: MC Dropout too)
  loren memprofile                        memory per ensemble size by tag, beside the analytic model
  loren memprofile --recompute --config vit-b-16
                                          the same with each block recomputed in the backward
                                          (--recompute on train too: less memory, more time)";

#[derive(Parser)]
#[command(name = "loren", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune an ensemble from the pretrained backbone, then print its calibration report.
    ///
    /// Writes DIR/report.json, DIR/reliability.svg, DIR/training.svg (learning curves) and
    /// DIR/checkpoint.safetensors (trainable weights, optimizer state and position, for --resume
    /// and eval).
    Train(train::TrainArgs),
    /// Evaluate a checkpoint written by `train`, or an ensemble written by `export`: calibration,
    /// shift and OOD detection.
    Eval(eval::EvalArgs),
    /// Train single, single-lora, mc-dropout, explicit and lora with the same backbone, data, seed
    /// and budget, and print them side by side (also written to DIR/compare.json).
    Compare(compare::CompareArgs),
    /// Pretrain the backbone (a single ViT trained from scratch on the pretrain split).
    Pretrain(pretrain::PretrainArgs),
    /// Write a trained ensemble as one self-contained safetensors file: shared weights once,
    /// stacked adapters and heads, the configs in its metadata (read it with loren::Ensemble).
    Export(export::ExportArgs),
    /// Predict images with a trained ensemble: each one's class, its probability, and the
    /// ensemble's uncertainty (entropy, mutual information, the members' votes).
    Predict(predict::PredictArgs),
    /// Time a training step and an inference pass per ensemble size: lora against explicit, and
    /// mc-dropout when asked.
    Bench(bench::BenchArgs),
    /// Memory per ensemble size by tag, measured beside the analytic model.
    Memprofile(memprofile::MemprofileArgs),
}

pub fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            // `loren --members 4`: the default run's options, given before any command.
            // args_os: a flag's value need not be text, and env::args panics on one that is not.
            let args: Vec<String> = std::env::args_os()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let no_command = args.first().is_some_and(|a| a.starts_with("--"));
            if e.kind() == clap::error::ErrorKind::UnknownArgument && no_command {
                let _ = e.print();
                loren::note!(
                    "tip: options go after a command: loren train {}",
                    args.join(" ")
                );
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let out_named = |command| {
        matches
            .subcommand_matches(command)
            .is_some_and(|m| m.value_source("out") == Some(clap::parser::ValueSource::CommandLine))
    };
    let result = match cli.command {
        None => train::train(&train::TrainArgs::parse_from(["train"]), None),
        Some(Command::Train(a)) => train::train(&a, matches.subcommand_matches("train")),
        Some(Command::Eval(a)) => eval::eval(&a),
        Some(Command::Compare(a)) => compare::compare(&a, matches.subcommand_matches("compare")),
        Some(Command::Predict(a)) => predict::predict(&a),
        Some(Command::Pretrain(a)) => pretrain::pretrain(&a),
        Some(Command::Export(a)) => export::export(&a),
        Some(Command::Bench(a)) => bench::bench(&a, out_named("bench")),
        Some(Command::Memprofile(a)) => memprofile::memprofile(&a, out_named("memprofile")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            loren::note!("error: {e:#}");
            let stopped = e.downcast_ref::<loren::interrupt::Stopped>().is_some();
            match e.downcast_ref::<loren_nn::NnError>() {
                // 128 + the signal, as a shell reports a command Ctrl-C or SIGTERM ended.
                Some(
                    loren_nn::NnError::Interrupted { .. }
                    | loren_nn::NnError::EvalInterrupted { .. },
                ) => ExitCode::from(loren::interrupt::exit_status()),
                _ if stopped => ExitCode::from(loren::interrupt::exit_status()),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Print to stdout. A failed write (a full disk behind `>`) is an error, not a panic. A closed
/// pipe (`loren | head`) ends loren quietly, as it ends other command-line tools, with SIGPIPE's
/// status: whatever a command writes to files is written before its report is printed.
fn say(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(128 + 13),
        r => r.context("writing to stdout"),
    }
}

/// What a measuring command (bench, memprofile) reports, for [`measure_into`].
trait Measured {
    /// Its JSON, SVG and Markdown files in `dir`.
    fn write(&self, dir: &std::path::Path) -> anyhow::Result<[std::path::PathBuf; 3]>;
    fn table(&self) -> String;
    /// Each row's status: ok, measured, oom, predicted, error or stopped.
    fn statuses(&self) -> Vec<&str>;
}

/// A measuring command's course once its flags are read: claim the output folder (`out`, or
/// the default's first free one), measure, write the files, print the table, and fail when a
/// row did. `progress` says what is about to be measured, unless `quiet`.
fn measure_into<R: Measured>(
    out: &std::path::Path,
    out_named: bool,
    quiet: bool,
    measure: impl FnOnce(&mut dyn FnMut(&str)) -> anyhow::Result<R>,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<()> {
    // Checked before the measuring it would otherwise follow.
    let mut out = args::out_dir(out, out_named, quiet)?;
    loren::outputs::writable_dir(&out.path, "--out")?;
    out.hold()?;
    out.say_where();
    // Ctrl-C stops the measuring between rows; what was measured is written and printed.
    let ctrl_c = loren::interrupt::Guard::install();
    let report = measure(&mut |what| {
        if !quiet {
            progress(what);
        }
    })?;
    drop(ctrl_c);
    // Written before the table is printed: a reader that stops early (| head) loses nothing.
    let [json, svg, md] = report.write(&out.path)?;
    say(format_args!("{}", report.table()))?;
    say(format_args!(
        "wrote {}, {} and {}\n",
        json.display(),
        svg.display(),
        md.display()
    ))?;
    if report.statuses().contains(&"stopped") {
        return Err(loren::interrupt::Stopped.into());
    }
    fail_on_errors(report.statuses().into_iter())
}

/// A measuring command whose rows failed (not for want of memory: that is a finding) has
/// written its files and printed them, and then exits with an error, so that a script notices.
fn fail_on_errors<'a>(statuses: impl Iterator<Item = &'a str>) -> anyhow::Result<()> {
    let (mut failed, mut rows) = (0, 0);
    for s in statuses {
        rows += 1;
        failed += usize::from(s == "error");
    }
    match failed {
        0 => Ok(()),
        n => Err(anyhow::anyhow!(
            "{n} of {rows} rows failed; their errors are in the table above and in the JSON"
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_row_fails_the_command_and_an_oom_row_does_not() {
        assert!(super::fail_on_errors(["ok", "oom", "predicted"].into_iter()).is_ok());
        let e = super::fail_on_errors(["ok", "error", "oom", "error"].into_iter()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "2 of 4 rows failed; their errors are in the table above and in the JSON"
        );
    }
}
