//! Fine-tuning starts from the backbone alone: nothing of pretraining's start comes along.

mod common;

use common::{run_ok, temp_dir};

/// The first epoch's mean loss of a single network fine-tuned from the bundled backbone.
fn first_epoch_loss(seed: &str) -> f64 {
    let dir = temp_dir(&format!("seed-{seed}"));
    let out = dir.to_str().unwrap();
    run_ok(&[
        "train",
        "--method",
        "single",
        "--epochs",
        "1",
        "--no-shift",
        "--no-ood",
        "-q",
        "--seed",
        seed,
        "--out",
        out,
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    report["train"]["epochs"][0]["mean_loss"].as_f64().unwrap()
}

#[test]
fn a_single_network_at_the_backbones_seed_starts_with_a_new_head() {
    // The bundled backbone was pretrained at seed 0 with a head drawn from that seed; a head
    // drawn the same way again fits the backbone's features before any step (a first epoch's
    // mean loss of 0.15 where a new head's is near ln 10 = 2.3).
    let at_backbone_seed = first_epoch_loss("0");
    let elsewhere = first_epoch_loss("1");
    assert!(
        at_backbone_seed > 1.0 && elsewhere > 1.0,
        "first-epoch losses: seed 0 {at_backbone_seed:.3}, seed 1 {elsewhere:.3}"
    );
}
