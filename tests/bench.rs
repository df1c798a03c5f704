//! `loren bench` end to end on the CPU: a quick run on tiny, the OOM prediction path, the SVG and
//! JSON it writes, and bad input.

mod svg_check;

use std::path::PathBuf;
use std::process::Command;

use loren::bench::{BenchOptions, duration, run_bench, svg, table, write};
use loren_nn::config::{Method, VitConfig};
use loren_tensor::DeviceSpec;

fn quick(members: Vec<usize>) -> BenchOptions {
    BenchOptions {
        device: DeviceSpec::Cpu,
        configs: Some(vec!["tiny".into()]),
        members,
        warmup: 0,
        repeats: 1,
        peak_size: Some(128),
        ..BenchOptions::default()
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loren-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn bench_runs_end_to_end_on_tiny_with_two_members() {
    let mut said = Vec::new();
    let report = run_bench(&quick(vec![2]), &mut |l| said.push(l.to_string())).unwrap();
    assert_eq!(report.rows.len(), 2);
    // Each row's progress line gives its times as the table does.
    for row in &report.rows {
        let times = format!(
            "tiny {} M=2: step {}, inference {},",
            row.method,
            duration(row.train.as_ref().unwrap().median),
            duration(row.inference.as_ref().unwrap().median)
        );
        assert!(
            said.iter().any(|l| l.contains(&times)),
            "{times}\n{said:#?}"
        );
    }
    // A 128-wide peak GEMM is said to be too small for MFU to mean much.
    assert!(
        report.note.contains("MFU over it overstates"),
        "{}",
        report.note
    );
    for row in &report.rows {
        assert_eq!(row.status, "ok", "{row:?}");
        assert_eq!(row.members, 2);
        let t = row.train.as_ref().unwrap();
        assert!(t.median > 0.0 && t.min <= t.median && t.median <= t.max);
        assert!(row.images_per_s.unwrap() > 0.0);
        assert_eq!(
            row.member_images_per_s.unwrap(),
            2.0 * row.images_per_s.unwrap()
        );
        assert!(row.train_mfu.unwrap() > 0.0);
        assert!(row.train_flops.backward > 0.0 && row.inference_flops > 0.0);
        // Each rate is its own counted FLOPs over its own median, each MFU its own rate over
        // the peak.
        let peak = report.peak.as_ref().unwrap().flops_per_s;
        let (tf, inf) = (
            row.train_flops_per_s.unwrap(),
            row.inference_flops_per_s.unwrap(),
        );
        assert_eq!(tf, row.train_flops.total() / t.median);
        assert_eq!(
            inf,
            row.inference_flops / row.inference.as_ref().unwrap().median
        );
        assert_eq!(row.train_mfu.unwrap(), tf / peak);
        assert_eq!(row.inference_mfu.unwrap(), inf / peak);
        // The analytic model is exact on the CPU's accounting.
        let measured = row.train_memory.as_ref().unwrap().total_peak;
        assert_eq!(measured, row.predicted_train_peak, "{}", row.method);
        assert_eq!(row.inference_peak.unwrap(), row.predicted_inference_peak);
        assert!(row.device_memory_used.is_none());
    }
    // Explicit trains every weight: more FLOPs per step than LoRA at the same M.
    let flops = |m: Method| {
        report
            .rows
            .iter()
            .find(|r| r.method == m)
            .unwrap()
            .train_flops
            .total()
    };
    assert!(flops(Method::Explicit) > flops(Method::Lora));
    assert!(report.peak.as_ref().unwrap().flops_per_s > 0.0);
    assert!(report.note.contains("CPU"));

    let t = table(&report);
    assert!(
        t.contains("GFLOP/s") && t.contains("lora") && t.contains("explicit"),
        "{t}"
    );
    assert!(
        t.contains(
            "FLOPs: matrix products only, 2mnk each, as executed; attention's backward counts \
             the scores it computes again (10·B·T²·D per block and member, FlashAttention's \
             convention);"
        ),
        "{t}"
    );
    let drawn = svg(&report);
    svg_check::check_svg(&drawn).unwrap();
    // Its ticks are in µs, ms or s: the axis is titled for what it measures, not one unit.
    assert!(drawn.contains(">time</text>") && !drawn.contains(">seconds<"));

    let dir = temp_dir("bench");
    write(&report, &dir).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("bench.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 2);
    assert_eq!(json["rows"][0]["status"], "ok");
    assert!(json["info"]["date"].as_str().unwrap().ends_with('Z'));
    svg_check::check_svg(&std::fs::read_to_string(dir.join("bench.svg")).unwrap()).unwrap();
    // The Markdown copy says where and when, and holds the table as it prints.
    let md = std::fs::read_to_string(dir.join("bench.md")).unwrap();
    assert!(md.starts_with("# loren bench\n"), "{md}");
    assert!(
        md.contains(&format!(
            "- date: {}",
            json["info"]["date"].as_str().unwrap()
        )),
        "{md}"
    );
    assert!(md.contains(table(&report).trim_end()), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--breakdown`: every op of the step is named, as often as the model runs it, and the stages
/// around the tape are there once.
#[test]
fn the_breakdown_names_each_op_as_often_as_the_step_runs_it() {
    let opts = BenchOptions {
        breakdown: true,
        repeats: 2,
        ..quick(vec![2])
    };
    let report = run_bench(&opts, &mut |_| {}).unwrap();
    let depth = VitConfig::by_name("tiny").unwrap().depth as f64;
    for row in &report.rows {
        let ops = row.breakdown.as_ref().expect("a breakdown per row");
        let calls = |phase: &str, op: &str| {
            ops.iter()
                .find(|o| o.phase == phase && o.op == op)
                .map_or(0.0, |o| o.calls)
        };
        let (adapted, plain) = match row.method {
            // q, k, v and the output projection carry adapters; fc1, fc2, the patch embedding
            // and the heads do not.
            Method::Lora => (4.0 * depth, 2.0 * depth + 2.0),
            _ => (0.0, 6.0 * depth + 2.0),
        };
        // Both residuals join the stream in the product before them: no add op.
        assert_eq!(calls("forward", "add"), 0.0, "{ops:?}");
        assert_eq!(calls("forward", "lora_linear"), adapted, "{ops:?}");
        assert_eq!(calls("forward", "linear"), plain, "{ops:?}");
        assert_eq!(calls("forward", "attention"), depth, "{ops:?}");
        assert_eq!(calls("backward", "attention"), depth, "{ops:?}");
        assert_eq!(calls("backward", "lora_linear"), adapted, "{ops:?}");
        for stage in [
            ("forward", "images in, gradients zeroed"),
            ("forward", "loss copied out"),
            ("backward", "gradients into the parameters"),
            ("update", "optimizer step, clipping"),
        ] {
            assert_eq!(calls(stage.0, stage.1), 1.0, "{stage:?} in {ops:?}");
        }
        assert!(
            ops.iter().all(|o| o.seconds >= 0.0) && ops.iter().any(|o| o.seconds > 0.0),
            "{ops:?}"
        );
        assert!(
            ops.windows(2).all(|w| w[0].seconds >= w[1].seconds),
            "{ops:?}"
        );
    }
    let t = table(&report);
    assert!(t.contains("where the step goes: tiny lora M=2"), "{t}");
    assert!(t.contains("where the step goes: tiny explicit M=2"), "{t}");
}

#[test]
fn a_configuration_predicted_not_to_fit_is_reported_as_oom_without_running() {
    // 20 MiB holds nothing once the CPU's 256 MiB allowance is counted: every row is predicted
    // out of memory, and the larger sizes are skipped after the first.
    let opts = BenchOptions {
        memory_budget: Some(20 << 20),
        ..quick(vec![1, 4, 32])
    };
    let mut ran = Vec::new();
    let report = run_bench(&opts, &mut |what| ran.push(what.to_string())).unwrap();
    assert_eq!(report.rows.len(), 6);
    for row in &report.rows {
        assert_eq!(row.status, "oom", "{row:?}");
        assert!(row.train.is_none() && row.train_memory.is_none());
        let note = row.note.as_deref().unwrap();
        assert!(
            note.starts_with(&format!("OOM at M={}", row.members)),
            "{note}"
        );
        assert!(row.predicted_train_peak > 0);
    }
    assert!(
        report.rows[0]
            .note
            .as_deref()
            .unwrap()
            .contains("predicted to need")
    );
    assert!(
        report.rows[1]
            .note
            .as_deref()
            .unwrap()
            .contains("did not fit already")
    );
    // Only the peak GEMM ran.
    assert!(
        ran.iter().all(|w| w.starts_with("measuring the peak")),
        "{ran:?}"
    );
    let t = table(&report);
    assert!(t.contains("OOM at M=32"), "{t}");
    svg_check::check_svg(&svg(&report)).unwrap();
}

#[test]
fn a_budget_between_sizes_runs_the_small_ones_and_stops_at_the_first_that_does_not_fit() {
    // Predicted needs on the CPU are 2x the accounted peak + 256 MiB; tiny LoRA at M=1 peaks at
    // a few MiB, at M=32 near 190 MiB.
    let opts = BenchOptions {
        methods: vec![Method::Lora],
        memory_budget: Some(300 << 20),
        ..quick(vec![1, 32])
    };
    let report = run_bench(&opts, &mut |_| {}).unwrap();
    assert_eq!(report.rows[0].status, "ok");
    assert_eq!(report.rows[1].status, "oom");
    assert!(table(&report).contains("OOM at M=32"));
}

#[test]
fn bad_options_are_errors() {
    for (opts, what) in [
        (quick(vec![0]), "--members"),
        (
            BenchOptions {
                repeats: 0,
                ..quick(vec![1])
            },
            "--repeats",
        ),
        (
            BenchOptions {
                configs: Some(vec!["vit-huge".into()]),
                ..quick(vec![1])
            },
            "vit-huge",
        ),
        (
            BenchOptions {
                methods: vec![Method::Single],
                ..quick(vec![1])
            },
            "single",
        ),
    ] {
        let e = run_bench(&opts, &mut |_| {}).unwrap_err();
        assert!(format!("{e:#}").contains(what), "{e:#}");
    }
}

/// A size the engine does not build is refused before the first row is measured: refused
/// after it, the rows measured would be lost with the report.
#[test]
fn a_size_beyond_the_engine_is_refused_before_anything_is_measured() {
    let e = run_bench(&quick(vec![1, 999_999_999]), &mut |what| {
        panic!("measured {what} before refusing")
    })
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("M = 999999999")
            && format!("{e:#}").contains("more than loren builds"),
        "{e:#}"
    );
}

fn loren(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(args)
        .output()
        .expect("the loren binary runs")
}

#[test]
fn the_command_line_runs_and_writes_its_outputs() {
    let dir = temp_dir("bench-cli");
    let out = loren(&[
        "bench",
        "--device",
        "cpu",
        "--members",
        "1,2",
        "--methods",
        "lora",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--peak-size",
        "64",
        "-q",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("defaulted to tiny"), "{stdout}");
    assert!(dir.join("bench.json").exists() && dir.join("bench.svg").exists());

    let out = loren(&[
        "bench",
        "--device",
        "cpu",
        "--memory-budget",
        "1MiB",
        "--repeats",
        "1",
        "--peak-size",
        "64",
        "-q",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("OOM at M=1") && stdout.contains("OOM at M=32"),
        "{stdout}"
    );

    let out = loren(&[
        "bench",
        "--device",
        "cpu",
        "--members",
        "2",
        "--methods",
        "lora",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--peak-size",
        "64",
        "--recompute",
        "-q",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("block activations recomputed in the backward"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("bench.json")).unwrap()).unwrap();
    assert_eq!(json["activations"], "recompute");
    // Said plainly: what is left out, and how attention's backward is counted.
    assert!(
        stdout.contains(
            "FLOPs: matrix products only, 2mnk each, model FLOPs: the blocks' forwards that \
             --recompute runs a second time in the backward are left out; attention's backward \
             counts the scores it computes again"
        ),
        "{stdout}"
    );
    let flops = &json["rows"][0]["train_flops"];
    assert!(flops["recomputed"].as_f64().unwrap() > 0.0, "{flops}");

    for bad in [
        vec!["bench", "--members", "0"],
        vec!["bench", "--memory-budget", "lots"],
        vec!["bench", "--methods", "bagging"],
        vec!["bench", "--device", "tpu"],
    ] {
        let out = loren(&bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?}");
        assert!(
            stderr.starts_with("error:") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
