//! `loren bench`: the time of a training step and of an inference pass, LoRA-Ensemble against
//! the explicit ensemble, per model config and ensemble size, with counted FLOPs, utilisation
//! against a peak measured in the same run, and peak memory.
//!
//! Protocol, per (config, method, M): random weights and a random batch (no data needed); the
//! analytic memory model ([`loren_nn::memory_model`]) first, and a configuration that would not
//! fit is reported as OOM without allocating anything (on the CPU a failed allocation aborts the
//! process); then `warmup` untimed training steps, `repeats` timed ones, and the same for
//! [`Vit::predict`] on the batch. Before each timed step the batch's images are staged (copied
//! into the memory they go up from), as `loren train` stages each batch on the thread that makes
//! it; the step queues their copy to the device. Each sample is one call timed by [`time_on`]: CUDA events on
//! the stream around it on a GPU, the wall clock on the CPU. The median and the spread (min, max,
//! quartiles) are reported.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use loren_autograd::timing::{StepTimer, totals};
use loren_kernels::provenance::{git_commit, utc_now};
use loren_nn::checkpoint::write_atomic;
use loren_nn::config::{Activations, EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::Batch;
use loren_nn::memory_model::{self, Flops, Precision, StepModel};
use loren_nn::train::{TrainConfig, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::ops::gemm::{Trans, matmul, pool_threads};
use loren_tensor::ops::linear::linear_forward;
use loren_tensor::{DType, Device, DeviceKind, DeviceSpec, MemTag, Rng, Tensor};
use serde::Serialize;

use crate::plot::{Chart, Series, Units, palette, render};
use crate::report::{aligned_columns, bytes};
use crate::run::MemoryBreakdown;

// ---------------------------------------------------------------------------------------------
// Timing, peak throughput, memory budget: the device-specific hooks.

/// Seconds `f` takes on `device`, by [`Device::time`]: CUDA events around its work on a GPU,
/// the wall clock on the CPU. The one timer of the bench (and of memprofile's steps).
pub fn time_on<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let (out, s) = device.time(f)?;
    Ok((out?, s))
}

/// The peak the utilisation is measured against, measured in the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Peak {
    /// What was timed.
    pub what: String,
    /// The best rate seen, FLOP/s: the denominator of MFU.
    pub flops_per_s: f64,
    /// The median rate, FLOP/s.
    pub median_flops_per_s: f64,
    pub samples: usize,
}

/// Time a square `n`×`n`×`n` product on `device`: the best of `repeats` after one warm-up.
///
/// On the CPU it is an f32 GEMM through loren's own `matmul` (the `gemm` crate on the rayon
/// pool, as every CPU op uses it). On a GPU it is a bf16 cuBLAS GEMM with f32 accumulation: see
/// [`gpu_gemm_peak`]. This is the one place to change what MFU is measured against.
pub fn measure_peak(device: &Device, n: usize, repeats: usize) -> Result<Peak> {
    if n == 0 {
        return Err(anyhow!(
            "the peak GEMM size must be at least 1 (--peak-size)"
        ));
    }
    match device.kind() {
        DeviceKind::Cpu => {
            let mut rng = Rng::new(7);
            let a: Vec<f32> = (0..n * n).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n * n).map(|_| rng.normal()).collect();
            let mut c = vec![0.0f32; n * n];
            let flops = 2.0 * (n as f64).powi(3);
            let threads = pool_threads();
            let mut rates = Vec::new();
            for i in 0..=repeats.max(1) {
                let t0 = Instant::now();
                matmul(
                    &mut c,
                    &a,
                    Trans::N,
                    &b,
                    Trans::N,
                    n,
                    n,
                    n,
                    1.0,
                    false,
                    threads,
                );
                let s = t0.elapsed().as_secs_f64();
                if i > 0 {
                    rates.push(flops / s.max(1e-12));
                }
            }
            std::hint::black_box(&c);
            let t = Timing::new(rates.clone());
            Ok(Peak {
                what: format!(
                    "f32 GEMM {n}x{n}x{n} through loren_tensor's matmul on {threads} threads"
                ),
                flops_per_s: t.max,
                median_flops_per_s: t.median,
                samples: rates.len(),
            })
        }
        DeviceKind::Cuda(_) => gpu_gemm_peak(device, n, repeats),
    }
}

/// The GPU peak: a bf16 GEMM with f32 accumulation of `n`×`n`×`n` through loren-tensor's own
/// `linear_forward` on bf16 operands, which on a GPU is one cuBLAS `gemm_bf16` call. Each sample
/// times 10 products between two synchronisations, so launch and allocation gaps do not count;
/// the best of `repeats` samples after a warm-up.
pub fn gpu_gemm_peak(device: &Device, n: usize, repeats: usize) -> Result<Peak> {
    let mut rng = Rng::new(7);
    let mut operand = || -> Result<Tensor> {
        let data: Vec<f32> = (0..n * n).map(|_| rng.normal()).collect();
        Ok(Tensor::from_vec_as(
            data,
            [1, n, n],
            DType::BF16,
            MemTag::Workspace,
            device,
        )?)
    };
    let (x, w) = (operand()?, operand()?);
    const ITERS: usize = 10;
    let run = || -> Result<()> {
        for _ in 0..ITERS {
            drop(linear_forward(&x, &w, None, DType::BF16, None)?);
        }
        Ok(())
    };
    time_on(device, run)?;
    let flops = ITERS as f64 * 2.0 * (n as f64).powi(3);
    let mut rates = Vec::new();
    for _ in 0..repeats.max(1) {
        let ((), s) = time_on(device, run)?;
        rates.push(flops / s.max(1e-12));
    }
    let t = Timing::new(rates.clone());
    Ok(Peak {
        what: format!(
            "bf16 GEMM {n}x{n}x{n} (f32 accumulation) through loren_tensor's linear_forward \
             (cuBLAS) on {}, {ITERS} per sample",
            device.name()
        ),
        flops_per_s: t.max,
        median_flops_per_s: t.median,
        samples: rates.len(),
    })
}

/// What the device itself reports in use (cuMemGetInfo's total − free on a GPU, every process
/// and the context included); `None` on the CPU, where the figures are the accounted ones.
/// Freed memory stays with the process for reuse, so after a run that started from
/// [`Device::release_cached_memory`] this is its peak reserved memory, not what is live now.
pub fn device_memory_used(device: &Device) -> Option<u64> {
    device
        .mem_info()
        .map(|(free, total)| total.saturating_sub(free) as u64)
}

