//! `loren memprofile` on the CPU: measured peaks by tag beside the analytic model, LoRA growing
//! by adapters and heads alone, the OOM and predict-only paths, and the SVG.

mod svg_check;

use loren::bench::need_for_peak;
use loren::memprofile::{MemprofileOptions, run_memprofile, svg, table, write};
use loren_nn::config::{Activations, Method};
use loren_tensor::{Device, DeviceSpec, MemTag};

fn tiny(members: Vec<usize>) -> MemprofileOptions {
    MemprofileOptions {
        device: DeviceSpec::Cpu,
        configs: Some(vec!["tiny".into()]),
        members,
        batch: 8,
        ..MemprofileOptions::default()
    }
}

/// A size the engine does not build is refused before the first row is measured, as bench
/// refuses it: refused after, the rows measured would be lost with the report.
#[test]
fn a_size_beyond_the_engine_is_refused_before_anything_is_measured() {
    let e = run_memprofile(&tiny(vec![1, 999_999_999]), &mut |what| {
        panic!("measured {what} before refusing")
    })
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("M = 999999999")
            && format!("{e:#}").contains("more than loren builds"),
        "{e:#}"
    );
}

#[test]
fn measured_peaks_match_the_analytic_model_and_lora_grows_by_adapters_and_heads() {
    let r = run_memprofile(&tiny(vec![1, 3, 6]), &mut |_| {}).unwrap();
    assert_eq!(r.rows.len(), 6);
    for row in &r.rows {
        assert_eq!(row.status, "measured", "{row:?}");
        assert_eq!(row.warmup, 1);
        let m = row.measured.as_ref().unwrap();
        for tag in MemTag::ALL {
            assert_eq!(row.predicted.by_tag.get(tag), m.by_tag.get(tag), "{tag}");
        }
        assert_eq!(row.rel_diff_total, Some(0.0));
        assert!(row.device_used.is_none());
    }
    assert_eq!(r.max_rel_diff_total, Some(0.0));

    // The trainable state grows by the adapters and the head per LoRA member, a whole model per
    // explicit member; the frozen backbone does not grow.
    let at = |method: Method, m: usize| {
        let row = r
            .rows
            .iter()
            .find(|x| x.method == method && x.members == m)
            .unwrap();
        row.measured.as_ref().unwrap().by_tag
    };
    let lora = r.growth.iter().find(|g| g.method == Method::Lora).unwrap();
    let explicit = r
        .growth
        .iter()
        .find(|g| g.method == Method::Explicit)
        .unwrap();
    let adapters_and_head =
        4 * (lora.params.adapters_per_member + lora.params.head_per_member) as u64;
    assert_eq!(lora.trainable_bytes_per_member, adapters_and_head);
    assert_eq!(
        explicit.trainable_bytes_per_member,
        4 * (explicit.params.backbone + explicit.params.head_per_member) as u64
    );
    for (g, method) in [(lora, Method::Lora), (explicit, Method::Explicit)] {
        let (a, b) = (at(method, 1), at(method, 6));
        assert_eq!(
            b.get(MemTag::Trainable) - a.get(MemTag::Trainable),
            5 * g.trainable_bytes_per_member
        );
        assert_eq!(
            b.get(MemTag::OptimizerState) - a.get(MemTag::OptimizerState),
            5 * 2 * g.trainable_bytes_per_member
        );
        assert_eq!(
            b.get(MemTag::FrozenWeights),
            a.get(MemTag::FrozenWeights),
            "{method}"
        );
        assert_eq!(
            g.measured_trainable_bytes_per_member.unwrap(),
            g.trainable_bytes_per_member as f64
        );
        assert_eq!(
            g.measured_optimizer_bytes_per_member.unwrap(),
            g.optimizer_bytes_per_member as f64,
            "{method}"
        );
        // AdamW's two f32 moments, and one f32 gradient, per trainable value.
        let trainable = g.trainable_bytes_per_member;
        assert_eq!(g.optimizer_bytes_per_member, 2 * trainable, "{method}");
        assert_eq!(g.gradient_bytes_per_member, trainable, "{method}");
    }
    assert!(lora.trainable_bytes_per_member * 5 < explicit.trainable_bytes_per_member);

    let t = table(&r);
    assert!(t.contains(" n/a") && t.contains("+0.00%"), "{t}");
    assert!(t.contains("after 1 warm-up step for tiny"), "{t}");
    assert!(t.contains("adapters") && t.contains("a full model"), "{t}");
    // Each tag peaks at its own moment: the note says why the columns add up to more than total.
    assert!(
        t.contains(
            "tag columns: each tag's own peak, reached at different moments of the step; total: \
             the peak of all tags together, so the tag columns can add up to more than it;"
        ),
        "{t}"
    );
    svg_check::check_svg(&svg(&r)).unwrap();
    let dir = std::env::temp_dir().join(format!("loren-test-memprofile-{}", std::process::id()));
    write(&r, &dir).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("memprofile.json")).unwrap()).unwrap();
    assert!(
        json["rows"][0]["measured"]["by_tag"]["trainable"]
            .as_u64()
            .unwrap()
            > 0
    );
    svg_check::check_svg(&std::fs::read_to_string(dir.join("memprofile.svg")).unwrap()).unwrap();
    // The Markdown copy says where and when, and holds the table as it prints.
    let md = std::fs::read_to_string(dir.join("memprofile.md")).unwrap();
    assert!(md.starts_with("# loren memprofile\n"), "{md}");
    assert!(
        md.contains(&format!(
            "- date: {}",
            json["info"]["date"].as_str().unwrap()
        )),
        "{md}"
    );
    assert!(md.contains(table(&r).trim_end()), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--device auto` beside a GPU it cannot use profiles on the CPU and says why: the emulated
/// GPU (`scripts/emulated-gpu.sh memprofile`, which sets LOREN_EMULATED_GPU) made one of compute
/// capability 7.0, which a real GPU cannot be made.
#[test]
fn on_the_emulated_gpu_too_old_auto_says_why_it_took_the_cpu() {
    if std::env::var_os("LOREN_EMULATED_GPU").is_none() {
        println!("skipped: needs the emulated GPU (scripts/emulated-gpu.sh memprofile)");
        return;
    }
    let out = std::env::temp_dir().join(format!("loren-auto-cpu-{}", std::process::id()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(["memprofile", "--config", "tiny", "--members", "1"])
        .args(["--methods", "lora", "--device", "auto", "-q", "--out"])
        .arg(&out)
        .env("LOREN_FAKE_CC", "7.0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    let said = "--device auto: running on the CPU, as the GPU here cannot be used: ";
    assert_eq!(err.matches(said).count(), 1, "{err}");
    assert!(err.contains("compute capability 7.0"), "{err}");
    let table = std::fs::read_to_string(out.join("memprofile.md")).unwrap();
    assert!(table.contains("cpu"), "{table}");
}

/// On a GPU, where weight matrices and activations are bf16, the ops make temporaries of their
/// own and the optimizer keeps a table of its tensors, the model predicts every tag's measured
/// peak to the byte, for both methods.
#[test]
fn on_a_gpu_measured_peaks_match_the_analytic_model_by_tag() {
    if let Err(e) = loren_kernels::cuda_available() {
        loren_kernels::skip_without_gpu(format!("no CUDA device ({e})"));
        return;
    }
    let o = MemprofileOptions {
        device: DeviceSpec::Cuda(0),
        batch: 4,
        ..tiny(vec![1, 2])
    };
    let r = run_memprofile(&o, &mut |_| {}).unwrap();
    assert_eq!(r.rows.len(), 4);
    for row in &r.rows {
        assert_eq!(row.status, "measured", "{row:?}");
        assert!(row.device_used.is_some(), "{row:?}");
        let m = row.measured.as_ref().unwrap();
        for tag in MemTag::ALL {
            let (want, got) = (row.predicted.by_tag.get(tag), m.by_tag.get(tag));
            assert_eq!(want, got, "{} M={} {tag}", row.method, row.members);
        }
        assert_eq!(
            row.predicted.total, m.total,
            "{} M={}",
            row.method, row.members
        );
    }
}

#[test]
fn recomputed_blocks_are_measured_and_predicted_alike_and_keep_less() {
    let run = |activations| {
        let o = MemprofileOptions {
            activations,
            ..tiny(vec![4])
        };
        run_memprofile(&o, &mut |_| {}).unwrap()
    };
    let (kept, again) = (run(Activations::Keep), run(Activations::Recompute));
    assert_eq!(again.activations, Activations::Recompute);
    assert!(table(&again).contains("block activations recomputed"));
    assert!(!table(&kept).contains("recomputed in the backward"));
    // A profile that keeps the activations also predicts what recomputing would take.
    assert!(table(&kept).contains("with --recompute"));
    assert!(!table(&again).contains("with --recompute"));
    assert_eq!(
        kept.ratios[0].predicted_recompute,
        Some(again.ratios[0].predicted)
    );
    assert_eq!(again.ratios[0].predicted_recompute, None);
    for (k, a) in kept.rows.iter().zip(&again.rows) {
        assert_eq!(k.predicted_recompute_total, Some(a.predicted.total));
        assert_eq!(k.predicted_recompute_gpu_total, Some(a.predicted_gpu_total));
        assert_eq!(a.predicted_recompute_total, None);
        let (km, am) = (k.measured.as_ref().unwrap(), a.measured.as_ref().unwrap());
        for tag in MemTag::ALL {
            assert_eq!(a.predicted.by_tag.get(tag), am.by_tag.get(tag), "{tag}");
        }
        // The weights and their state do not change; the activations fall.
        for tag in [MemTag::Trainable, MemTag::Gradients, MemTag::OptimizerState] {
            assert_eq!(km.by_tag.get(tag), am.by_tag.get(tag), "{tag}");
        }
        let (ka, aa) = (
            km.by_tag.get(MemTag::Activations),
            am.by_tag.get(MemTag::Activations),
        );
        assert!(2 * aa < ka, "{}: {aa} recomputed vs {ka} kept", k.method);
    }
}

#[test]
fn the_cpu_accounting_is_the_same_with_and_without_a_warm_up_step() {
    let peaks = |warmup| {
        let o = MemprofileOptions {
            warmup: Some(warmup),
            ..tiny(vec![2])
        };
        let r = run_memprofile(&o, &mut |_| {}).unwrap();
        r.rows
            .iter()
            .map(|row| {
                let m = row.measured.as_ref().unwrap();
                (m.by_tag, m.total)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(peaks(0), peaks(2));
}

#[test]
fn predict_only_and_oom_rows_need_no_measurement() {
    let o = MemprofileOptions {
        configs: Some(vec!["tiny".into(), "vit-b-16".into()]),
        measure: Some(Vec::new()),
        ..tiny(vec![1, 32])
    };
    let mut ran = 0;
    let r = run_memprofile(&o, &mut |_| ran += 1).unwrap();
    assert_eq!(ran, 0);
    assert_eq!(r.rows.len(), 8);
    assert!(
        r.rows
            .iter()
            .all(|x| x.status == "predicted" && x.measured.is_none())
    );
    // ViT-B/16 explicit at M=32 is far beyond this machine; the model still gives its figure.
    let big = r
        .rows
        .iter()
        .find(|x| x.config == "vit-b-16" && x.method == Method::Explicit && x.members == 32)
        .unwrap();
    assert!(big.predicted.total > 32 * 4 * 85_000_000 * 4);
    // On a GPU the bf16 activations and frozen weights shrink LoRA's peak more than explicit's.
    let ratio = r.ratios.iter().find(|q| q.config == "vit-b-16").unwrap();
    assert!(ratio.predicted_gpu < ratio.predicted && ratio.predicted < 1.0);
    svg_check::check_svg(&svg(&r)).unwrap();

    let o = MemprofileOptions {
        memory_budget: Some(1 << 20),
        ..tiny(vec![1, 2])
    };
    let r = run_memprofile(&o, &mut |_| panic!("nothing fits: nothing runs")).unwrap();
    assert!(r.rows.iter().all(|x| x.status == "oom"));
    assert!(table(&r).contains("OOM at M=2"));
    assert!(
        !table(&r).contains("fits with --recompute"),
        "1 MiB fits neither way"
    );

    // A budget that only recomputed blocks fit: the note says so, with the need.
    let need = |activations| {
        let o = MemprofileOptions {
            activations,
            measure: Some(Vec::new()),
            ..tiny(vec![4])
        };
        let r = run_memprofile(&o, &mut |_| {}).unwrap();
        let lora = r.rows.iter().find(|x| x.method == Method::Lora).unwrap();
        need_for_peak(lora.predicted.total, &Device::cpu())
    };
    let (kept, recomputed) = (need(Activations::Keep), need(Activations::Recompute));
    assert!(recomputed < kept);
    let o = MemprofileOptions {
        memory_budget: Some((kept + recomputed) / 2),
        methods: vec![Method::Lora],
        ..tiny(vec![4])
    };
    let r = run_memprofile(&o, &mut |_| panic!("predicted not to fit: nothing runs")).unwrap();
    let note = r.rows[0].note.as_deref().unwrap();
    assert!(note.contains("fits with --recompute"), "{note}");
}

#[test]
fn a_single_network_is_one_row_measured_beside_whichever_sizes_are() {
    let o = MemprofileOptions {
        methods: vec![Method::Single, Method::SingleLora, Method::Lora],
        measure: Some(vec![3]),
        ..tiny(vec![2, 3])
    };
    let r = run_memprofile(&o, &mut |_| {}).unwrap();
    let rows = |method| {
        r.rows
            .iter()
            .filter(|x| x.method == method)
            .map(|x| (x.members, x.status.as_str()))
            .collect::<Vec<_>>()
    };
    assert_eq!(rows(Method::Single), [(1, "measured")]);
    assert_eq!(rows(Method::SingleLora), [(1, "measured")]);
    assert_eq!(rows(Method::Lora), [(2, "predicted"), (3, "measured")]);
    assert_eq!(r.growth.len(), 1, "only the ensemble grows by members");
    let lines = table(&r);
    assert_eq!(lines.matches("tiny    single ").count(), 1, "{lines}");
}

#[test]
fn the_command_line_profiles_and_rejects_bad_input() {
    let dir =
        std::env::temp_dir().join(format!("loren-test-memprofile-cli-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loren"))
        .args([
            "memprofile",
            "--device",
            "cpu",
            "--config",
            "tiny",
            "--members",
            "1,2",
        ])
        .args(["--batch-size", "4", "-q", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("What one more member adds"), "{stdout}");
    assert!(dir.join("memprofile.svg").exists());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(["memprofile", "--config", "tiny", "--members", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error:"));
    let _ = std::fs::remove_dir_all(&dir);
}
