//! `loren pretrain`: the backbone fine-tuning starts from.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{Common, DataArgs, SeedArgs, splits, text_path};

use super::say;
use loren::backbone::{self, PretrainSpec};
use loren_nn::config::VitConfig;

// Common's help speaks of members and a report; pretrain trains one network and prints one line.
#[derive(Args, Clone)]
#[command(
    mut_arg("seed", |a| a.help("Seeds the backbone's random start, the data order and augmentation")),
    mut_arg("quiet", |a| a.help("No progress bars or epoch lines: print only the closing line (and warnings)")),
)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub seed: SeedArgs,
    /// Where to write the backbone (default: the repository's assets/backbone-tiny.safetensors).
    #[arg(long, value_parser = text_path)]
    pub out: Option<PathBuf>,
    /// Passes over the pretrain split (the bundled backbone had 300).
    #[arg(long, default_value_t = 300)]
    pub epochs: usize,
    /// Replace the file at --out when there is one (the default --out is the bundled backbone,
    /// which every run starts from and every checkpoint names by fingerprint).
    #[arg(long)]
    pub force: bool,
}

pub fn pretrain(a: &PretrainArgs) -> Result<()> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| backbone::default_path(&VitConfig::tiny()));
    // Before the epochs, not after them.
    if out.is_dir() {
        anyhow::bail!(
            "--out {} is a folder: name the backbone file to write (e.g. {})",
            out.display(),
            out.join("backbone.safetensors").display()
        );
    }
    if out.exists() && !a.force {
        match &a.out {
            None => anyhow::bail!(
                "{} is the bundled backbone, which runs start from and checkpoints name by \
                 fingerprint; pass --out FILE for a new one, or --force to replace it",
                out.display()
            ),
            Some(_) => anyhow::bail!(
                "--out {} exists; name another file, or pass --force to replace it",
                out.display()
            ),
        }
    }
    // --force is for backbones: a run's checkpoint, an export or a report is another
    // command's work, which a backbone in its place would leave its folder describing.
    let other = match loren::files::FileKind::at(&out) {
        _ if !out.exists() => None,
        loren::files::FileKind::Backbone => None,
        loren::files::FileKind::Checkpoint => Some("a training checkpoint"),
        loren::files::FileKind::Export => Some("an ensemble loren export wrote"),
        loren::files::FileKind::Other => Some("not a backbone"),
    };
    if let Some(what) = other {
        anyhow::bail!(
            "--out {} is {what}, which --force does not replace (it replaces a backbone); name \
             another file",
            out.display()
        );
    }
    loren::outputs::writable_file(&out, "--out")?;
    let data = splits(
        &DataArgs {
            data: None,
            holdout_classes: vec![],
            no_shift: true,
            no_ood: true,
            ood_data: vec![],
            eval_batch_size: 256,
            save_predictions: false,
            normalize: None,
            taken_from: None,
        },
        &VitConfig::tiny(),
        false,
        a.common.verbosity(),
    )?;
    let mut spec = PretrainSpec::bundled(out);
    spec.train.epochs = a.epochs;
    spec.seed = a.seed.seed;
    spec.train.seed = a.seed.seed;
    spec.device = a.common.device()?;
    let earlier = spec.out.exists();
    let r = backbone::pretrain(&spec, &data, a.common.verbosity()).with_context(|| {
        // The file is written whole at the end, or not at all.
        let out = spec.out.display();
        match earlier {
            true => format!("pretraining into {out} (which is as it was)"),
            false => format!("pretraining into {out} (which was not written)"),
        }
    })?;
    // Its own split always keeps the validation part.
    let val = r.val_accuracy.map_or_else(
        || "no validation part".to_string(),
        |acc| format!("validation accuracy {:.2}%", 100.0 * acc),
    );
    say(format_args!(
        "pretrained {} in {:.1}s: {val}; wrote {}\n",
        spec.vit.name,
        r.summary.seconds,
        r.path.display()
    ))?;
    Ok(())
}
