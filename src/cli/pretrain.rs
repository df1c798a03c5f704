//! `loren pretrain`: the backbone fine-tuning starts from.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use loren::backbone::{self, PretrainSpec};
use loren_nn::config::VitConfig;

use super::args::{Common, DataArgs, splits};

#[derive(Args, Clone)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// Where to write the backbone (default: the repository's assets/backbone-tiny.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    pub epochs: usize,
}

pub fn pretrain(a: &PretrainArgs) -> Result<()> {
    let data = splits(
        &DataArgs {
            data: None,
            holdout_classes: vec![],
            no_shift: true,
            no_ood: true,
            eval_batch_size: 256,
        },
        &VitConfig::tiny(),
    )?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| backbone::default_path(&VitConfig::tiny()));
    let mut spec = PretrainSpec::bundled(out);
    spec.train.epochs = a.epochs;
    spec.seed = a.common.seed;
    spec.train.seed = a.common.seed;
    spec.device = a.common.device()?;
    let r = backbone::pretrain(&spec, &data, a.common.verbosity())?;
    println!(
        "pretrained {} in {:.1}s: validation accuracy {:.2}%; wrote {}",
        spec.vit.name,
        r.summary.seconds,
        100.0 * r.val_accuracy,
        r.path.display()
    );
    Ok(())
}
