//! GPU micro-benchmarks of loren's fused kernels against cuBLAS baselines, at ViT-B shapes.
//!
//! ```text
//! cargo run --release -p loren-kernels --bin kernel-bench -- --out benches/results/h100
//! ```
//!
//! - **lora_linear** (M = 16 members, 1600 rows per member, 768→768 and 768→2304, r ∈ {4, 8, 16,
//!   32}; per-member input): the fused forward (`Gpu::lora_forward`: U projection + one GEMM with
//!   the low-rank term as an extra K-segment) and backward (`Gpu::lora_backward`: V, dA, dB and the
//!   fused dX GEMM), against (a) the cuBLAS bf16 shared-W GEMM alone (Y = X·Wᵀ over all M·rows
//!   rows; dX = dY·W), and (b) that GEMM plus the low-rank path as separate cuBLAS strided-batched
//!   GEMMs, one matrix per member: shrink U = X·Aᵀ and expand Y += U·Bᵀ; backward V = dY·B,
//!   dA = Vᵀ·X, dB = dYᵀ·U, dX += V·A. The baselines get bf16 copies of A, B, U and V (the fused
//!   kernels keep them in f32), which only favours the baselines.
//! - **attention** (G = 16 members × B = 32 images, 12 heads of 64, T ∈ {50, 197}): the fused
//!   forward and backward (`Gpu::attention_forward` / `attention_backward`, P recomputed from the
//!   log-sum-exp) against a naive path on head-major Q, K, V: cuBLAS batched S = Q·Kᵀ (f32), a
//!   row softmax kernel (P in bf16), cuBLAS batched O = P·V; backward dP = dO·Vᵀ, dV = Pᵀ·dO, a
//!   softmax-backward kernel dS = P∘(dP − rowsum(P∘dP))·scale, dQ = dS·K, dK = dSᵀ·Q. The two
//!   small kernels are compiled here with NVRTC through `loren_kernels::compile`. The naive path is
//!   not charged for the head-major transposes it would need in a model.
//!
//! - **memory-bound passes** (M·rows rows of width 768, and 3072 for the MLP's bias+GELU):
//!   LayerNorm forward and dx, the residual add, gradient accumulation, the bias add after a
//!   cuBLAS product, bias+GELU forward and backward, each with the bandwidth it reaches for the
//!   bytes it must move, beside a device-to-device copy of one activation.
//!
//! Every number is the median of `--repeats` calls (after `--warmup`), each timed by CUDA events
//! around the call on the kernels' stream; min and max are kept. Rates use one FLOP count per
//! problem for all its variants (2·m·n·k per product; attention: forward 4·G·B·T²·D, backward
//! 8·G·B·T²·D, not counting the fused backward's recomputation), so they compare like times.
//!
//! With no GPU it prints `skipped: <reason>` and exits 0.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use loren_kernels::provenance::{git_commit, utc_now};
use loren_kernels::{
    AdapterGrads, AttentionDims, AttentionDrop, BiasGeluDims, Gemm, GemmOut, GemmPath, Gpu,
    KernelError, KernelSource, LoraDims, NormDims, bf16, bias_gelu_db_workspace_len, compile,
    cuda_available, gpu_required, lora_grads_workspace_len, nvrtc_version,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "\
kernel-bench: loren's fused lora_linear and attention kernels against cuBLAS baselines

usage: kernel-bench [--out DIR] [--warmup N] [--repeats N] [--members M] [--rows R]
                    [--batch B] [--ranks 4,8,16,32] [--seqs 50,197] [--only LIST]
                    [--quick]

  --out DIR      also write kernel-bench.json and kernel-bench.md into DIR
  --warmup N     untimed calls before timing (default 5)
  --repeats N    timed calls; the median is reported (default 50)
  --members M    ensemble size (default 16)
  --rows R       rows per member for lora_linear (default 1600 = 32 images x 50 tokens)
  --batch B      images per member for attention (default 32)
  --ranks LIST   adapter ranks (default 4,8,16,32)
  --seqs LIST    attention sequence lengths (default 50,197)
  --only LIST    which groups to run: lora, memory, attention (default all three)
  --quick        small shapes and few repeats, to check the harness runs";

#[derive(Clone, Debug)]
struct Args {
    out: Option<PathBuf>,
    warmup: usize,
    repeats: usize,
    members: usize,
    rows: usize,
    batch: usize,
    ranks: Vec<usize>,
    seqs: Vec<usize>,
    /// Which groups of rows to run ([`GROUPS`]).
    only: Vec<&'static str>,
}

/// The groups of benchmarks, in the order they run.
const GROUPS: [&str; 3] = ["lora", "memory", "attention"];

fn parse_list(s: &str, what: &str) -> std::result::Result<Vec<usize>, String> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("{what}: '{v}' is not a positive integer"))
        })
        .collect()
}

