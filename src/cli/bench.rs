//! `loren bench`: time a training step and an inference pass, LoRA-Ensemble against the
//! explicit ensemble, per config and ensemble size.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use super::args::{configs, memory_budget, methods, text_path};

use super::{Measured, measure_into};

use loren::bench::{BenchOptions, BenchReport, plan_bench, table, write};

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Where to run: auto (a GPU when one can be used, else the CPU), cpu, cuda (GPU 0; gpu
    /// says the same) or cuda:N (GPU N, from 0).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Model configs, comma-separated: tiny, vit-b-32, vit-b-16. Default: vit-b-32,vit-b-16 on a
    /// GPU; tiny on the CPU (ViT-B takes seconds per member-step there).
    #[arg(long, value_delimiter = ',')]
    pub config: Vec<String>,
    /// Methods to time, comma-separated: lora, explicit or mc-dropout (the ensembles; single
    /// and single-lora are one network).
    #[arg(long, value_delimiter = ',', default_value = "lora,explicit")]
    pub methods: Vec<String>,
    /// Ensemble sizes, comma-separated.
    #[arg(
        long,
        short = 'm',
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32"
    )]
    pub members: Vec<usize>,
    /// Images per training step and inference pass (every member sees the same batch).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// LoRA rank r.
    #[arg(long, short = 'r', default_value_t = 8)]
    pub rank: usize,
    /// Classes of the members' heads.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Untimed calls before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed calls per row: the median and spread are over these.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// The memory a configuration may use (e.g. 16GiB = 16·2^30 bytes, or 16GB = 16·10^9):
    /// default, the device's free memory (MemAvailable on the CPU). A configuration the analytic
    /// model says will not fit is reported as OOM without being run.
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Side of the square GEMM that measures the peak FLOP/s for MFU (an f32 GEMM through loren's
    /// matmul on the CPU, a bf16 cuBLAS GEMM on a GPU). Default: 2048 on the CPU, 8192 on a GPU;
    /// at most 8192 on the CPU, 32768 on a GPU, and its three buffers must fit in memory.
    #[arg(long)]
    pub peak_size: Option<usize>,
    /// Seeds the random weights and batch.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Output folder for bench.json, bench.svg and bench.md (the table with where and when it
    /// ran). Default: runs/bench, or runs/bench-2, runs/bench-3, ... when it holds an earlier
    /// run; a folder named here is used as it is, replacing an earlier run's files.
    #[arg(long, value_parser = text_path, default_value = "runs/bench")]
    pub out: PathBuf,
    /// Time every method with each block's activations recomputed in the backward (as
    /// `loren train --recompute`) instead of kept.
    #[arg(long)]
    pub recompute: bool,
    /// Also show where each training step's time goes, op by op: `repeats` more steps per row
    /// with a mark on the device's timeline after every op's forward and backward (CUDA events
    /// on a GPU, so idle gaps while the host launches show on the op after them).
    #[arg(long)]
    pub breakdown: bool,
    /// No progress lines on stderr: only the table, with its notes, and the files written.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `loren bench`; `out_named`: whether --out was given (else the default folder moves on).
pub fn bench(a: &BenchArgs, out_named: bool) -> Result<()> {
    let opts = BenchOptions {
        device: a.device.parse()?,
        configs: configs(&a.config, "each config is timed once")?,
        methods: methods(&a.methods, "each method is timed once")?,
        members: a.members.clone(),
        batch: a.batch_size,
        rank: a.rank,
        classes: a.classes,
        warmup: a.warmup,
        repeats: a.repeats,
        memory_budget: memory_budget(a.memory_budget.as_deref())?,
        peak_size: a.peak_size,
        seed: a.seed,
        activations: crate::cli::args::activations(a.recompute),
        breakdown: a.breakdown,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    // Refused before the output folder is chosen, and before anything is measured.
    let plan = plan_bench(&opts)?;
    let progress = |what: &str| loren::note!("bench: {what}");
    measure_into(&a.out, out_named, a.quiet, |p| plan.run(p), progress)
}

impl Measured for BenchReport {
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
