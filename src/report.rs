//! Reports for people: the calibration report of one run and the side-by-side comparison.

use std::fmt::Write;

use loren_nn::metrics::ShiftRow;

use crate::run::RunResult;

/// Bytes in the unit a person reads best.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A count with thousands separators.
pub fn count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn method_title(r: &RunResult) -> String {
    let name = match r.method {
        loren_nn::Method::Lora => "LoRA-Ensemble",
        loren_nn::Method::Explicit => "Explicit ensemble",
        loren_nn::Method::Single => "Single network",
        loren_nn::Method::SingleLora => "Single network with LoRA",
    };
    match r.rank {
        Some(rank) => format!("{name} (M={}, rank {rank})", r.members),
        None => format!("{name} (M={})", r.members),
    }
}

/// The calibration report of one run.
pub fn calibration_report(r: &RunResult) -> String {
    let t = &r.report.test;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} on the digits test split ({} images), {}",
        method_title(r),
        t.samples,
        r.device
    );
    let _ = writeln!(s, "  accuracy             {:>7.2}%", 100.0 * t.accuracy);
    let _ = writeln!(s, "  ECE (15 bins)        {:>8.4}", t.ece);
    let _ = writeln!(s, "  adaptive ECE         {:>8.4}", t.adaptive_ece);
    let _ = writeln!(s, "  NLL                  {:>8.4}", t.nll);
    let _ = writeln!(
        s,
        "  Brier                {:>8.4}   (sum over classes, mean over samples)",
        t.brier
    );
    let (lo, hi) = t
        .member_accuracy
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
            (lo.min(a), hi.max(a))
        });
    let _ = writeln!(
        s,
        "  member accuracy      {:>7.2}%   (min {:.2}%, max {:.2}%)",
        100.0 * t.mean_member_accuracy,
        100.0 * lo,
        100.0 * hi
    );
    let _ = writeln!(s, "  disagreement         {:>8.4}", t.disagreement);
    let _ = writeln!(
        s,
        "  predictive entropy   {:>8.4}   mutual information {:.4}",
        t.predictive_entropy, t.mutual_information
    );
    if !r.report.shift.is_empty() {
        let _ = writeln!(s, "  under shift, accuracy % / ECE by severity 1..5:");
        for kind in unique_kinds(&r.report.shift) {
            let cells: Vec<String> = r
                .report
                .shift
                .iter()
                .filter(|row| row.kind == kind)
                .map(|row| format!("{:5.1}/{:.3}", 100.0 * row.accuracy, row.ece))
                .collect();
            let _ = writeln!(s, "    {kind:<15} {}", cells.join("  "));
        }
    }
    if let Some(o) = &r.report.ood {
        let _ = writeln!(
            s,
            "  OOD detection ({} in, {} out; OOD positive): AUROC / AUPR / FPR@95%TPR",
            o.in_samples, o.ood_samples
        );
        for (name, d) in [
            ("max-probability", &o.max_prob),
            ("entropy", &o.entropy),
            ("mutual info", &o.mutual_information),
        ] {
            let _ = writeln!(
                s,
                "    {name:<15} {:.4} / {:.4} / {:.4}",
                d.auroc, d.aupr, d.fpr95
            );
        }
    }
    let _ = writeln!(
        s,
        "  trainable parameters {:>10}   of {}; peak memory {} (training {:.1}s, eval {:.1}s)",
        count(r.trainable_params),
        count(r.total_params),
        bytes(r.memory.total_peak),
        r.train_seconds,
        r.eval_seconds
    );
    s
}

fn unique_kinds(rows: &[ShiftRow]) -> Vec<String> {
    let mut kinds: Vec<String> = Vec::new();
    for r in rows {
        if !kinds.contains(&r.kind) {
            kinds.push(r.kind.clone());
        }
    }
    kinds
}

/// The side-by-side table of `loren compare`.
pub fn comparison_table(runs: &[RunResult]) -> String {
    let mut s = String::new();
    let header = [
        "method",
        "M",
        "acc %",
        "ECE",
        "NLL",
        "Brier",
        "trainable",
        "frozen",
        "trainable",
        "grads",
        "optim",
        "activ",
        "work",
        "peak",
        "time s",
    ];
    let _ = writeln!(
        s,
        "{:<12} {:>3} {:>6} {:>7} {:>7} {:>7} {:>10} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>6}",
        header[0],
        header[1],
        header[2],
        header[3],
        header[4],
        header[5],
        "params",
        header[7],
        header[8],
        header[9],
        header[10],
        header[11],
        header[12],
        header[13],
        header[14]
    );
    let _ = writeln!(
        s,
        "{:<63}| {:^69} |",
        "", "peak memory while training, by tag"
    );
    for r in runs {
        let t = &r.report.test;
        let p = |tag: &str| bytes(r.memory.peak.get(tag).copied().unwrap_or(0));
        let _ = writeln!(
            s,
            "{:<12} {:>3} {:>6.2} {:>7.4} {:>7.4} {:>7.4} {:>10} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>6.1}",
            r.method.name(),
            r.members,
            100.0 * t.accuracy,
            t.ece,
            t.nll,
            t.brier,
            count(r.trainable_params),
            p("frozen_weights"),
            p("trainable"),
            p("gradients"),
            p("optimizer_state"),
            p("activations"),
            p("workspace"),
            bytes(r.memory.total_peak),
            r.train_seconds + r.eval_seconds
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_separators() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(12), "12");
        assert_eq!(count(123), "123");
        assert_eq!(count(1000), "1,000");
    }
}