/// How much memory a configuration may use, and where the figure came from.
#[derive(Clone, Debug, Serialize)]
pub struct Budget {
    pub bytes: u64,
    pub source: String,
}

/// The memory this process can still take: `MemAvailable` from /proc/meminfo, capped by the
/// cgroup's `memory.max − memory.current` when one is set.
pub fn available_memory() -> Option<Budget> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let mut b = Budget {
        bytes: kib * 1024,
        source: "MemAvailable in /proc/meminfo".into(),
    };
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    if let (Some(max), Some(cur)) = (read("memory.max"), read("memory.current"))
        && max.saturating_sub(cur) < b.bytes
    {
        b = Budget {
            bytes: max.saturating_sub(cur),
            source: "the cgroup's memory.max − memory.current".into(),
        };
    }
    Some(b)
}

/// The budget: `--memory-budget` when given, else the CPU's available memory or the GPU's free
/// memory (cuMemGetInfo) now, counting what this process keeps for reuse as free.
pub fn budget_for(device: &Device, given: Option<u64>) -> Option<Budget> {
    match given {
        Some(bytes) => Some(Budget {
            bytes,
            source: "--memory-budget".into(),
        }),
        None if device.is_cpu() => available_memory(),
        None => {
            // Without the release the figure is only smaller: the check stays on the safe side.
            let _ = device.release_cached_memory();
            device.mem_info().map(|(free, _)| Budget {
                bytes: free as u64,
                source: format!("free memory on {} (cuMemGetInfo)", device.name()),
            })
        }
    }
}

/// What a CPU run needs beyond its accounted peak: freed buffers are pooled for reuse up to the
/// accounted peak (`loren_tensor::Device`), so the process may hold up to twice its peak, plus
/// untracked temporaries.
pub const CPU_RSS_FACTOR: f64 = 2.0;
pub const CPU_RSS_MARGIN: u64 = 256 << 20;

/// The bytes a configuration is predicted to need from the budget on `device`.
pub fn predicted_need(model: &StepModel, device: &Device) -> u64 {
    need_for_peak(
        model.train.total_peak.max(model.inference.total_peak),
        device,
    )
}

/// The bytes an accounted peak needs from the budget on `device`.
pub fn need_for_peak(peak: u64, device: &Device) -> u64 {
    if device.is_cpu() {
        (peak as f64 * CPU_RSS_FACTOR) as u64 + CPU_RSS_MARGIN
    } else {
        peak
    }
}

/// What an OOM note adds when recomputing the blocks would make the configuration fit:
/// ", fits with --recompute (predicted to need ...)", or nothing.
pub fn recompute_hint(
    vit: &VitConfig,
    ens: &EnsembleConfig,
    batch: usize,
    activations: Activations,
    device: &Device,
    budget: u64,
) -> String {
    if activations == Activations::Recompute {
        return String::new();
    }
    let need = memory_model::predict(
        vit,
        ens,
        batch,
        2,
        precision(device),
        Activations::Recompute,
    )
    .map(|model| predicted_need(&model, device));
    match need {
        Ok(need) if need <= budget => {
            format!(
                "; fits with --recompute (predicted to need {})",
                bytes(need)
            )
        }
        _ => String::new(),
    }
}

/// The element sizes the analytic model uses on `device`.
pub fn precision(device: &Device) -> Precision {
    if device.is_cpu() {
        Precision::CPU
    } else {
        Precision::GPU_BF16
    }
}

/// Parse "512MiB", "24GiB", "16GB", "1e9" or "1000000" as bytes: KiB, MiB, GiB and TiB are
/// binary (2^10, 2^20, ...), kB, MB, GB and TB decimal (10^3, 10^6, ...), as the SI and IEC
/// define them. A bare K, M, G or T is refused: tools read it both ways.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow!("'{s}' is not a size: expected e.g. 512MiB, 24GiB or 1000000"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let mult = match unit.as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0f64.powi(2),
        "gib" => 1024.0f64.powi(3),
        "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "m" | "g" | "t" => {
            let u = unit.to_ascii_uppercase();
            return Err(anyhow!(
                "'{s}': '{u}' is ambiguous: write {num}{u}iB (binary, 1024-based) or {num}{u}B \
                 (decimal, 1000-based)",
                num = num.trim()
            ));
        }
        u => {
            return Err(anyhow!(
                "'{s}': unknown unit '{u}' (B, KiB, MiB, GiB, TiB, or kB, MB, GB, TB)"
            ));
        }
    };
    if !(v.is_finite() && v >= 0.0) {
        return Err(anyhow!("'{s}' is not a size"));
    }
    Ok((v * mult) as u64)
}

// ---------------------------------------------------------------------------------------------
// Statistics and run metadata.

/// Median and spread of samples.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// First and third quartiles (linear interpolation).
    pub q1: f64,
    pub q3: f64,
    pub samples: Vec<f64>,
}

impl Timing {
    pub fn new(mut samples: Vec<f64>) -> Timing {
        samples.retain(|v| v.is_finite());
        let mut s = samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| -> f64 {
            if s.is_empty() {
                return f64::NAN;
            }
            let pos = p * (s.len() - 1) as f64;
            let (i, f) = (pos.floor() as usize, pos.fract());
            if i + 1 < s.len() {
                s[i] + f * (s[i + 1] - s[i])
            } else {
                s[i]
            }
        };
        Timing {
            median: q(0.5),
            min: q(0.0),
            max: q(1.0),
            q1: q(0.25),
            q3: q(0.75),
            samples,
        }
    }
}

/// Where and when a result was made.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    pub command: String,
    /// UTC, ISO 8601.
    pub date: String,
    pub git_commit: Option<String>,
    pub host_cpu: Option<String>,
    pub threads: usize,
}

impl RunInfo {
    pub fn collect(command: &str) -> RunInfo {
        let git_commit = git_commit();
        let host_cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        });
        RunInfo {
            command: command.to_string(),
            date: utc_now(),
            git_commit,
            host_cpu,
            threads: pool_threads(),
        }
    }
}

impl RunInfo {
    /// A result as Markdown: where and when it was made, then `table` as it prints.
    pub fn markdown(&self, title: &str, device: &str, table: &str) -> String {
        let unknown = || "unknown".to_string();
        format!(
            "# {title}\n\n- device: {device}\n- date: {}\n- commit: {}\n- host CPU: {}, {} threads\n\
             - command: `{}`\n\n```\n{}\n```\n",
            self.date,
            self.git_commit.clone().unwrap_or_else(unknown),
            self.host_cpu.clone().unwrap_or_else(unknown),
            self.threads,
            self.command,
            table.trim_end(),
        )
    }