fn parse_args(argv: &[String]) -> std::result::Result<Args, String> {
    let mut a = Args {
        out: None,
        warmup: 5,
        repeats: 50,
        members: 16,
        rows: 1600,
        batch: 32,
        ranks: vec![4, 8, 16, 32],
        seqs: vec![50, 197],
        only: GROUPS.to_vec(),
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: '{v}' is not a number"))
        };
        match flag.as_str() {
            "--out" => a.out = Some(PathBuf::from(value()?)),
            "--warmup" => a.warmup = number(value()?)?,
            "--repeats" => a.repeats = number(value()?)?.max(1),
            "--members" => a.members = number(value()?)?.max(1),
            "--rows" => a.rows = number(value()?)?.max(1),
            "--batch" => a.batch = number(value()?)?.max(1),
            "--ranks" => a.ranks = parse_list(&value()?, "--ranks")?,
            "--seqs" => a.seqs = parse_list(&value()?, "--seqs")?,
            "--only" => {
                let v = value()?;
                a.only = v
                    .split(',')
                    .map(|g| {
                        GROUPS
                            .iter()
                            .find(|&&k| k == g)
                            .copied()
                            .ok_or_else(|| format!("--only: '{g}' is not one of {GROUPS:?}"))
                    })
                    .collect::<std::result::Result<_, _>>()?;
            }
            "--quick" => {
                a.warmup = 1;
                a.repeats = 3;
                a.members = 2;
                a.rows = 100;
                a.batch = 2;
                a.ranks = vec![8];
                a.seqs = vec![50];
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let args = match parse_args(&argv[1..]) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cuda_available() {
        return skip(e);
    }
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e @ (KernelError::Unavailable(_) | KernelError::HeadersMissing { .. })) => {
            return skip(e);
        }
        Err(e) => {
            eprintln!("error: opening GPU 0: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&gpu, &args, &argv.join(" ")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// No usable GPU: skip, or fail where the run requires one (`LOREN_REQUIRE_GPU`).
fn skip(reason: KernelError) -> ExitCode {
    if gpu_required() {
        eprintln!("error: LOREN_REQUIRE_GPU is set, but the GPU cannot be used: {reason}");
        return ExitCode::FAILURE;
    }
    println!("skipped: {reason}");
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Timing.

/// Milliseconds per call: median, min and max.
#[derive(Clone, Copy, Debug)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn new(mut ms: Vec<f64>) -> Stats {
        ms.sort_by(|a, b| a.total_cmp(b));
        let n = ms.len();
        let median = if n % 2 == 1 {
            ms[n / 2]
        } else {
            0.5 * (ms[n / 2 - 1] + ms[n / 2])
        };
        Stats {
            median,
            min: ms[0],
            max: ms[n - 1],
        }
    }
}

/// Time `f` by CUDA events on the kernels' stream: `warmup` untimed calls, then `repeats` timed.
fn time(gpu: &Gpu, a: &Args, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    for _ in 0..a.warmup {
        f()?;
    }
    gpu.synchronize()?;
    let stream = gpu.stream();
    let mut ms = Vec::with_capacity(a.repeats);
    for _ in 0..a.repeats {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        ms.push(start.elapsed_ms(&end)? as f64);
    }
    Ok(Stats::new(ms))
}

// ---------------------------------------------------------------------------------------------
// Buffers.

/// splitmix64, for reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

struct Alloc<'g> {
    gpu: &'g Gpu,
    rng: Rng,
}

impl Alloc<'_> {
    fn up<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.gpu.stream().clone_htod(v)?)
    }
    fn bf16(&mut self, n: usize, scale: f32) -> Result<CudaSlice<bf16>> {
        let v: Vec<bf16> = (0..n)
            .map(|_| bf16::from_f32(scale * self.rng.next()))
            .collect();
        self.up(&v)
    }
    fn f32(&mut self, n: usize, scale: f32) -> Result<CudaSlice<f32>> {
        let v: Vec<f32> = (0..n).map(|_| scale * self.rng.next()).collect();
        self.up(&v)
    }
    fn zeros_bf16(&self, n: usize) -> Result<CudaSlice<bf16>> {
        Ok(self.gpu.stream().alloc_zeros::<bf16>(n)?)
    }
    fn zeros_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.gpu.stream().alloc_zeros::<f32>(n)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Clone, Debug)]
struct Row {
    /// "lora_linear forward", "attention backward", ...
    bench: String,
    /// The shape, e.g. "M=16 rows=1600 768->2304 r=8".
    shape: String,
    /// Label and timing of each variant; the first is the fused kernel (on mma.sync where the
    /// forward has two fused paths), which "× fused" divides by.
    variants: Vec<(String, Stats)>,
    flops: f64,
    /// The bytes a memory-bound kernel must move at least (each input read and each output
    /// written once), for its achieved bandwidth; None for compute-bound problems.
    bytes: Option<f64>,
}

impl Row {
    fn fused(&self) -> Stats {
        self.variants[0].1
    }

    /// Achieved bandwidth in GB/s at `st`'s median, for a memory-bound row.
    fn gbps(&self, st: &Stats) -> Option<f64> {
        self.bytes.map(|b| b / (st.median * 1e-3) / 1e9)
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

struct Meta {
    device: String,
    compute_capability: (i32, i32),
    arch: String,
    driver: String,
    nvrtc: String,
    date: String,
    git_commit: String,
    command: String,
    warmup: usize,
    repeats: usize,
}

fn meta(gpu: &Gpu, a: &Args, command: &str) -> Meta {
    let mut v = 0i32;
    // SAFETY: the driver was initialised by Gpu::new; `v` is a valid out pointer.
    let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    let driver = if ok == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
        format!("CUDA {}.{}", v / 1000, (v % 1000) / 10)
    } else {
        "unknown".into()
    };
    let nvrtc = nvrtc_version()
        .map(|(a, b)| format!("{a}.{b}"))
        .unwrap_or_else(|_| "unknown".into());
    let git_commit = git_commit().unwrap_or_else(|| "unknown".into());
    Meta {
        device: gpu.name().to_string(),
        compute_capability: gpu.compute_capability(),
        arch: gpu.arch().to_string(),
        driver,
        nvrtc,
        date: utc_now(),
        git_commit,
        command: command.to_string(),
        warmup: a.warmup,
        repeats: a.repeats,
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| bench | shape | variant | median ms | min–max ms | TFLOP/s | GB/s | × fused |"
    );
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let fused = r.fused().median;
        for (label, st) in &r.variants {
            let gbps = r.gbps(st).map_or("–".into(), |g| format!("{g:.0}"));
            let tflops = match r.flops {
                0.0 => "–".to_string(),
                f => format!("{:.1}", f / (st.median * 1e-3) / 1e12),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.4} | {:.4}–{:.4} | {tflops} | {gbps} | {:.2} |",
                r.bench,
                r.shape,
                label,
                st.median,
                st.min,
                st.max,
                st.median / fused
            );
        }
    }
    s
}

