//! `loren memprofile`: memory per ensemble size, measured by tag beside the analytic model.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use super::args::{configs, memory_budget, methods, text_path};

use super::{Measured, measure_into};

use loren::memprofile::{MemprofileOptions, MemprofileReport, plan_memprofile, table, write};

#[derive(Args, Clone)]
pub struct MemprofileArgs {
    /// Where to run: auto (a GPU when one can be used, else the CPU), cpu, cuda (GPU 0; gpu
    /// says the same) or cuda:N (GPU N, from 0).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Model configs, comma-separated: tiny, vit-b-32, vit-b-16. Default: tiny,vit-b-32 on the
    /// CPU; vit-b-32,vit-b-16 on a GPU.
    #[arg(long, value_delimiter = ',')]
    pub config: Vec<String>,
    /// Methods, comma-separated: lora, explicit (single, single-lora and mc-dropout also work).
    #[arg(long, value_delimiter = ',', default_value = "lora,explicit")]
    pub methods: Vec<String>,
    /// Ensemble sizes, comma-separated: every one gets the analytic prediction.
    #[arg(
        long,
        short = 'm',
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32"
    )]
    pub members: Vec<usize>,
    /// The sizes to measure too, comma-separated, each one of --members. Default: all of them,
    /// except on the CPU for ViT-B configs, where only M <= 2 (seconds per member-step on a CPU).
    #[arg(long, value_delimiter = ',')]
    pub measure: Vec<usize>,
    /// Images per training step (every member sees the same batch).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// LoRA rank r.
    #[arg(long, short = 'r', default_value_t = 8)]
    pub rank: usize,
    /// Classes of the members' heads.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Training steps before the measured one. Default: 1, except 0 for ViT-B on the CPU (its
    /// accounting is deterministic: every step has the same peaks, and a step takes seconds).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Only the analytic prediction: measure nothing.
    #[arg(long, conflicts_with = "measure")]
    pub predict_only: bool,
    /// The memory a measured configuration may use (e.g. 16GiB = 16·2^30 bytes, or 16GB =
    /// 16·10^9): default, the device's free memory. Sizes predicted not to fit are reported as
    /// OOM and not run.
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Seeds the random weights and batch of the measured steps.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Output folder for memprofile.json, memprofile.svg and memprofile.md (the table with where
    /// and when it ran). Default: runs/memprofile, or runs/memprofile-2, runs/memprofile-3, ...
    /// when it holds an earlier run; a folder named here is used as it is, replacing an earlier
    /// run's files.
    #[arg(long, value_parser = text_path, default_value = "runs/memprofile")]
    pub out: PathBuf,
    /// Profile every method with each block's activations recomputed in the backward (as
    /// `loren train --recompute`) instead of kept.
    #[arg(long)]
    pub recompute: bool,
    /// No progress lines on stderr: only the table, with its notes, and the files written.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `loren memprofile`; `out_named`: whether --out was given (else the default folder moves on).
pub fn memprofile(a: &MemprofileArgs, out_named: bool) -> Result<()> {
    let opts = MemprofileOptions {
        device: a.device.parse()?,
        configs: configs(&a.config, "each config is profiled once")?,
        methods: methods(&a.methods, "each method is profiled once")?,
        members: a.members.clone(),
        measure: if a.predict_only {
            Some(Vec::new())
        } else {
            (!a.measure.is_empty()).then(|| a.measure.clone())
        },
        batch: a.batch_size,
        rank: a.rank,
        classes: a.classes,
        warmup: a.warmup,
        memory_budget: memory_budget(a.memory_budget.as_deref())?,
        seed: a.seed,
        activations: crate::cli::args::activations(a.recompute),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    // Refused before the output folder is chosen, and before anything is measured.
    let plan = plan_memprofile(&opts)?;
    let progress = |what: &str| loren::note!("memprofile: {what}");
    measure_into(&a.out, out_named, a.quiet, |p| plan.run(p), progress)
}

impl Measured for MemprofileReport {
    fn write(&self, dir: &Path) -> Result<[PathBuf; 3]> {
        write(self, dir)
    }
    fn table(&self) -> String {
        table(self)
    }
    fn statuses(&self) -> Vec<&str> {
        self.rows.iter().map(|r| r.status.as_str()).collect()
    }
}