    /// A result's three files under `dir` (made if missing), each written whole or not at all:
    /// NAME.json (`report`), NAME.svg and NAME.md (the title, this run's provenance and
    /// `table`). Returns their paths, in that order.
    pub fn write_files(
        &self,
        dir: &Path,
        name: &str,
        report: &impl Serialize,
        device: &str,
        table: &str,
        svg: &str,
    ) -> Result<[PathBuf; 3]> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let [json, chart, md] = ["json", "svg", "md"].map(|ext| dir.join(format!("{name}.{ext}")));
        write_atomic(&json, serde_json::to_string_pretty(report)?.as_bytes())?;
        write_atomic(&chart, svg.as_bytes())?;
        let title = format!("loren {name}");
        write_atomic(&md, self.markdown(&title, device, table).as_bytes())?;
        Ok([json, chart, md])
    }
}

/// FLOP/s in the unit that suits the device: GFLOP/s on a CPU, TFLOP/s on a GPU.
pub fn rate_unit(device_is_cpu: bool) -> (f64, &'static str) {
    if device_is_cpu {
        (1e9, "GFLOP/s")
    } else {
        (1e12, "TFLOP/s")
    }
}

// ---------------------------------------------------------------------------------------------
// The bench.

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub device: DeviceSpec,
    /// Model configs; `None` takes the device's default (CPU: tiny; GPU: vit-b-32 and vit-b-16).
    pub configs: Option<Vec<String>>,
    pub methods: Vec<Method>,
    pub members: Vec<usize>,
    pub batch: usize,
    pub rank: usize,
    pub classes: usize,
    pub warmup: usize,
    pub repeats: usize,
    /// Override the memory budget (else the device's free memory).
    pub memory_budget: Option<u64>,
    /// Side of the square GEMM the peak is measured with (`None`: 2048 on the CPU, 8192 on a
    /// GPU).
    pub peak_size: Option<usize>,
    pub seed: u64,
    /// What the training forward keeps for the backward, for both methods alike.
    pub activations: Activations,
    /// Also time each op of the training step ([`OpTime`]).
    pub breakdown: bool,
    pub command: String,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            device: DeviceSpec::Auto,
            configs: None,
            methods: vec![Method::Lora, Method::Explicit],
            members: vec![1, 2, 4, 8, 16, 32],
            batch: 32,
            rank: 8,
            classes: 10,
            warmup: 2,
            repeats: 10,
            memory_budget: None,
            peak_size: None,
            seed: 0,
            activations: Activations::Keep,
            breakdown: false,
            command: "loren bench".into(),
        }
    }
}

/// One (config, method, M).
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub config: String,
    pub method: Method,
    pub members: usize,
    pub batch: usize,
    pub rank: Option<usize>,
    /// "ok", "oom", "error" or "stopped" (not measured: Ctrl-C stopped the run before it).
    pub status: String,
    /// Why a row is oom or error.
    pub note: Option<String>,
    /// Seconds per training step.
    pub train: Option<Timing>,
    /// Seconds per inference pass.
    pub inference: Option<Timing>,
    /// Images per second through a training step (median), and images × members.
    pub images_per_s: Option<f64>,
    pub member_images_per_s: Option<f64>,
    pub inference_images_per_s: Option<f64>,
    /// Counted FLOPs of a training step and of an inference pass.
    pub train_flops: Flops,
    pub inference_flops: f64,
    /// FLOP/s achieved by the median step, and that over the measured peak.
    pub train_flops_per_s: Option<f64>,
    pub train_mfu: Option<f64>,
    pub inference_flops_per_s: Option<f64>,
    pub inference_mfu: Option<f64>,
    /// Measured peak accounted bytes over the timed training steps, by tag.
    pub train_memory: Option<MemoryBreakdown>,
    /// Measured peak accounted bytes over the timed inference passes.
    pub inference_peak: Option<u64>,
    /// The analytic model's peaks.
    pub predicted_train_peak: u64,
    pub predicted_inference_peak: u64,
    /// What the configuration was predicted to need from the budget (see [`predicted_need`]).
    pub predicted_need: u64,
    /// The device's own figure (GPU: cuMemGetInfo); `None` on the CPU.
    pub device_memory_used: Option<u64>,
    pub trainable_params: usize,
    /// Where the training step's time goes, largest first (with `--breakdown`).
    pub breakdown: Option<Vec<OpTime>>,
}

/// One op's (or one stage's) share of a training step: the mean over `repeats` steps timed with
/// a mark on the device's timeline after every op (see [`loren_autograd::timing`]).
#[derive(Clone, Debug, Serialize)]
pub struct OpTime {
    /// forward, backward or update.
    pub phase: &'static str,
    /// The op (its backward's name, e.g. `lora_linear`), or a stage of the step.
    pub op: &'static str,
    /// How often it runs per step.
    pub calls: f64,
    /// Seconds per step.
    pub seconds: f64,
}

/// The whole bench.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub note: String,
    pub info: RunInfo,
    pub configs: Vec<String>,
    pub batch: usize,
    pub rank: usize,
    /// What the training forward kept for the backward, in every row.
    pub activations: Activations,
    pub warmup: usize,
    pub repeats: usize,
    pub timer: String,
    pub flop_count: String,
    pub peak: Option<Peak>,
    pub peak_error: Option<String>,
    pub budget: Option<Budget>,
    pub rows: Vec<BenchRow>,
}

/// How a report's header says that the blocks were recomputed.
pub fn recompute_phrase(a: Activations) -> &'static str {
    match a {
        Activations::Keep => "",
        Activations::Recompute => "; block activations recomputed in the backward",
    }
}

/// The default configs for a device.
pub fn default_configs(device: &Device) -> Vec<String> {
    if device.is_cpu() {
        vec!["tiny".into()]
    } else {
        vec!["vit-b-32".into(), "vit-b-16".into()]
    }
}

fn validate(o: &BenchOptions) -> Result<()> {
    if let Some(m) = o.methods.iter().find(|m| m.is_single()) {
        return Err(anyhow!(
            "method {m} has one member; bench times the ensembles: lora, explicit or mc-dropout"
        ));
    }
    if o.repeats == 0 {
        return Err(anyhow!("--repeats must be at least 1"));
    }
    check_steps("--repeats", o.repeats)?;
    check_steps("--warmup", o.warmup)?;
    if o.peak_size == Some(0) {
        return Err(anyhow!(
            "--peak-size 0: the peak GEMM needs a side of at least 1"
        ));
    }
    Ok(())
}

