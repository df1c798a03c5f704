//! `loren export`: a trained ensemble as one self-contained safetensors file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::{checkpoint_arg, text_path};

use super::say;
use loren::ensemble::export as write_export;

use loren::outputs::writable_file;

#[derive(Args, Clone)]
pub struct ExportArgs {
    /// A checkpoint written by `loren train`, or the folder it is in.
    #[arg(long, value_parser = checkpoint_arg)]
    pub checkpoint: PathBuf,
    /// Where to write the ensemble (safetensors). An earlier export there is replaced; any other
    /// file (a training checkpoint, a backbone, a report) is refused.
    #[arg(long, value_parser = text_path)]
    pub out: PathBuf,
    /// The backbone the checkpoint was trained from (default: the path recorded in it).
    #[arg(long, value_parser = text_path)]
    pub backbone: Option<PathBuf>,
}

pub fn export(a: &ExportArgs) -> Result<()> {
    writable_file(&a.out, "--out")?;
    let s = write_export(&a.checkpoint, a.backbone.as_deref(), &a.out)?;
    say(format_args!(
        "wrote {}: {} ensemble of M={}, {} classes; {} tensors, {:.1} MB \
         (read it with loren::Ensemble::load)\n",
        s.path.display(),
        s.method,
        s.members,
        s.classes,
        s.tensors,
        s.bytes as f64 / 1e6
    ))?;
    Ok(())
}
