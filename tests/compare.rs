//! `loren compare` end to end, at several ensemble sizes: the table, the JSON, and what each
//! method adds per member.

use std::process::Command;

use serde_json::Value;

mod svg_check;

/// An empty folder of this test process's own.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    let out = std::env::temp_dir().join(format!("loren-compare-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    out
}

/// `loren compare ARGS -q --out OUT`, which must succeed: what it printed.
fn compare_into(out: &std::path::Path, args: &[&str]) -> String {
    loren_into("compare", out, args)
}

/// `loren compare ARGS --out OUT`, succeeding or not.
fn compare_in(out: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loren"))
        .arg("compare")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("the loren binary runs")
}

/// `loren COMMAND ARGS -q --out OUT`, which must succeed: what it printed.
fn loren_into(command: &str, out: &std::path::Path, args: &[&str]) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_loren"))
        .arg(command)
        .args(args)
        .args(["-q", "--out"])
        .arg(out)
        .output()
        .expect("the loren binary runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8_lossy(&run.stdout).into_owned()
}

#[test]
fn compare_at_several_sizes_shows_lora_growing_slower_than_explicit() {
    let out = fresh_dir("sizes");
    let stdout = compare_into(
        &out,
        &[
            "--methods",
            "single,explicit,lora",
            "--sizes",
            "1,3",
            "--method-lr",
            "explicit=5e-4",
            "--lr",
            "2e-3",
            "--epochs",
            "1",
            "--no-shift",
            "--no-ood",
        ],
    );

    assert!(
        stdout.lines().next().is_some_and(|l| l.contains(" ECE@T ")),
        "{stdout}"
    );
    // The ECE's bins said once, under the table; no paper ECE without a seed summary.
    let legend = "ECE: top-label, 15 equal-width bins, on the mean of the members' probabilities; \
                  ECE@T: the same after temperature scaling fitted on validation\n";
    assert_eq!(stdout.matches(legend).count(), 1, "{stdout}");
    assert!(!stdout.contains("paper ECE"), "{stdout}");
    // Each method once, at the rate given for it, over --lr, over the defaults.
    assert!(
        stdout.contains("peak learning rates: single 2e-3, explicit 5e-4, lora 2e-3\n"),
        "{stdout}"
    );
    // One single network, and each ensemble method at both sizes.
    let json: Value =
        serde_json::from_slice(&std::fs::read(out.join("compare.json")).unwrap()).unwrap();
    let rows: Vec<(String, u64, u64, u64)> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["members"].as_u64().unwrap(),
                r["trainable_params"].as_u64().unwrap(),
                r["memory"]["total_peak"].as_u64().unwrap(),
            )
        })
        .collect();
    let names: Vec<(&str, u64)> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(
        names,
        [
            ("single", 1),
            ("explicit", 1),
            ("explicit", 3),
            ("lora", 1),
            ("lora", 3)
        ]
    );
    for dir in ["single", "explicit-M1", "explicit-M3", "lora-M1", "lora-M3"] {
        assert!(out.join(dir).join("report.json").exists(), "{dir}");
    }

    // Per member: a whole model for explicit, adapters and a head for lora.
    let per_member = |m: &str, field: fn(&(String, u64, u64, u64)) -> u64| {
        let r: Vec<_> = rows.iter().filter(|r| r.0 == m).collect();
        (field(r[1]) - field(r[0])) / 2
    };
    let (ep, lp) = (per_member("explicit", |r| r.2), per_member("lora", |r| r.2));
    let (em, lm) = (per_member("explicit", |r| r.3), per_member("lora", |r| r.3));
    assert!(
        lp * 4 < ep,
        "trainable per member: lora {lp}, explicit {ep}"
    );
    assert!(lm < em, "peak bytes per member: lora {lm}, explicit {em}");
    // The table's memory columns each show their own tag of compare.json.
    for r in json.as_array().unwrap() {
        let (method, members) = (
            r["method"].as_str().unwrap(),
            r["members"].as_u64().unwrap(),
        );
        let peak = |tag: &str| loren::report::bytes(r["memory"]["peak"][tag].as_u64().unwrap());
        let cells = [
            "frozen_weights",
            "trainable",
            "gradients",
            "optimizer_state",
        ]
        .map(|tag| format!("{:>9}", peak(tag)))
        .join(" ");
        let row = stdout
            .lines()
            .find(|l| {
                let mut words = l.split_whitespace();
                words.next() == Some(method) && words.next() == Some(&members.to_string())
            })
            .unwrap_or_else(|| panic!("no row for {method} M={members}:\n{stdout}"));
        assert!(row.contains(&format!("| {cells} ")), "{row}\nwants {cells}");
    }
    for m in ["explicit", "lora"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(m) && l.contains("one more member adds"))
            .unwrap_or_else(|| panic!("no growth line for {m}:\n{stdout}"));
        assert!(line.contains("(M=1 to M=3)"), "{line}");
    }
}