/// The most steps `--warmup` or `--repeats` may ask for: a million steps of the tiny config
/// take hours, and the timings are held in memory.
pub const MAX_STEPS: usize = 1_000_000;

pub fn check_steps(flag: &str, n: usize) -> Result<()> {
    if n > MAX_STEPS {
        return Err(anyhow!("{flag} {n}: at most {MAX_STEPS} steps"));
    }
    Ok(())
}

/// The largest peak GEMM side on the CPU: 8192 is 1.1 TFLOP a product, already seconds per
/// sample on a laptop, and the CPU's GEMM rate has levelled off well below it.
pub const CPU_PEAK_SIZE_MAX: usize = 8192;
/// The same on a GPU: 32768 is 70 TFLOP a product, far past where the rate levels off.
pub const GPU_PEAK_SIZE_MAX: usize = 32768;

/// The smallest peak GEMM side that reaches a device's rate: below it the GEMM measures its own
/// overheads, and MFU over that peak overstates (smaller ones still serve quick checks).
pub const PEAK_SIZE_FULL: usize = 1024;

/// Refuse a peak GEMM side the device cannot hold or would take minutes on, before allocating:
/// on the CPU a failed allocation aborts the process with no error to report.
fn check_peak_size(device: &Device, n: usize, budget: Option<&Budget>) -> Result<()> {
    let (cap, buffers, elem) = match device.is_cpu() {
        true => (CPU_PEAK_SIZE_MAX, "three f32", 12.0),
        false => (GPU_PEAK_SIZE_MAX, "three bf16", 6.0),
    };
    if n > cap {
        return Err(anyhow!(
            "--peak-size {n}: at most {cap} on {} (a larger GEMM takes minutes and measures no \
             higher a peak)",
            device.name()
        ));
    }
    let need = elem * (n as f64).powi(2);
    match budget {
        Some(b) if need > b.bytes as f64 => {
            // A suggestion only where one fits: a budget under one element's buffers has none.
            let fits = (b.bytes as f64 / elem).sqrt() as usize;
            let advice = match fits {
                0 => "raise --memory-budget".to_string(),
                n if n < PEAK_SIZE_FULL => format!(
                    "raise --memory-budget (a peak GEMM needs a side of {PEAK_SIZE_FULL} to \
                     reach the device's rate), or pass --peak-size {n} or less for a quick check \
                     whose MFU overstates"
                ),
                n => format!("pass --peak-size {n} or less"),
            };
            Err(anyhow!(
                "--peak-size {n}: the peak GEMM's {buffers} {n}x{n} buffers need {}, and {} is \
                 available ({}): {advice}",
                bytes(need as u64),
                bytes(b.bytes),
                b.source,
            ))
        }
        _ => Ok(()),
    }
}

/// A batch of normal noise with cycling labels: timing and memory need no data.
pub fn random_batch(vit: &VitConfig, b: usize, classes: usize, seed: u64) -> Batch {
    let mut rng = Rng::new(seed ^ 0xBE4C);
    let n = b * vit.channels * vit.image_size * vit.image_size;
    Batch {
        images: (0..n).map(|_| rng.normal()).collect(),
        labels: (0..b).map(|i| (i % classes) as u32).collect(),
        batch: b,
        channels: vit.channels,
        height: vit.image_size,
        width: vit.image_size,
    }
}

fn ensemble(o: &BenchOptions, method: Method, members: usize) -> EnsembleConfig {
    ensemble_config(method, members, o.classes, o.rank)
}

/// The ensemble the bench and memprofile build: the reference LoRA setup with rank `rank`.
pub fn ensemble_config(
    method: Method,
    members: usize,
    classes: usize,
    rank: usize,
) -> EnsembleConfig {
    EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method,
        members: if method.is_single() { 1 } else { members },
        classes,
        lora: LoraConfig {
            rank,
            ..LoraConfig::default()
        },
    }
}

/// The training setup of the bench and memprofile: AdamW, clipping at 1, no schedule to speak of.
pub fn bench_train_config(batch: usize, seed: u64, activations: Activations) -> TrainConfig {
    TrainConfig {
        seed,
        ..TrainConfig::plain(batch, 1e-4, activations)
    }
}

/// Whether an error is the device running out of memory.
pub fn is_oom(e: &anyhow::Error) -> bool {
    let s = format!("{e:#}").to_ascii_lowercase();
    s.contains("out of memory") || s.contains("out_of_memory")
}

struct Measured {
    train: Timing,
    inference: Timing,
    memory: loren_tensor::MemoryReport,
    inference_peak: u64,
    device_used: Option<u64>,
    breakdown: Option<Vec<OpTime>>,
}

/// `steps` more training steps, each with a mark after every op: the mean time per step of each
/// op and stage, largest first. After the untimed-by-op steps, so the marks cost them nothing.
fn op_times(
    trainer: &mut Trainer<'_>,
    batch: &Batch,
    device: &Device,
    steps: usize,
) -> Result<Vec<OpTime>> {
    let mut spans = Vec::new();
    for _ in 0..steps {
        let images = batch.stage(device)?;
        let timer = Rc::new(RefCell::new(StepTimer::new(device)?));
        trainer.step_timed(batch, images, Some(&timer))?;
        let timer = Rc::try_unwrap(timer)
            .map_err(|_| anyhow!("the training step kept its timer"))?
            .into_inner();
        spans.extend(timer.finish()?);
    }
    let n = steps as f64;
    Ok(totals(&spans)
        .into_iter()
        .map(|t| OpTime {
            phase: t.phase.name(),
            op: t.what,
            calls: t.count as f64 / n,
            seconds: t.seconds / n,
        })
        .collect())
}