fn markdown(m: &Meta, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# loren kernel micro-benchmarks\n");
    let _ = writeln!(
        s,
        "- device: {} (compute capability {}.{}, kernels built for {})",
        m.device, m.compute_capability.0, m.compute_capability.1, m.arch
    );
    let _ = writeln!(s, "- driver: {}; NVRTC {}", m.driver, m.nvrtc);
    let _ = writeln!(s, "- date: {}", m.date);
    let _ = writeln!(s, "- commit: {}", m.git_commit);
    let _ = writeln!(s, "- command: `{}`", m.command);
    let _ = writeln!(
        s,
        "- timing: CUDA events around each call, {} warm-up + {} timed calls, median (min–max); \
         \"× fused\" is the variant's median over the fused kernel's\n",
        m.warmup, m.repeats
    );
    s.push_str(&table(rows));
    let _ = writeln!(
        s,
        "\nTarget (issue 4): fused lora_linear ≤ 1.10× the shared-W cuBLAS GEMM alone."
    );
    for r in rows.iter().filter(|r| r.bench.starts_with("lora_linear")) {
        let Some((_, a)) = r.variants.iter().find(|(l, _)| l.starts_with("(a)")) else {
            continue;
        };
        for (label, st) in r.variants.iter().filter(|(l, _)| l.starts_with("fused")) {
            let _ = writeln!(
                s,
                "- {} {}, {label}: / cuBLAS alone = {:.2}",
                r.bench,
                r.shape,
                st.median / a.median
            );
        }
    }
    s
}

fn json(m: &Meta, rows: &[Row]) -> String {
    let mut s = String::from("{\n");
    let field = |s: &mut String, k: &str, v: String| {
        let _ = writeln!(s, "  {}: {},", json_str(k), v);
    };
    field(&mut s, "device", json_str(&m.device));
    field(
        &mut s,
        "compute_capability",
        json_str(&format!(
            "{}.{}",
            m.compute_capability.0, m.compute_capability.1
        )),
    );
    field(&mut s, "arch", json_str(&m.arch));
    field(&mut s, "driver", json_str(&m.driver));
    field(&mut s, "nvrtc", json_str(&m.nvrtc));
    field(&mut s, "date", json_str(&m.date));
    field(&mut s, "git_commit", json_str(&m.git_commit));
    field(&mut s, "command", json_str(&m.command));
    field(&mut s, "warmup", m.warmup.to_string());
    field(&mut s, "repeats", m.repeats.to_string());
    s.push_str("  \"rows\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"bench\": {}, \"shape\": {}, \"flops\": {}, \"bytes\": {}, \"variants\": [",
            json_str(&r.bench),
            json_str(&r.shape),
            json_num(r.flops),
            r.bytes.map_or("null".into(), json_num)
        );
        for (j, (label, st)) in r.variants.iter().enumerate() {
            let _ = write!(
                s,
                "{}{{\"variant\": {}, \"median_ms\": {}, \"min_ms\": {}, \"max_ms\": {}, \
                 \"tflops\": {}, \"gbps\": {}, \"over_fused\": {}}}",
                if j > 0 { ", " } else { "" },
                json_str(label),
                json_num(st.median),
                json_num(st.min),
                json_num(st.max),
                json_num(r.flops / (st.median * 1e-3) / 1e12),
                r.gbps(st).map_or("null".into(), json_num),
                json_num(st.median / r.fused().median)
            );
        }
        let _ = writeln!(s, "]}}{}", if i + 1 < rows.len() { "," } else { "" });
    }
    s.push_str("  ]\n}\n");
    s
}

