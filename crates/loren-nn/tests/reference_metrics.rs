//! The calibration report and OOD detection against scikit-learn, torchmetrics and torch, and
//! the LoRA-Ensemble paper's ECE against its own algorithm.
//! `scripts/reference-metrics.py` made a random ensemble (4 members, 600 labelled samples, 400
//! OOD samples of which 60 copy labelled ones exactly, 7 classes) and computed its figures with
//! those libraries (`fixtures/reference-metrics/`, the figures in the file's metadata). loren's
//! metrics on the same f32 probabilities must give the same figures.

use std::path::PathBuf;

use loren_nn::checkpoint::TensorFile;
use loren_nn::metrics::{DetectionMetrics, Predictions, calibration, ood_detection};

fn fixture() -> TensorFile {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests/fixtures/reference-metrics/metrics.safetensors",
    ]
    .iter()
    .collect();
    TensorFile::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn predictions(file: &TensorFile, name: &str) -> Predictions {
    let e = file.get(name).unwrap();
    let [m, n, c] = e.shape[..] else {
        panic!("{name} is {:?}", e.shape)
    };
    Predictions::new(m, n, c, e.data.clone()).unwrap()
}

/// The library's figure `key` from the metadata.
fn figure(file: &TensorFile, key: &str) -> f64 {
    file.meta(key).unwrap().parse().unwrap()
}

fn assert_close(what: &str, ours: f64, theirs: f64, tol: f64) {
    assert!(
        (ours - theirs).abs() <= tol,
        "{what}: loren {ours}, the library {theirs} (off by {:e})",
        (ours - theirs).abs()
    );
}

#[test]
fn calibration_report_matches_torchmetrics_and_torch() {
    let file = fixture();
    let preds = predictions(&file, "probs");
    let labels: Vec<u32> = file
        .get("labels")
        .unwrap()
        .data
        .iter()
        .map(|&l| l as u32)
        .collect();
    let r = calibration(&preds, &labels).unwrap();
    assert_close("accuracy", r.accuracy, figure(&file, "accuracy"), 1e-12);
    // torchmetrics returns its ECE in f32.
    assert_close("ECE", r.ece, figure(&file, "ece"), 1e-7);
    // The paper's ECE, its algorithm in torch on the members' mean logits, in f64.
    assert_close(
        "the paper's ECE",
        r.ece_paper,
        figure(&file, "ece_paper"),
        1e-12,
    );
    assert_close("NLL", r.nll, figure(&file, "nll"), 1e-12);
    assert_close("Brier", r.brier, figure(&file, "brier"), 1e-12);
    // torch's Categorical rescales each row to sum to 1 first; the f32 rows sum to 1 within
    // ~1e-7, which moves the entropy by ~1e-9.
    assert_close(
        "predictive entropy",
        r.predictive_entropy,
        figure(&file, "predictive_entropy"),
        1e-8,
    );
}

#[test]
fn ood_detection_matches_scikit_learn() {
    let file = fixture();
    let report = ood_detection(
        &predictions(&file, "probs"),
        &predictions(&file, "ood_probs"),
    )
    .unwrap();
    let cases: [(&str, &DetectionMetrics); 3] = [
        ("max_prob", &report.max_prob),
        ("entropy", &report.entropy),
        ("mutual_information", &report.mutual_information),
    ];
    for (score, d) in cases {
        for (metric, ours) in [("auroc", d.auroc), ("aupr", d.aupr), ("fpr95", d.fpr95)] {
            let key = format!("{score}.{metric}");
            assert_close(&key, ours, figure(&file, &key), 1e-12);
        }
    }
}