/// Time one configuration on a fresh device (fresh accounting).
fn measure(
    o: &BenchOptions,
    vit: &VitConfig,
    ens: &EnsembleConfig,
    device: &Device,
) -> Result<Measured> {
    // The device figure below is then this configuration's own peak.
    device.release_cached_memory()?;
    let mut model = Vit::new(vit, ens, device, o.seed)?;
    let batch = random_batch(vit, o.batch, o.classes, o.seed);
    let cfg = bench_train_config(o.batch, o.seed, o.activations);
    let steps = o.warmup + o.repeats;
    let (train, memory, device_used, breakdown) = {
        // Only the schedule's length: saturating keeps the rate constant past a huge batch.
        let mut trainer = Trainer::new(&mut model, &cfg, steps.saturating_mul(o.batch))?;
        for _ in 0..o.warmup {
            trainer.step(&batch)?;
        }
        device.synchronize()?;
        device.memory().reset_peaks();
        let mut samples = Vec::with_capacity(o.repeats);
        for _ in 0..o.repeats {
            // Staged first, as `loren train` stages each batch on the thread that makes it.
            let images = batch.stage(device)?;
            let (_, s) = time_on(device, || Ok(trainer.step_staged(&batch, images)?))?;
            samples.push(s);
        }
        let (memory, used) = (device.memory().report(), device_memory_used(device));
        let breakdown = o
            .breakdown
            .then(|| op_times(&mut trainer, &batch, device, o.repeats))
            .transpose()?;
        (Timing::new(samples), memory, used, breakdown)
    };
    // As `Ensemble::predict` stages them, with their keys.
    let (images, keys) = model.stage_for_prediction(&batch.images, batch.image_shape())?;
    let images = Tensor::from_staged(images, MemTag::Workspace)?;
    for _ in 0..o.warmup {
        drop(model.predict(&images, &keys)?);
    }
    device.synchronize()?;
    device.memory().reset_peaks();
    let mut samples = Vec::with_capacity(o.repeats);
    for _ in 0..o.repeats {
        let (p, s) = time_on(device, || Ok(model.predict(&images, &keys)?))?;
        drop(p);
        samples.push(s);
    }
    Ok(Measured {
        train,
        inference: Timing::new(samples),
        memory,
        inference_peak: device.memory().report().total_peak,
        device_used,
        breakdown,
    })
}

/// Run the bench. `progress` is told what is about to run.
pub fn run_bench(o: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    plan_bench(o)?.run(progress)
}

/// A bench checked whole and ready to measure.
pub struct BenchPlan<'a> {
    o: &'a BenchOptions,
    sweep: Sweep,
}

/// Everything a bench can refuse, refused before anything is measured: the options, the
/// device, a bad rank or class count, and a size the engine does not build (for every row,
/// so that no row measured is lost to a later one), and the peak GEMM's size.
pub fn plan_bench(o: &BenchOptions) -> Result<BenchPlan<'_>> {
    validate(o)?;
    let sweep = Sweep::open(
        &o.device,
        o.configs.as_deref(),
        default_configs,
        &o.members,
        &o.methods,
        o.batch,
    )?;
    let Sweep {
        probe,
        vits,
        members,
        ..
    } = &sweep;
    let prec = precision(probe);
    for (vit, &method) in vits
        .iter()
        .flat_map(|v| o.methods.iter().map(move |m| (v, m)))
    {
        ensemble(o, method, members[0])
            .validate(vit)
            .with_context(|| format!("{method} on {}", vit.name))?;
        for &m in members {
            memory_model::predict(
                vit,
                &ensemble(o, method, m),
                o.batch,
                2,
                prec,
                o.activations,
            )?;
        }
    }
    check_peak_size(
        probe,
        peak_size(o, probe),
        budget_for(probe, o.memory_budget).as_ref(),
    )?;
    Ok(BenchPlan { o, sweep })
}

/// What a measuring command (bench, memprofile) sweeps: the device, opened; the configs, as
/// given or else the command's defaults for that device; and the ensemble sizes, in order, once
/// each.
pub struct Sweep {
    pub probe: Device,
    pub configs: Vec<String>,
    pub vits: Vec<VitConfig>,
    pub members: Vec<usize>,
}

impl Sweep {
    /// The sweep asked for, refused if it holds no size or method, a size or batch of 0, or a
    /// config loren does not know, or if the device cannot be opened.
    pub fn open(
        device: &DeviceSpec,
        configs: Option<&[String]>,
        defaults: fn(&Device) -> Vec<String>,
        members: &[usize],
        methods: &[Method],
        batch: usize,
    ) -> Result<Sweep> {
        if members.is_empty() || members.contains(&0) {
            return Err(anyhow!("--members needs ensemble sizes of at least 1"));
        }
        if methods.is_empty() {
            return Err(anyhow!("--methods needs at least one method"));
        }
        if batch == 0 {
            return Err(anyhow!("the batch size must be at least 1 (--batch-size)"));
        }
        let probe = crate::open_device(*device)?;
        let configs = configs.map_or_else(|| defaults(&probe), <[String]>::to_vec);
        let vits = configs
            .iter()
            .map(|c| VitConfig::by_name(c).map_err(anyhow::Error::from))
            .collect::<Result<Vec<_>>>()?;
        let mut members = members.to_vec();
        members.sort_unstable();
        // Refused as compare refuses a size twice: a typo, most likely, and one row either way.
        if let Some(twice) = members.windows(2).find(|w| w[0] == w[1]) {
            return Err(anyhow!(
                "--members names {} twice: each ensemble size is one row",
                twice[0]
            ));
        }
        Ok(Sweep {
            probe,
            configs,
            vits,
            members,
        })
    }

    /// The device as a report names it: `cpu`, or as asked with its name (`cuda:0 (NVIDIA
    /// H100 ...)`).
    pub fn device_label(&self, asked: &DeviceSpec) -> String {
        match self.probe.is_cpu() {
            true => "cpu".into(),
            false => format!("{asked} ({})", self.probe.name()),
        }
    }
}

/// The peak GEMM's side: as given, else 2048 on the CPU and 8192 on a GPU.
fn peak_size(o: &BenchOptions, probe: &Device) -> usize {
    o.peak_size
        .unwrap_or(if probe.is_cpu() { 2048 } else { 8192 })
}