/// `loren train --recompute` trains the same ensemble, to the last digit of the report, in less
/// memory, and says so.
#[test]
fn train_with_recompute_reports_the_same_ensemble_in_less_memory() {
    let run = |extra: &[&str]| {
        let out = fresh_dir(&format!("train-recompute-{}", extra.len()));
        let mut args = vec!["--epochs", "2", "--no-shift", "--no-ood"];
        args.extend(extra);
        let stdout = loren_into("train", &out, &args);
        let json: Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        let _ = std::fs::remove_dir_all(&out);
        (stdout, json)
    };
    let (kept_out, kept) = run(&[]);
    let (again_out, again) = run(&["--recompute"]);
    assert_eq!(kept["activations"], "keep");
    assert_eq!(again["activations"], "recompute");
    assert!(again_out.contains("(blocks recomputed)"), "{again_out}");
    assert!(!kept_out.contains("recomputed"), "{kept_out}");
    assert_eq!(kept["report"], again["report"]);
    assert_eq!(kept["val_nll"], again["val_nll"]);
    let peak = |j: &Value| j["memory"]["total_peak"].as_u64().unwrap();
    assert!(
        peak(&again) < peak(&kept),
        "{} vs {}",
        peak(&again),
        peak(&kept)
    );
}

/// `loren compare --seeds` trains every method at each seed, each seed's run the same as a
/// compare at that one seed, and summarises each method over them: the mean and the sample
/// standard deviation of the runs' own figures.
#[test]
fn compare_over_seeds_summarises_each_method_over_the_runs() {
    let args = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["--methods", "single-lora,lora", "-m", "2"];
        args.extend(["--epochs", "1", "--no-shift", "--no-ood"]);
        args.extend(extra);
        args
    };
    let compare = |name: &str, extra: &[&'static str]| {
        let out = fresh_dir(name);
        let stdout = compare_into(&out, &args(extra));
        (out, stdout)
    };
    let read = |path: std::path::PathBuf| -> Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let (out, stdout) = compare("seeds", &["--seeds", "4,7", "--save-predictions"]);
    let runs = read(out.join("compare.json"));
    let seeds: Vec<(&str, u64)> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["method"].as_str().unwrap(), r["seed"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        seeds,
        [
            ("single-lora", 4),
            ("lora", 4),
            ("single-lora", 7),
            ("lora", 7)
        ]
    );
    for dir in ["single-lora-s4", "lora-s4", "single-lora-s7", "lora-s7"] {
        assert!(out.join(dir).join("report.json").exists(), "{dir}");
        assert!(out.join(dir).join("training.svg").exists(), "{dir}");
        // Each run's predictions beside its report, and not in the comparison's JSON.
        assert!(
            out.join(dir).join("predictions.safetensors").exists(),
            "{dir}"
        );
    }
    assert!(runs[0]["report"].get("predictions").is_none());
    // The learning curves of all four runs in one figure: a colour per method, its seeds named
    // once in each of the four panels' legends.
    let curves = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    svg_check::check_svg(&curves).unwrap();
    assert!(curves.contains("2 seeds each"), "{curves}");
    assert_eq!(curves.matches(">lora M=2<").count(), 4, "{curves}");
    assert_eq!(curves.matches(">single-lora M=1<").count(), 4, "{curves}");
    // Seed 7's LoRA-Ensemble is the one a comparison at seed 7 alone trains.
    let (alone, _) = compare("seed-7", &["--seed", "7"]);
    let lora7 = &runs[3];
    assert_eq!(
        read(alone.join("compare.json"))[1]["report"],
        lora7["report"]
    );

    let summary = read(out.join("summary.json"));
    assert_eq!(summary.as_array().unwrap().len(), 2);
    let lora = &summary[1];
    assert_eq!(
        (lora["method"].as_str(), lora["members"].as_u64()),
        (Some("lora"), Some(2))
    );
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * y.abs().max(1.0);
    // Each column from its own figure of the runs: the two ECEs, say, are not interchangeable.
    let columns = [
        ("accuracy", "/report/test/accuracy"),
        ("ece", "/report/test/ece"),
        ("ece_paper", "/report/test/ece_paper"),
        ("nll", "/report/test/nll"),
        ("brier", "/report/test/brier"),
        ("ece_tempered", "/report/tempered/ece"),
        ("val_ece", "/val_ece"),
    ];
    let figure = |r: &Value, at: &str| r.pointer(at).and_then(Value::as_f64).unwrap();
    assert_ne!(
        figure(lora7, "/report/test/ece"),
        figure(lora7, "/report/test/ece_paper")
    );
    for (column, at) in columns {
        let (a, b) = (figure(&runs[1], at), figure(lora7, at));
        assert_ne!(a, b, "{column}: two seeds should train two ensembles");
        let mean = lora[column]["mean"].as_f64().unwrap();
        assert!(
            close(mean, (a + b) / 2.0),
            "{column}: {mean} from {a} and {b}"
        );
        // Over two runs the sample standard deviation is |a - b| / √2.
        let sd = lora[column]["sd"].as_f64().unwrap();
        assert!(close(sd, (a - b).abs() / 2f64.sqrt()), "{column}: {sd}");
    }
    assert!(lora["shift_ece"].is_null() && lora["ood_auroc_entropy"].is_null());
    assert!(
        stdout.contains("seed 4\n") && stdout.contains("seed 7\n"),
        "{stdout}"
    );
    let table = stdout
        .split("over 2 seeds: mean ± standard deviation\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary:\n{stdout}"));
    assert!(
        table.lines().next().unwrap().starts_with("method"),
        "{table}"
    );
    assert!(!table.contains("shift"), "{table}");
    // Under the summary, once: which bins each ECE has (no AUROC: no OOD set was scored).
    for line in [
        "ECE: top-label, 15 equal-width bins, on the mean of the members' probabilities; ECE@T, \
         ECE at T: the same after temperature scaling fitted on validation\n",
        "paper ECE: as the LoRA-Ensemble paper's code computes it, 10 equal-width bins \
         (k/10, (k+1)/10] on the softmax of the members' mean logits\n",
    ] {
        assert_eq!(table.matches(line).count(), 1, "{table}");
        assert_eq!(stdout.matches(line).count(), 1, "{stdout}");
    }
    assert!(!table.contains("AUROC"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("lora") && l.ends_with("4,7")),
        "{table}"
    );

    // One seed given is summarised too, with no spread (a 0 would read as none measured); a
    // comparison without --seeds in the same folder takes away the summary its compare.json no
    // longer matches.
    let (one, stdout) = compare("one-seed", &["--seeds", "7"]);
    assert!(
        stdout.contains("over 1 seed: its figures (a standard deviation needs two or more"),
        "{stdout}"
    );
    let summary = stdout.split("over 1 seed").nth(1).unwrap();
    assert!(!summary.contains('±'), "{stdout}");
    assert!(read(one.join("summary.json"))[1]["nll"]["sd"].is_null());
    assert!(read(one.join("summary.json"))[1]["nll"]["mean"].is_f64());
    compare_into(&one, &args(&["--seed", "7"]));
    assert!(!one.join("summary.json").exists());
}