fn run(gpu: &Gpu, a: &Args, command: &str) -> Result<()> {
    let m = meta(gpu, a, command);
    println!(
        "{} (cc {}.{}, {}), {}, NVRTC {}",
        m.device, m.compute_capability.0, m.compute_capability.1, m.arch, m.driver, m.nvrtc
    );
    // Each group's rows go to stderr as they are done, so a run cut short still leaves them.
    let mut rows = Vec::new();
    let mut done = |what: String, new: Vec<Row>| {
        eprint!("done: {what}\n{}", table(&new));
        rows.extend(new);
    };
    if a.only.contains(&"lora") {
        for &(k, n) in &[(768usize, 768usize), (768, 2304)] {
            for &r in &a.ranks {
                done(
                    format!("lora_linear {k}->{n} r={r}"),
                    lora_rows(gpu, a, k, n, r)?,
                );
            }
        }
    }
    if a.only.contains(&"memory") {
        done("memory-bound passes".into(), memory_rows(gpu, a)?);
    }
    if a.only.contains(&"attention") {
        let softmax = SoftmaxKernels::load(gpu)?;
        for &t in &a.seqs {
            done(
                format!("attention T={t}"),
                attention_rows(gpu, a, &softmax, t)?,
            );
        }
    }
    let t = table(&rows);
    print!("{t}");
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("kernel-bench.json"), json(&m, &rows))?;
        std::fs::write(dir.join("kernel-bench.md"), markdown(&m, &rows))?;
        println!(
            "wrote {} and {}",
            dir.join("kernel-bench.json").display(),
            dir.join("kernel-bench.md").display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// lora_linear.

fn gemm(m: usize, n: usize, k: usize) -> Gemm {
    Gemm {
        m,
        n,
        k,
        trans_a: false,
        trans_b: false,
        batch: 1,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
        alpha: 1.0,
        beta: 0.0,
    }
}

fn lora_rows(gpu: &Gpu, a: &Args, k: usize, n: usize, r: usize) -> Result<Vec<Row>> {
    let (mm, rows) = (a.members, a.rows);
    let d = LoraDims {
        members: mm,
        x_groups: mm,
        rows,
        k,
        n,
        rank: r,
    };
    let scale = 1.0f32;
    let mut al = Alloc {
        gpu,
        rng: Rng(0x10ad + (k * n * r) as u64),
    };
    let x = al.bf16(mm * rows * k, 1.0)?;
    let w = al.bf16(n * k, 0.05)?;
    let bias = al.bf16(n, 0.05)?;
    let am = al.f32(mm * r * k, 0.05)?;
    let bm = al.f32(mm * n * r, 0.05)?;
    let a16 = al.bf16(mm * r * k, 0.05)?;
    let b16 = al.bf16(mm * n * r, 0.05)?;
    let mut y = al.zeros_bf16(mm * rows * n)?;
    let mut u = al.zeros_f32(mm * rows * r)?;
    let mut u16 = al.zeros_bf16(mm * rows * r)?;
    let dy = al.bf16(mm * rows * n, 0.05)?;
    let mut v = al.zeros_f32(mm * rows * r)?;
    let mut v16 = al.zeros_bf16(mm * rows * r)?;
    let mut da = al.zeros_f32(mm * r * k)?;
    let mut db = al.zeros_f32(mm * n * r)?;
    let mut grads_ws = al.zeros_f32(lora_grads_workspace_len(&d).max(1))?;
    let mut dx = al.zeros_bf16(mm * rows * k)?;

    let shared = Gemm {
        trans_b: true,
        ..gemm(mm * rows, n, k)
    };
    let shrink = Gemm {
        trans_b: true,
        batch: mm,
        stride_a: rows * k,
        stride_b: r * k,
        stride_c: rows * r,
        ..gemm(rows, r, k)
    };
    let expand = Gemm {
        trans_b: true,
        batch: mm,
        stride_a: rows * r,
        stride_b: n * r,
        stride_c: rows * n,
        alpha: scale,
        beta: 1.0,
        ..gemm(rows, n, r)
    };
    let fwd_flops = 2.0 * (mm * rows) as f64 * (k * n + k * r + r * n) as f64;
    let shape = format!("M={mm} rows={rows} {k}->{n} r={r}");

    // The tensor-core paths this device has.
    let paths: Vec<(GemmPath, &str)> = [
        (GemmPath::MmaSync, "fused (mma.sync)"),
        (GemmPath::Wgmma, "fused (wgmma)"),
    ]
    .into_iter()
    .filter(|(p, _)| *p == GemmPath::MmaSync || gpu.has_wgmma())
    .collect();
    // The fused forward (U projection, then the GEMM) on each.
    let mut fused_f = Vec::new();
    for &(path, name) in &paths {
        let t = time(gpu, a, || {
            gpu.lora_project_u(&d, &x, &am, &mut u)?;
            gpu.lora_forward_gemm(path, &d, &x, &w, Some(&bias), &u, &bm, scale, None, &mut y)?;
            Ok(())
        })?;
        fused_f.push((name.to_string(), t));
    }
    // Where the fused forward's time goes: the GEMM with U already computed.
    let gemm_only = time(gpu, a, || {
        let path = GemmPath::MmaSync;
        gpu.lora_forward_gemm(path, &d, &x, &w, Some(&bias), &u, &bm, scale, None, &mut y)?;
        Ok(())
    })?;
    let alone_f = time(gpu, a, || {
        gpu.gemm_bf16(&shared, &x, &w, GemmOut::Bf16(&mut y))?;
        Ok(())
    })?;
    let split_f = time(gpu, a, || {
        gpu.gemm_bf16(&shared, &x, &w, GemmOut::Bf16(&mut y))?;
        gpu.gemm_bf16(&shrink, &x, &a16, GemmOut::Bf16(&mut u16))?;
        gpu.gemm_bf16(&expand, &u16, &b16, GemmOut::Bf16(&mut y))?;
        Ok(())
    })?;

    // Backward: dX = dY·W (W [N, K] is op(B) untransposed), and the per-member low-rank terms.
    let dx_shared = gemm(mm * rows, k, n);
    let v_gemm = Gemm {
        batch: mm,
        stride_a: rows * n,
        stride_b: n * r,
        stride_c: rows * r,
        alpha: scale,
        ..gemm(rows, r, n)
    };
    let da_gemm = Gemm {
        trans_a: true,
        batch: mm,
        stride_a: rows * r,
        stride_b: rows * k,
        stride_c: r * k,
        ..gemm(r, k, rows)
    };
    let db_gemm = Gemm {
        trans_a: true,
        batch: mm,
        stride_a: rows * n,
        stride_b: rows * r,
        stride_c: n * r,
        alpha: scale,
        ..gemm(n, r, rows)
    };
    let dx_low = Gemm {
        batch: mm,
        stride_a: rows * r,
        stride_b: r * k,
        stride_c: rows * k,
        beta: 1.0,
        ..gemm(rows, k, r)
    };
    let bwd_flops = 2.0 * (mm * rows) as f64 * (n * k + n * r + r * k + n * r + r * k) as f64;
    // The fused backward (V, dA, dB, then the dX GEMM) on each tensor-core path.
    let mut fused_b = Vec::new();
    for (path, name) in paths {
        let t = time(gpu, a, || {
            gpu.lora_backward(
                &d,
                &dy,
                &x,
                &w,
                &am,
                &bm,
                &u,
                scale,
                &mut v,
                Some(AdapterGrads {
                    da: &mut da,
                    db: &mut db,
                    workspace: Some(&mut grads_ws),
                }),
                None,
                None,
            )?;
            gpu.lora_backward_dx_gemm(path, &d, &dy, &w, &v, &am, None, &mut dx)?;
            Ok(())
        })?;
        fused_b.push((name.to_string(), t));
    }
    let alone_b = time(gpu, a, || {
        gpu.gemm_bf16(&dx_shared, &dy, &w, GemmOut::Bf16(&mut dx))?;
        Ok(())
    })?;
    let split_b = time(gpu, a, || {
        gpu.gemm_bf16(&dx_shared, &dy, &w, GemmOut::Bf16(&mut dx))?;
        gpu.gemm_bf16(&v_gemm, &dy, &b16, GemmOut::Bf16(&mut v16))?;
        gpu.gemm_bf16(&da_gemm, &v16, &x, GemmOut::F32(&mut da))?;
        gpu.gemm_bf16(&db_gemm, &dy, &u16, GemmOut::F32(&mut db))?;
        gpu.gemm_bf16(&dx_low, &v16, &a16, GemmOut::Bf16(&mut dx))?;
        Ok(())
    })?;
    // Each adapter product alone, with the bytes it must move: the bf16 matrix read once (the
    // per-member input here), the f32 factor read and the f32 result written.
    let (big_x, big_y) = ((mm * rows * k * 2) as f64, (mm * rows * n * 2) as f64);
    let (f_u, f_a, f_b) = (
        (mm * rows * r * 4) as f64,
        (mm * r * k * 4) as f64,
        (mm * n * r * 4) as f64,
    );
    let (u_bytes, v_bytes) = (big_x + f_a + f_u, big_y + f_b + f_u);
    let grads_bytes = big_x + big_y + 2.0 * f_u + f_a + f_b;
    let u_t = time(gpu, a, || Ok(gpu.lora_project_u(&d, &x, &am, &mut u)?))?;
    let v_t = time(gpu, a, || {
        Ok(gpu.lora_project_v(&d, &dy, &bm, scale, &mut v)?)
    })?;
    let grads_t = time(gpu, a, || {
        let grads = AdapterGrads {
            da: &mut da,
            db: &mut db,
            workspace: Some(&mut grads_ws),
        };
        Ok(gpu.lora_grads(&d, &v, &x, &dy, &u, scale, grads)?)
    })?;
    Ok(vec![
        Row {
            bench: "lora_linear forward".into(),
            shape: shape.clone(),
            variants: fused_f
                .into_iter()
                .chain([
                    ("(a) cuBLAS X·Wᵀ alone".into(), alone_f),
                    ("(b) cuBLAS X·Wᵀ + shrink + expand".into(), split_f),
                    ("part: the mma.sync GEMM alone, U given".into(), gemm_only),
                ])
                .collect(),
            flops: fwd_flops,
            bytes: None,
        },
        Row {
            bench: "lora_linear backward".into(),
            shape: shape.clone(),
            variants: fused_b
                .into_iter()
                .chain([
                    ("(a) cuBLAS dY·W alone".into(), alone_b),
                    ("(b) cuBLAS dY·W + V, dA, dB, V·A".into(), split_b),
                ])
                .collect(),
            flops: bwd_flops,
            bytes: None,
        },
        pass_row("U = X·Aᵀ", &shape, u_t, (mm * rows * k * r) as f64, u_bytes),
        pass_row(
            "V = s·dY·B",
            &shape,
            v_t,
            (mm * rows * n * r) as f64,
            v_bytes,
        ),
        pass_row(
            "dA = Vᵀ·X and dB = s·dYᵀ·U",
            &shape,
            grads_t,
            (mm * rows * (k + n) * r) as f64,
            grads_bytes,
        ),
    ])
}

/// One adapter product of the fused path, timed alone: `macs` multiply-adds of the product (the
/// kernel runs three, one per bf16 plane of its f32 operand) and the `bytes` it must move.
fn pass_row(what: &str, shape: &str, t: Stats, macs: f64, bytes: f64) -> Row {
    Row {
        bench: format!("lora pass {what}"),
        shape: shape.to_string(),
        variants: vec![("tensor cores, 3 bf16 planes".into(), t)],
        flops: 2.0 * macs,
        bytes: Some(bytes),
    }
}

// ---------------------------------------------------------------------------------------------
// Memory-bound passes.

/// The passes between the GEMMs at the ensemble's activation shapes (M·rows rows, width D = 768
/// and the MLP's 4·D): each kernel's time and the bandwidth it reaches for the bytes it must move,
/// beside a device-to-device copy of one activation (the copy's bandwidth is the practical
/// ceiling). LoRA-Ensemble's frozen MLP bias needs no gradient, so its bias+GELU backward is dx
/// alone; the explicit ensemble's per-member bias takes dx and db in one pass, shown against the
/// two passes it replaces.
fn memory_rows(gpu: &Gpu, a: &Args) -> Result<Vec<Row>> {
    let (mm, rows) = (a.members, a.rows);
    let (d, h) = (768usize, 3072usize);
    let mut al = Alloc {
        gpu,
        rng: Rng(0x6d65_6d6f_7279),
    };
    let (nd, nh) = (mm * rows * d, mm * rows * h);
    let shape = |w: usize| format!("M={mm} rows={rows} width={w}");
    let row = |bench: &str, w: usize, variants: Vec<(String, Stats)>, bytes: usize| Row {
        bench: bench.into(),
        shape: shape(w),
        variants,
        flops: 0.0,
        bytes: Some(bytes as f64),
    };
    let one = |label: &str, t: Stats| vec![(label.to_string(), t)];
    let mut out = Vec::new();

    let x = al.bf16(nd, 1.0)?;
    let mut y = al.zeros_bf16(nd)?;
    let t = time(gpu, a, || Ok(gpu.stream().memcpy_dtod(&x, &mut y)?))?;
    out.push(row("device copy (cuMemcpyDtoD)", d, one("copy", t), 4 * nd));

    // LayerNorm on x (per member), affine shared: the frozen norms of LoRA-Ensemble.
    let nd_dims = NormDims {
        groups: mm,
        x_groups: mm,
        w_groups: 1,
        rows,
        dim: d,
    };
    let (gamma, beta) = (al.f32(d, 1.0)?, al.f32(d, 0.1)?);
    let (mut mean, mut rstd) = (al.zeros_f32(mm * rows)?, al.zeros_f32(mm * rows)?);
    let t = time(gpu, a, || {
        Ok(gpu.layernorm_forward(
            &nd_dims, &x, &gamma, &beta, 1e-6, &mut y, &mut mean, &mut rstd,
        )?)
    })?;
    out.push(row("layernorm forward", d, one("vectorized", t), 4 * nd));
    let dy = al.bf16(nd, 1.0)?;
    let mut dx = al.zeros_bf16(nd)?;
    let t = time(gpu, a, || {
        Ok(gpu.layernorm_backward_dx(&nd_dims, &dy, &x, &gamma, &mean, &rstd, None, &mut dx)?)
    })?;
    out.push(row(
        "layernorm backward dx",
        d,
        one("vectorized", t),
        6 * nd,
    ));

    let t = time(gpu, a, || {
        Ok(gpu.add_bf16(rows * d, mm, mm, mm, &x, &dy, &mut y)?)
    })?;
    out.push(row("residual add", d, one("vectorized", t), 6 * nd));
    let t = time(gpu, a, || Ok(gpu.add_assign_bf16(nd, &mut dx, &dy)?))?;
    out.push(row("gradient accumulate", d, one("vectorized", t), 6 * nd));
    let bias_d = al.f32(d, 0.1)?;
    let bias = Some((&bias_d as &dyn DevicePtr<f32>, 1));
    let t = time(gpu, a, || {
        Ok(gpu.add_bias_rows_bf16(mm, rows, d, None, bias, &mut y)?)
    })?;
    out.push(row(
        "bias add (cuBLAS output)",
        d,
        one("vectorized", t),
        4 * nd,
    ));
    // Before a sublayer's beta = 1 GEMM: the stream and the bias written as its C.
    let t = time(gpu, a, || {
        let src = Some((&x as &dyn DevicePtr<bf16>, mm));
        Ok(gpu.add_bias_rows_bf16(mm, rows, d, src, bias, &mut y)?)
    })?;
    out.push(row(
        "residual + bias (as a GEMM's C)",
        d,
        one("vectorized", t),
        4 * nd,
    ));

    // bias + GELU on the MLP's hidden activation.
    let xh = al.bf16(nh, 2.0)?;
    let dyh = al.bf16(nh, 1.0)?;
    let mut yh = al.zeros_bf16(nh)?;
    let mut dxh = al.zeros_bf16(nh)?;
    let shared = BiasGeluDims {
        groups: mm,
        x_groups: mm,
        b_groups: 1,
        rows,
        n: h,
    };
    let bias_h = al.f32(mm * h, 0.1)?;
    let t = time(gpu, a, || {
        Ok(gpu.bias_gelu_forward(&shared, &xh, &bias_h, &mut yh)?)
    })?;
    out.push(row("bias+GELU forward", h, one("vectorized", t), 4 * nh));
    let t = time(gpu, a, || {
        Ok(gpu.bias_gelu_backward_dx(&shared, &dyh, &xh, &bias_h, &mut dxh)?)
    })?;
    out.push(row(
        "bias+GELU backward dx (LoRA)",
        h,
        one("vectorized", t),
        6 * nh,
    ));
    let member = BiasGeluDims {
        b_groups: mm,
        ..shared
    };
    let mut ws = al.zeros_f32(bias_gelu_db_workspace_len(&member))?;
    let mut db = al.zeros_f32(mm * h)?;
    let both = time(gpu, a, || {
        Ok(gpu.bias_gelu_backward_db(
            &member,
            &dyh,
            &xh,
            &bias_h,
            &mut ws,
            &mut db,
            false,
            Some(&mut dxh),
        )?)
    })?;
    let apart = time(gpu, a, || {
        gpu.bias_gelu_backward_dx(&member, &dyh, &xh, &bias_h, &mut dxh)?;
        Ok(gpu.bias_gelu_backward_db(&member, &dyh, &xh, &bias_h, &mut ws, &mut db, false, None)?)
    })?;
    out.push(row(
        "bias+GELU backward dx, db (explicit)",
        h,
        vec![
            ("dx and db in one pass".into(), both),
            ("dx, then db".into(), apart),
        ],
        6 * nh,
    ));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Attention.

const SOFTMAX_CU: &str = r#"
#include <cuda_bf16.h>

// One warp per row of `cols` scores: P = softmax(S), S in f32, P in bf16.
extern "C" __global__ void bench_softmax_fwd(const float* __restrict__ s,
                                             __nv_bfloat16* __restrict__ p,
                                             int rows, int cols) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* r = s + (size_t)row * cols;
    float mx = -3.0e38f;
    for (int j = lane; j < cols; j += 32) mx = fmaxf(mx, r[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int j = lane; j < cols; j += 32) sum += expf(r[j] - mx);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.f / sum;
    __nv_bfloat16* out = p + (size_t)row * cols;
    for (int j = lane; j < cols; j += 32) out[j] = __float2bfloat16(expf(r[j] - mx) * inv);
}

// dS = P * (dP - sum_j P*dP) * scale, one warp per row.
extern "C" __global__ void bench_softmax_bwd(const __nv_bfloat16* __restrict__ p,
                                             const float* __restrict__ dp,
                                             __nv_bfloat16* __restrict__ ds,
                                             int rows, int cols, float scale) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t base = (size_t)row * cols;
    float dot = 0.f;
    for (int j = lane; j < cols; j += 32) dot += __bfloat162float(p[base + j]) * dp[base + j];
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    for (int j = lane; j < cols; j += 32) {
        const float pj = __bfloat162float(p[base + j]);
        ds[base + j] = __float2bfloat16(pj * (dp[base + j] - dot) * scale);
    }
}
"#;

static SOFTMAX_SOURCE: KernelSource = KernelSource {
    file: "kernel_bench_softmax.cu",
    code: SOFTMAX_CU,
};

struct SoftmaxKernels {
    fwd: CudaFunction,
    bwd: CudaFunction,
}

impl SoftmaxKernels {
    fn load(gpu: &Gpu) -> Result<SoftmaxKernels> {
        let ptx = compile(&SOFTMAX_SOURCE, gpu.arch())?;
        let module: Arc<_> = gpu
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx.text.clone()))?;
        Ok(SoftmaxKernels {
            fwd: module.load_function("bench_softmax_fwd")?,
            bwd: module.load_function("bench_softmax_bwd")?,
        })
    }

    fn cfg(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

fn attention_rows(gpu: &Gpu, a: &Args, sm: &SoftmaxKernels, t: usize) -> Result<Vec<Row>> {
    let (g, b, h, dh) = (a.members, a.batch, 12usize, 64usize);
    let dmodel = h * dh;
    let full = g * b * t * dmodel;
    let stats = g * b * h * t;
    let dims = AttentionDims {
        groups: g,
        q_groups: g,
        k_groups: g,
        v_groups: g,
        batch: b,
        seq: t,
        heads: h,
        head_dim: dh,
        drop: None,
    };
    let mut al = Alloc {
        gpu,
        rng: Rng(0xa77e + t as u64),
    };
    // The fused kernels' layout: [G, B, T, H·dh]. The naive path's: head-major [G·B·H, T, dh].
    let q = al.bf16(full, 1.0)?;
    let k = al.bf16(full, 1.0)?;
    let v = al.bf16(full, 1.0)?;
    let d_o = al.bf16(full, 0.1)?;
    let mut o = al.zeros_bf16(full)?;
    let mut lse = al.zeros_f32(stats)?;
    let mut delta = al.zeros_f32(stats)?;
    let mut dq = al.zeros_bf16(full)?;
    let mut dk = al.zeros_bf16(full)?;
    let mut dv = al.zeros_bf16(full)?;
    let batches = g * b * h;
    let mut s = al.zeros_f32(batches * t * t)?;
    let mut p = al.zeros_bf16(batches * t * t)?;
    let mut ds = al.zeros_bf16(batches * t * t)?;
    let mut oh = al.zeros_bf16(full)?;

    let scale = 1.0 / (dh as f32).sqrt();
    let batched = |m: usize, n: usize, kk: usize, sa: usize, sb: usize, sc: usize| Gemm {
        batch: batches,
        stride_a: sa,
        stride_b: sb,
        stride_c: sc,
        ..gemm(m, n, kk)
    };
    let qk = Gemm {
        trans_b: true,
        alpha: scale,
        ..batched(t, t, dh, t * dh, t * dh, t * t)
    };
    let pv = batched(t, dh, t, t * t, t * dh, t * dh);
    let rows_i = (batches * t) as i32;
    let cols_i = t as i32;
    let cfg = SoftmaxKernels::cfg(batches * t);
    let fwd_flops = 4.0 * (g * b) as f64 * (t * t) as f64 * dmodel as f64;
    let shape = format!("G={g} B={b} T={t} H={h} dh={dh}");

    let fused_f = time(gpu, a, || {
        gpu.attention_forward(&dims, &q, &k, &v, &mut o, &mut lse)?;
        Ok(())
    })?;
    // MC Dropout's variant: every score hashed, a fifth of them dropped (the paper's rate), each
    // batch row by its image's key, as a prediction draws them.
    let keys: Vec<u64> = (0..b as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let items = gpu.stream().clone_htod(&keys)?;
    let dropping = AttentionDims {
        drop: Some(AttentionDrop {
            threshold: (0.2 * 4_294_967_296.0f64).round() as u32,
            seed: 7,
            items: Some(&items),
        }),
        ..dims
    };
    let dropkey_f = time(gpu, a, || {
        gpu.attention_forward(&dropping, &q, &k, &v, &mut o, &mut lse)?;
        Ok(())
    })?;
    let naive_f = time(gpu, a, || {
        gpu.gemm_bf16(&qk, &q, &k, GemmOut::F32(&mut s))?;
        let mut l = gpu.stream().launch_builder(&sm.fwd);
        l.arg(&s).arg(&mut p).arg(&rows_i).arg(&cols_i);
        // SAFETY: S and P hold rows·cols elements; one warp per row stays inside its row.
        unsafe { l.launch(cfg) }?;
        gpu.gemm_bf16(&pv, &p, &v, GemmOut::Bf16(&mut oh))?;
        Ok(())
    })?;

    // Backward. `s` now holds dP (f32); `p` the forward's P.
    let dp_gemm = Gemm {
        trans_b: true,
        ..batched(t, t, dh, t * dh, t * dh, t * t)
    };
    let dv_gemm = Gemm {
        trans_a: true,
        ..batched(t, dh, t, t * t, t * dh, t * dh)
    };
    let dq_gemm = batched(t, dh, t, t * t, t * dh, t * dh);
    let dk_gemm = Gemm {
        trans_a: true,
        ..batched(t, dh, t, t * t, t * dh, t * dh)
    };
    // O and LSE are the DropKey forward's: the backward's time does not depend on their values.
    let fused_b = time(gpu, a, || {
        gpu.attention_backward(
            &dims, &d_o, &q, &k, &v, &o, &lse, &mut delta, &mut dq, &mut dk, &mut dv,
        )?;
        Ok(())
    })?;
    let dropkey_b = time(gpu, a, || {
        gpu.attention_backward(
            &dropping, &d_o, &q, &k, &v, &o, &lse, &mut delta, &mut dq, &mut dk, &mut dv,
        )?;
        Ok(())
    })?;
    let naive_b = time(gpu, a, || {
        gpu.gemm_bf16(&dp_gemm, &d_o, &v, GemmOut::F32(&mut s))?;
        gpu.gemm_bf16(&dv_gemm, &p, &d_o, GemmOut::Bf16(&mut dv))?;
        let mut l = gpu.stream().launch_builder(&sm.bwd);
        l.arg(&p)
            .arg(&s)
            .arg(&mut ds)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&scale);
        // SAFETY: P, dP and dS hold rows·cols elements; one warp per row stays inside its row.
        unsafe { l.launch(cfg) }?;
        gpu.gemm_bf16(&dq_gemm, &ds, &k, GemmOut::Bf16(&mut dq))?;
        gpu.gemm_bf16(&dk_gemm, &ds, &q, GemmOut::Bf16(&mut dk))?;
        Ok(())
    })?;
    Ok(vec![
        Row {
            bench: "attention forward".into(),
            shape: shape.clone(),
            variants: vec![
                ("fused".into(), fused_f),
                ("fused, DropKey 0.2 (MC Dropout)".into(), dropkey_f),
                ("naive: cuBLAS Q·Kᵀ, softmax, cuBLAS P·V".into(), naive_f),
            ],
            flops: fwd_flops,
            bytes: None,
        },
        Row {
            bench: "attention backward".into(),
            shape,
            variants: vec![
                ("fused".into(), fused_b),
                ("fused, DropKey 0.2 (MC Dropout)".into(), dropkey_b),
                ("naive: 4 cuBLAS GEMMs + softmax backward".into(), naive_b),
            ],
            flops: 2.0 * fwd_flops,
            bytes: None,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> std::result::Result<Args, String> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn arguments_parse() {
        let a = args(&["--out", "x", "--ranks", "4,8", "--repeats", "7"]).unwrap();
        assert_eq!(a.ranks, [4, 8]);
        assert_eq!(a.repeats, 7);
        assert_eq!(a.out, Some(PathBuf::from("x")));
        assert!(args(&["--ranks", "0"]).is_err());
        assert!(args(&["--bogus"]).is_err());
        assert!(args(&["--out"]).is_err());
        assert_eq!(args(&["--help"]).unwrap_err(), "");
        assert_eq!(args(&[]).unwrap().only, GROUPS);
        assert_eq!(
            args(&["--only", "memory,lora"]).unwrap().only,
            ["memory", "lora"]
        );
        assert!(args(&["--only", "gemm"]).is_err());
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(Stats::new(vec![3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Stats::new(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }

    #[test]
    fn json_is_escaped() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(json_num(f64::NAN), "null");
    }
}