impl BenchPlan<'_> {
    /// Measure the peak, then every row. `progress` is told what is about to run.
    pub fn run(self, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
        let BenchPlan { o, sweep } = self;
        let device = sweep.device_label(&o.device);
        let Sweep {
            probe,
            configs,
            vits,
            members,
        } = sweep;
        let is_cpu = probe.is_cpu();
        let defaulted = o.configs.is_none();
        let note = if is_cpu {
            let mut n =
                "CPU figures: f32, accounted bytes, wall clock on a machine that may be shared."
                    .to_string();
            if defaulted {
                n.push_str(
                    " Config defaulted to tiny on the CPU (ViT-B takes seconds per member-step \
                     here); pass --config vit-b-32 to time it.",
                );
            }
            n
        } else {
            "GPU figures: bf16 weight matrices and activations, f32 trainable state; wall clock \
             after device synchronisation."
                .to_string()
        };

        let peak_size = peak_size(o, &probe);
        let note = match peak_size < PEAK_SIZE_FULL {
            true => format!(
                "{note} The peak was measured on a {peak_size}x{peak_size}x{peak_size} GEMM, \
                 below the {PEAK_SIZE_FULL} that reaches the device's rate: MFU over it overstates."
            ),
            false => note,
        };
        progress(&format!("measuring the peak: {0}x{0}x{0} GEMM", peak_size));
        let (peak, peak_error) = match measure_peak(&probe, peak_size, 5) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let budget = budget_for(&probe, o.memory_budget);
        let prec = precision(&probe);
        drop(probe);

        let mut rows = Vec::new();
        for vit in &vits {
            for &method in &o.methods {
                let mut failed_at: Option<usize> = None;
                for &m in &members {
                    let ens = ensemble(o, method, m);
                    let model = memory_model::predict(vit, &ens, o.batch, 2, prec, o.activations)?;
                    let mut row = BenchRow {
                        config: vit.name.clone(),
                        method,
                        members: m,
                        batch: o.batch,
                        rank: method.uses_lora().then_some(o.rank),
                        status: "ok".into(),
                        note: None,
                        train: None,
                        inference: None,
                        images_per_s: None,
                        member_images_per_s: None,
                        inference_images_per_s: None,
                        train_flops: model.train_flops,
                        inference_flops: model.inference_flops,
                        train_flops_per_s: None,
                        train_mfu: None,
                        inference_flops_per_s: None,
                        inference_mfu: None,
                        train_memory: None,
                        inference_peak: None,
                        predicted_train_peak: model.train.total_peak,
                        predicted_inference_peak: model.inference.total_peak,
                        predicted_need: 0,
                        device_memory_used: None,
                        trainable_params: model.params.trainable,
                        breakdown: None,
                    };
                    if let Some(at) = failed_at {
                        row.status = "oom".into();
                        row.note = Some(format!("OOM at M={m}: M={at} did not fit already"));
                        rows.push(row);
                        continue;
                    }
                    if crate::interrupt::requested() {
                        row.status = "stopped".into();
                        rows.push(row);
                        continue;
                    }
                    let device = crate::open_device(o.device)?;
                    let need = predicted_need(&model, &device);
                    row.predicted_need = need;
                    if let Some(b) = budget.as_ref().filter(|b| need > b.bytes) {
                        row.status = "oom".into();
                        row.note = Some(format!(
                            "OOM at M={m}: predicted to need {} ({} accounted peak{}), {} available \
                             ({}){}",
                            bytes(need),
                            bytes(model.train.total_peak.max(model.inference.total_peak)),
                            if device.is_cpu() {
                                " x2 for the buffer pool, +256 MiB"
                            } else {
                                ""
                            },
                            bytes(b.bytes),
                            b.source,
                            recompute_hint(vit, &ens, o.batch, o.activations, &device, b.bytes)
                        ));
                        failed_at = Some(m);
                        rows.push(row);
                        continue;
                    }
                    progress(&format!("{} {method} M={m}", vit.name));
                    let result = catch_unwind(AssertUnwindSafe(|| measure(o, vit, &ens, &device)))
                        .unwrap_or_else(|p| {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown panic".into());
                            Err(anyhow!("panicked: {msg}"))
                        });
                    match result {
                        Ok(r) => fill(&mut row, r, peak.as_ref()),
                        Err(e) if is_oom(&e) => {
                            row.status = "oom".into();
                            row.note = Some(format!("OOM at M={m}: {e:#}"));
                            failed_at = Some(m);
                        }
                        Err(e) => {
                            row.status = "error".into();
                            row.note = Some(format!("{e:#}"));
                        }
                    }
                    // Each row as it is done, so a run cut short still leaves its figures.
                    progress(&match (&row.train, &row.train_memory) {
                        (Some(t), Some(mem)) => format!(
                            "{} {method} M={m}: step {}, inference {}, peak {}",
                            vit.name,
                            duration(t.median),
                            row.inference
                                .as_ref()
                                .map_or("-".into(), |i| duration(i.median)),
                            bytes(mem.total_peak)
                        ),
                        _ => format!(
                            "{} {method} M={m}: {}",
                            vit.name,
                            row.note.as_deref().unwrap_or("no figures")
                        ),
                    });
                    rows.push(row);
                }
            }
        }
        let (_, unit) = rate_unit(is_cpu);
        Ok(BenchReport {
            device,
            note,
            info: RunInfo::collect(&o.command),
            configs,
            batch: o.batch,
            rank: o.rank,
            activations: o.activations,
            warmup: o.warmup,
            repeats: o.repeats,
            timer: "Device::time around each call: CUDA events on the stream on a GPU, the wall clock on the CPU (bench::time_on)".into(),
            flop_count: format!(
                "matrix products only, 2mnk each, {}; attention's backward counts the scores it \
                 computes again (10·B·T²·D per block and member, FlashAttention's convention); \
                 rates in {unit} (loren_nn::memory_model::Flops)",
                match o.activations {
                    Activations::Keep => "as executed",
                    // MFU divides the model's FLOPs: recomputing costs time, not work done.
                    Activations::Recompute =>
                        "model FLOPs: the blocks' forwards that --recompute runs a second time in \
                         the backward are left out",
                }
            ),
            peak,
            peak_error,
            budget,
            rows,
        })
    }
}

fn fill(row: &mut BenchRow, r: Measured, peak: Option<&Peak>) {
    let (b, m) = (row.batch as f64, row.members as f64);
    let t = r.train.median;
    let ti = r.inference.median;
    row.images_per_s = Some(b / t);
    row.member_images_per_s = Some(b * m / t);
    row.inference_images_per_s = Some(b / ti);
    let tf = row.train_flops.total() / t;
    let inf = row.inference_flops / ti;
    row.train_flops_per_s = Some(tf);
    row.inference_flops_per_s = Some(inf);
    if let Some(p) = peak {
        row.train_mfu = Some(tf / p.flops_per_s);
        row.inference_mfu = Some(inf / p.flops_per_s);
    }
    row.train = Some(r.train);
    row.inference = Some(r.inference);
    row.train_memory = Some(r.memory.into());
    row.inference_peak = Some(r.inference_peak);
    row.device_memory_used = r.device_used;
    row.breakdown = r.breakdown;
}