/// `loren compare --lrs` trains every method at every rate and seed, picks each method's rate
/// by the rule on the runs' own validation NLL, and shows and summarises the picked runs alone.
#[test]
fn compare_over_rates_picks_each_methods_rate_on_validation() {
    let out = fresh_dir("lrs");
    let common = [
        "--methods",
        "single-lora,lora",
        "-m",
        "2",
        "--no-shift",
        "--no-ood",
    ];
    let mut args = common.to_vec();
    args.extend(["--lrs", "3e-3,3e-4,1e-3", "--seeds", "4,7", "--epochs", "2"]);
    let stdout = compare_into(&out, &args);
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(out.join(name)).unwrap()).unwrap()
    };
    // Every run is kept: 2 methods x 3 rates x 2 seeds, each in its own folder.
    let runs = read("compare.json");
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 12);
    assert!(out.join("lora-lr3e-4-s7").join("report.json").exists());
    assert!(
        out.join("single-lora-lr3e-3-s4")
            .join("report.json")
            .exists()
    );
    let run_at = |method: &str, lr: f64, seed: u64| -> &Value {
        let found: Vec<&Value> = runs
            .iter()
            .filter(|r| {
                r["method"] == method
                    && r["seed"] == seed
                    && (r["settings"]["train"]["lr"].as_f64().unwrap() / lr - 1.0).abs() < 1e-6
            })
            .collect();
        assert_eq!(found.len(), 1, "{method} at {lr}, seed {seed}");
        found[0]
    };
    let val_nll =
        |method: &str, lr: f64, seed: u64| run_at(method, lr, seed)["val_nll"].as_f64().unwrap();

    let choices = read("rates.json");
    let choices = choices.as_array().unwrap();
    assert_eq!(choices.len(), 2);
    let mut picked = Vec::new();
    for (c, method) in choices.iter().zip(["single-lora", "lora"]) {
        assert_eq!(c["method"], method);
        assert_eq!(c["seeds"], serde_json::json!([4, 7]));
        let rates = [3e-4, 1e-3, 3e-3];
        let trials = c["trials"].as_array().unwrap();
        for (t, lr) in trials.iter().zip(rates) {
            assert!((t["lr"].as_f64().unwrap() / lr - 1.0).abs() < 1e-6, "{t}");
            let want = [val_nll(method, lr, 4), val_nll(method, lr, 7)];
            assert_eq!(t["val_nll"], serde_json::json!(want));
        }
        // The rule, worked again from compare.json: step up while both seeds agree.
        let nll = |i: usize| [val_nll(method, rates[i], 4), val_nll(method, rates[i], 7)];
        let mut want = 0;
        while want + 1 < rates.len() && (0..2).all(|s| nll(want + 1)[s] < nll(want)[s]) {
            want += 1;
        }
        let marks: Vec<bool> = trials
            .iter()
            .map(|t| t["picked"].as_bool().unwrap())
            .collect();
        let mut expected = [false; 3];
        expected[want] = true;
        assert_eq!(marks, expected, "{method}");
        picked.push((method, rates[want]));
    }

    // The choice is printed first; the tables and the summary hold the picked runs alone.
    assert!(
        stdout.starts_with("peak learning rate by validation NLL"),
        "{stdout}"
    );
    let rate = |lr: f64| format!("{:e}", lr as f32);
    assert!(
        stdout.contains(&format!(
            "peak learning rates: single-lora {}, lora {}\n",
            rate(picked[0].1),
            rate(picked[1].1)
        )),
        "{stdout}"
    );
    let summary = read("summary.json");
    assert_eq!(summary.as_array().unwrap().len(), 2);
    let test_nll = |method: &str, lr: f64, seed: u64| {
        run_at(method, lr, seed)["report"]["test"]["nll"]
            .as_f64()
            .unwrap()
    };
    for (s, (method, lr)) in summary.as_array().unwrap().iter().zip(&picked) {
        let mean = (test_nll(method, *lr, 4) + test_nll(method, *lr, 7)) / 2.0;
        let got = s["nll"]["mean"].as_f64().unwrap();
        assert!(
            (got - mean).abs() <= 1e-12,
            "{method}: {got} against {mean}"
        );
    }

    // A comparison without --lrs in the same folder takes away the choice it no longer makes.
    assert!(out.join("rates.json").exists());
    let mut args = common.to_vec();
    args.extend(["--epochs", "1"]);
    compare_into(&out, &args);
    assert!(!out.join("rates.json").exists());
}

