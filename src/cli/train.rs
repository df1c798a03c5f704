//! `loren train` (and `loren` with no command).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser};

use super::say;
use loren::backbone;
use loren::report::{calibration_report, method_title, training_line};
use loren::run::run;
use loren_nn::config::{Method, VitConfig};

use super::args::{
    Common, DataArgs, EnsembleArgs, ModelArgs, OptimArgs, SeedArgs, checkpoint_arg, run_spec,
    splits, write_outputs,
};
use loren::outputs::writable_dir;

#[derive(Args, Clone)]
pub struct TrainArgs {
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
    /// Output folder.
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue from a checkpoint written by an earlier `train` with the same settings (the file,
    /// or the folder it is in).
    #[arg(long, value_parser = checkpoint_arg)]
    pub resume: Option<PathBuf>,
}

/// Lets a flattened argument group parse on its own, for the no-command default.
impl TrainArgs {
    pub fn parse_from<const N: usize>(args: [&str; N]) -> TrainArgs {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: TrainArgs,
        }
        Only::parse_from(args).args
    }
}

pub fn train(a: &TrainArgs) -> Result<()> {
    a.optim.check()?;
    a.ensemble.check()?;
    writable_dir(&a.out, "--out")?;
    let method: Method = a.ensemble.method.parse()?;
    if let (true, Some(m)) = (method.is_single(), a.ensemble.members)
        && m != 1
    {
        bail!(
            "--members {m}: {} is one network; leave --members out, or train an ensemble \
             (--method lora or explicit)",
            method.name()
        );
    }
    let data = splits(&a.data, &VitConfig::by_name(&a.model.config)?)?;
    let ckpt = a.out.join("checkpoint.safetensors");
    let mut spec = run_spec(
        &a.common,
        a.seed.seed,
        &a.model,
        &a.ensemble,
        &a.optim,
        &a.data,
        method,
        data.train.classes,
        Some(ckpt.clone()),
    )?;
    spec.resume = a.resume.clone();
    let backbone = backbone::resolve(
        a.model.backbone.as_deref(),
        &mut spec.vit,
        &data,
        spec.verbosity,
    )?;
    let result = run(&spec, &data, &backbone)?;
    // Written before the report is printed: a reader that stops early (| head) loses nothing.
    let written = write_outputs(&a.out, &result, &data.test.name)?;
    let title = method_title(result.method, result.members, result.rank);
    say(format_args!(
        "{}{}",
        calibration_report(&title, &data.test.name, &result.report),
        training_line(&result)
    ))?;
    say(format_args!(
        "wrote {}, {}, {}\n",
        written[0].display(),
        written[1].display(),
        ckpt.display()
    ))?;
    Ok(())
}