// ---------------------------------------------------------------------------------------------
// Output.

/// `v` to three significant figures, from 1000 up whole: 1.97, 15.2, 152, 1520. Whole numbers
/// hid a difference where rates are small (1.97 and 1.52 img/s both read 2).
fn three_figures(v: f64) -> String {
    // The decimals are those of v rounded to three figures, so that a carry counts: 9.996 is
    // 10.0, not 10.00.
    let rounded: f64 = format!("{v:.2e}").parse().unwrap_or(v);
    if rounded == 0.0 || !rounded.is_finite() {
        return format!("{rounded}");
    }
    let decimals = (2 - rounded.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.decimals$}")
}

/// A time to three significant figures in the unit that puts it between 1 and 1000 (from 1000 s
/// up whole): 523 µs, 11.7 ms, 6.25 s, 17.3 s. One rule for every column and progress line: a
/// column had read "6246 ms" above "17.3 s".
pub fn duration(s: f64) -> String {
    // The unit is picked after rounding, so that 0.9996 s reads 1.00 s and not 1000 ms.
    let rounded: f64 = format!("{s:.2e}").parse().unwrap_or(s);
    let (scale, unit) = if rounded >= 1.0 || rounded <= 0.0 || !rounded.is_finite() {
        (1.0, "s")
    } else if rounded >= 1e-3 {
        (1e3, "ms")
    } else {
        (1e6, "µs")
    };
    format!("{} {unit}", three_figures(s * scale))
}

/// The bench as a table for people.
pub fn table(r: &BenchReport) -> String {
    let is_cpu = r.device == "cpu";
    let (scale, unit) = rate_unit(is_cpu);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "loren bench on {} (batch {}, rank {}, {} warm-up + {} timed calls per row{})",
        r.device,
        r.batch,
        r.rank,
        r.warmup,
        r.repeats,
        recompute_phrase(r.activations)
    );
    let _ = writeln!(s, "{}", r.note);
    match (&r.peak, &r.peak_error) {
        (Some(p), _) => {
            let _ = writeln!(
                s,
                "peak: {:.1} {unit} (best of {}; median {:.1}), {}",
                p.flops_per_s / scale,
                p.samples,
                p.median_flops_per_s / scale,
                p.what
            );
        }
        (None, Some(e)) => {
            let _ = writeln!(s, "peak: n/a ({e}); MFU is n/a");
        }
        _ => {}
    }
    if let Some(b) = &r.budget {
        let _ = writeln!(s, "memory budget: {} ({})", bytes(b.bytes), b.source);
    }
    let _ = writeln!(
        s,
        "step and inference: median (min-max) of the timed calls; FLOPs: {}",
        r.flop_count
    );
    let _ = writeln!(s);
    let head = [
        "config",
        "method",
        "M",
        "step",
        "(min-max)",
        "img/s",
        "member-img/s",
        "GFLOP/step",
        unit,
        "MFU",
        "infer",
        "infer img/s",
        "peak mem",
        "predicted",
    ];
    let mut lines: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    let mut notes = Vec::new();
    for row in &r.rows {
        let opt =
            |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "-".into());
        let mut l = vec![
            row.config.clone(),
            row.method.to_string(),
            row.members.to_string(),
        ];
        match (&row.train, &row.inference) {
            (Some(t), Some(i)) => {
                l.push(duration(t.median));
                l.push(format!("({}-{})", duration(t.min), duration(t.max)));
                l.push(opt(row.images_per_s, &three_figures));
                l.push(opt(row.member_images_per_s, &three_figures));
                l.push(format!("{:.2}", row.train_flops.total() / 1e9));
                l.push(opt(row.train_flops_per_s, &|v| format!("{:.1}", v / scale)));
                l.push(opt(row.train_mfu, &|v| format!("{:.1}%", 100.0 * v)));
                l.push(duration(i.median));
                l.push(opt(row.inference_images_per_s, &three_figures));
                l.push(
                    row.train_memory
                        .as_ref()
                        .map(|m| bytes(m.total_peak))
                        .unwrap_or_else(|| "-".into()),
                );
                l.push(bytes(row.predicted_train_peak));
            }
            _ => {
                let what = match row.status.as_str() {
                    "oom" => format!("OOM at M={}", row.members),
                    "stopped" => "stopped".to_string(),
                    _ => "error".to_string(),
                };
                l.push(what);
                l.extend(std::iter::repeat_n("-".to_string(), 3));
                l.push(format!("{:.2}", row.train_flops.total() / 1e9));
                l.extend(std::iter::repeat_n("-".to_string(), 5));
                l.push(bytes(row.predicted_train_peak));
                if let Some(n) = &row.note {
                    notes.push(format!(
                        "{} {} M={}: {n}",
                        row.config, row.method, row.members
                    ));
                }
            }
        }
        lines.push(l);
    }
    s.push_str(&aligned_columns(&lines, 2));
    for n in notes {
        let _ = writeln!(s, "{n}");
    }
    for row in &r.rows {
        if let (Some(ops), Some(t)) = (&row.breakdown, &row.train) {
            s.push_str(&breakdown_table(row, ops, t.median, r.repeats));
        }
    }
    s
}

/// The ops shown by name in a breakdown; the rest are added up in one line.
const BREAKDOWN_LINES: usize = 14;

/// Where one row's training step goes, op by op.
fn breakdown_table(row: &BenchRow, ops: &[OpTime], step: f64, repeats: usize) -> String {
    let total: f64 = ops.iter().map(|o| o.seconds).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nwhere the step goes: {} {} M={} (mean of {repeats} step{} with a mark on the device's \
         timeline after every op; the spans add to {}, the step without marks took {})",
        row.config,
        row.method,
        row.members,
        if repeats == 1 { "" } else { "s" },
        duration(total),
        duration(step)
    );
    let mut lines = vec![
        ["phase", "op", "calls", "per step", "share"]
            .map(String::from)
            .to_vec(),
    ];
    let line = |phase: &str, op: &str, calls: String, secs: f64| {
        vec![
            phase.to_string(),
            op.to_string(),
            calls,
            duration(secs),
            format!("{:.1}%", 100.0 * secs / total.max(f64::MIN_POSITIVE)),
        ]
    };
    for o in ops.iter().take(BREAKDOWN_LINES) {
        lines.push(line(o.phase, o.op, format!("{:.0}", o.calls), o.seconds));
    }
    if ops.len() > BREAKDOWN_LINES {
        let rest = &ops[BREAKDOWN_LINES..];
        let secs = rest.iter().map(|o| o.seconds).sum();
        lines.push(line("", &format!("{} more", rest.len()), "".into(), secs));
    }
    s.push_str(&aligned_columns(&lines, 2));
    s
}