/// One ensemble size given is the runs' only one: their folders are the methods' names alone. A
/// later comparison into the same folder that does not rerun a method says its reports stay.
#[test]
fn one_size_names_the_folders_by_method_and_a_later_comparison_names_what_it_left() {
    let out = fresh_dir("one-size");
    let quick = ["--sizes", "2", "--epochs", "1", "--no-shift", "--no-ood"];
    let mut args = vec!["--methods", "single,lora"];
    args.extend(quick);
    compare_into(&out, &args);
    for dir in ["single", "lora"] {
        assert!(out.join(dir).join("report.json").exists(), "{dir}");
    }
    assert!(!out.join("lora-M2").exists());
    let mut args = vec!["--methods", "lora"];
    args.extend(quick);
    let run = compare_in(&out, &args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(
        err.contains(
            "holds reports of an earlier comparison that this one does not rerun (single)"
        ),
        "{err}"
    );
}

/// A comparison that stops part way leaves the runs it finished, says where, and no summary of an
/// earlier comparison in the folder that no longer describes the runs beside it.
#[test]
fn a_comparison_stopped_part_way_leaves_no_summary_that_disagrees_with_its_runs() {
    let out = fresh_dir("stopped");
    let quick = ["--epochs", "1", "--no-shift", "--no-ood"];
    let mut args = vec![
        "--methods",
        "single",
        "--epochs",
        "2",
        "--no-shift",
        "--no-ood",
    ];
    compare_into(&out, &args);
    assert!(out.join("compare.json").exists());
    // The second method's loss is not a number within its first epoch: the comparison fails
    // after the first method's run replaced part of the folder, and says what it kept, under -q
    // too.
    args = vec![
        "--methods",
        "single,lora",
        "--method-lr",
        "lora=1e4",
        "--grad-clip",
        "0",
        "--weight-decay",
        "0",
        "-q",
    ];
    args.extend(quick);
    let run = compare_in(&out, &args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(
        err.contains("lr 1e4: training stopped: the loss is"),
        "{err}"
    );
    let first = out.join("single");
    let said = format!(
        "the comparison stopped after 1 of its 2 runs (1 written to its folder, {}); it wrote no",
        first.display()
    );
    assert!(err.contains(&said), "{err}");
    for summary in ["compare.json", "curves.svg"] {
        assert!(!out.join(summary).exists(), "{summary}");
    }
    // Its first run replaced the earlier comparison's: one epoch where that one trained two.
    let report = std::fs::read_to_string(first.join("report.json")).unwrap();
    let report: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["train"]["epochs"].as_array().unwrap().len(), 1);
}

/// In a rate sweep a rate too high is an outcome: the sweep goes on, records it, and picks
/// among the rest.
#[test]
fn a_rate_that_diverges_is_recorded_and_never_picked() {
    let out = fresh_dir("diverged");
    // An earlier run's report where the diverged one would write: it no longer stands for it.
    let stale = out.join("single-lr1e4");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("report.json"), b"{}").unwrap();
    // And `loren eval`'s, which compare never writes: not its to remove.
    std::fs::write(stale.join("eval.json"), b"{}").unwrap();
    // No weight decay: at these rates it would be refused before training.
    let quick = [
        "--grad-clip",
        "0",
        "--weight-decay",
        "0",
        "--epochs",
        "1",
        "--no-shift",
        "--no-ood",
    ];
    let sweep = |lrs: &str, out: &std::path::Path| {
        let mut args = vec!["--methods", "single", "--lrs", lrs];
        args.extend(quick);
        compare_in(out, &args)
    };
    let run = sweep("1e-3,1e4", &out);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(
        err.contains("single (M=1) at lr 1e4, seed 0: the loss is"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("diverged"), "{stdout}");
    let rates: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("rates.json")).unwrap()).unwrap();
    let trials = &rates[0]["trials"];
    assert_eq!(trials[1]["val_nll"][0], Value::Null, "{rates}");
    assert!(trials[0]["val_nll"][0].as_f64().unwrap() > 0.0, "{rates}");
    assert_eq!(trials[0]["picked"], Value::Bool(true), "{rates}");
    assert!(out.join("single-lr1e-3").join("report.json").exists());
    assert!(!stale.join("report.json").exists());
    assert!(stale.join("eval.json").exists());
    // A sweep whose lowest rate diverged, and nothing above it did better, is refused, and
    // writes no summary.
    // An earlier comparison's summary goes with the first run, though it diverged.
    let refused = fresh_dir("all-diverged");
    std::fs::create_dir_all(&refused).unwrap();
    std::fs::write(refused.join("compare.json"), b"[]").unwrap();
    let run = sweep("1e4,1e5", &refused);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(
        err.contains("diverged at its lowest rate, lr 1e4 (seed 0)"),
        "{err}"
    );
    assert!(
        err.contains("the comparison stopped after 2 of its 2 runs (2 that diverged); it wrote no"),
        "{err}"
    );
    for summary in ["compare.json", "rates.json", "curves.svg"] {
        assert!(!refused.join(summary).exists(), "{summary}");
    }
    // A rate whose weights predict NaN at an epoch's end, the loss still a number, diverged too
    // (batch 10000: one step an epoch).
    let late = fresh_dir("diverged-late");
    let args = [
        "--methods",
        "single",
        "--lrs",
        "1e-3,1e30",
        "--weight-decay",
        "0",
        "--epochs",
        "2",
        "--batch-size",
        "10000",
        "--warmup",
        "0",
        "--no-shift",
        "--no-ood",
    ];
    let run = compare_in(&late, &args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    let said = "single (M=1) at lr 1e30, seed 0: after epoch 1 (step 1), member 0's probabilities \
                for validation image 0 are NaN";
    assert!(err.contains(said), "{err}");
}