/// Step time and peak memory against M, both methods, one row of panels per config.
pub fn svg(r: &BenchReport) -> String {
    let mut charts = Vec::new();
    for config in &r.configs {
        let mut time = Chart::new(
            format!("{config}: time per call (median)"),
            "ensemble size M",
            "time",
        );
        time.log_x = true;
        time.log_y = true;
        time.y_units = Units::Seconds;
        let mut mem = Chart::new(
            format!("{config}: peak memory of a training step"),
            "ensemble size M",
            "bytes",
        );
        mem.log_x = true;
        mem.log_y = true;
        mem.y_units = Units::Bytes;
        let methods: Vec<Method> = {
            let mut v: Vec<Method> = r
                .rows
                .iter()
                .filter(|x| &x.config == config)
                .map(|x| x.method)
                .collect();
            v.dedup();
            v
        };
        for (i, method) in methods.iter().enumerate() {
            let rows: Vec<&BenchRow> = r
                .rows
                .iter()
                .filter(|x| &x.config == config && x.method == *method)
                .collect();
            let pts = |f: &dyn Fn(&BenchRow) -> Option<f64>| -> Vec<(f64, f64)> {
                rows.iter()
                    .filter_map(|x| f(x).map(|y| (x.members as f64, y)))
                    .collect()
            };
            let color = palette(i);
            time.series.push(Series {
                name: format!("{method}: training step"),
                points: pts(&|x| x.train.as_ref().map(|t| t.median)),
                color: color.clone(),
                dashed: false,
            });
            time.series.push(Series {
                name: format!("{method}: inference"),
                points: pts(&|x| x.inference.as_ref().map(|t| t.median)),
                color: color.clone(),
                dashed: true,
            });
            mem.series.push(Series {
                name: format!("{method}: measured"),
                points: pts(&|x| x.train_memory.as_ref().map(|m| m.total_peak as f64)),
                color: color.clone(),
                dashed: false,
            });
            mem.series.push(Series {
                name: format!("{method}: predicted"),
                points: pts(&|x| Some(x.predicted_train_peak as f64)),
                color: color.clone(),
                dashed: true,
            });
            for x in rows.iter().filter(|x| x.status == "oom") {
                let mark = (x.members as f64, format!("{method} OOM"), color.clone());
                time.marks.push(mark.clone());
                mem.marks.push(mark);
            }
        }
        charts.push(time);
        charts.push(mem);
    }
    let subtitle = format!(
        "{}; batch {}, rank {}; {}",
        r.device, r.batch, r.rank, r.info.date
    );
    render("loren bench", &subtitle, &charts, 2)
}

/// Write bench.json, bench.svg and bench.md under `dir`; returns their paths.
pub fn write(r: &BenchReport, dir: &Path) -> Result<[PathBuf; 3]> {
    r.info
        .write_files(dir, "bench", r, &r.device, &table(r), &svg(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_keep_three_significant_figures() {
        let cases = [
            (1.97, "1.97"),
            (1.52, "1.52"),
            (15.24, "15.2"),
            (152.4, "152"),
            (1520.4, "1520"),
            (2732.4, "2732"),
            (0.5, "0.500"),
            (9.996, "10.0"),
            (99.96, "100"),
            (0.0, "0"),
        ];
        for (v, shown) in cases {
            assert_eq!(three_figures(v), shown, "{v}");
        }
    }

    #[test]
    fn times_take_one_unit_each_to_three_significant_figures() {
        let cases = [
            (6.246, "6.25 s"),
            (17.31, "17.3 s"),
            (1520.4, "1520 s"),
            (0.0117123, "11.7 ms"),
            (0.1160, "116 ms"),
            (0.9996, "1.00 s"),
            (0.000523, "523 µs"),
            (0.00099996, "1.00 ms"),
            (0.0, "0 s"),
        ];
        for (s, shown) in cases {
            assert_eq!(duration(s), shown, "{s}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("16GB").unwrap(), 16_000_000_000);
        assert_eq!(parse_bytes("500 MB").unwrap(), 500_000_000);
        assert_eq!(parse_bytes("2kb").unwrap(), 2_000);
        let e = parse_bytes("24G").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("24GiB") && e.contains("24GB"),
            "{e}"
        );
        assert_eq!(parse_bytes("1e6").unwrap(), 1_000_000);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }

    #[test]
    fn quartiles_and_median() {
        let t = Timing::new(vec![4.0, 1.0, 3.0, 2.0, 5.0]);
        assert_eq!(
            (t.min, t.q1, t.median, t.q3, t.max),
            (1.0, 2.0, 3.0, 4.0, 5.0)
        );
        let t = Timing::new(vec![2.0]);
        assert_eq!(t.median, 2.0);
    }

    #[test]
    fn dates_are_iso() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'));
    }

    #[test]
    fn oom_errors_are_recognised() {
        assert!(is_oom(&anyhow!(
            "CUDA driver error during alloc: CUDA_ERROR_OUT_OF_MEMORY"
        )));
        assert!(!is_oom(&anyhow!("shape mismatch")));
    }

    #[test]
    fn a_peak_gemm_over_the_budget_suggests_a_size_that_fits_or_none() {
        let cpu = Device::cpu();
        let budget = |bytes| Budget {
            bytes,
            source: "--memory-budget".into(),
        };
        // 12 bytes per element on the CPU: 48 MB hold a 2000x2000 GEMM.
        let e = check_peak_size(&cpu, 4096, Some(&budget(48_000_000))).unwrap_err();
        assert!(
            e.to_string().contains("pass --peak-size 2000 or less"),
            "{e}"
        );
        assert!(check_peak_size(&cpu, 2000, Some(&budget(48_000_000))).is_ok());
        // None that fits reaches the device's rate (1200 bytes hold a 10x10 one): more budget
        // first, the size that fits for a quick check; with no budget, no size.
        let e = check_peak_size(&cpu, 4096, Some(&budget(1200)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("raise --memory-budget (a peak GEMM needs a side of 1024"),
            "{e}"
        );
        assert!(
            e.contains("or pass --peak-size 10 or less for a quick check"),
            "{e}"
        );
        let e = check_peak_size(&cpu, 4096, Some(&budget(0)))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("raise --memory-budget"), "{e}");
    }
}
