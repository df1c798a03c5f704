//! `--save-predictions`: every member's probabilities on every scored set, written beside the
//! report, are the very ones the report was computed from.

use std::collections::HashMap;
use std::path::Path;

mod common;
use common::{report_json, run_ok, temp_dir};

use loren_nn::metrics::{Predictions, calibration, ood_detection};
use safetensors::{Dtype, SafeTensors};

/// A predictions file: its tensors' (dtype, shape, bytes) by name, and its metadata.
struct File {
    tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

fn read(path: &Path) -> File {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    File {
        tensors,
        meta: header.metadata().clone().unwrap_or_default(),
    }
}

impl File {
    fn probs(&self, set: &str) -> Predictions {
        let (dtype, shape, bytes) = &self.tensors[&format!("{set}/probs")];
        assert_eq!(*dtype, Dtype::F32, "{set}");
        let values = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Predictions::new(shape[0], shape[1], shape[2], values).unwrap()
    }

    fn labels(&self, set: &str) -> Vec<u32> {
        let (dtype, shape, bytes) = &self.tensors[&format!("{set}/labels")];
        assert_eq!(*dtype, Dtype::I64, "{set}");
        let labels: Vec<u32> = bytes
            .chunks_exact(8)
            .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
            .collect();
        assert_eq!(labels.len(), shape[0]);
        labels
    }

    fn sets(&self) -> Vec<String> {
        serde_json::from_str(&self.meta["sets"]).unwrap()
    }
}

fn close(got: f64, want: &serde_json::Value, what: &str) {
    let want = want.as_f64().unwrap_or_else(|| panic!("{what}: {want}"));
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
        "{what}: {got} from the file, {want} in the report"
    );
}

/// A LoRA-Ensemble of 3 members trained for an epoch into `out`, with `extra` flags.
fn train_into(out: &str, extra: &[&str]) {
    let quick = [
        "train",
        "--members",
        "3",
        "--rank",
        "4",
        "--epochs",
        "1",
        "-q",
    ];
    run_ok(&[&quick[..], extra, &["--out", out]].concat());
}

#[test]
fn saved_predictions_are_those_the_report_scored() {
    let dir = temp_dir("train");
    let out = dir.to_str().unwrap();
    train_into(out, &["--holdout-classes", "9", "--save-predictions"]);
    let file = read(&dir.join("predictions.safetensors"));
    let report = report_json(&dir);
    let r = &report["report"];

    // Every set, in the order scored; the labels where there are any.
    let shifts = ["gaussian-noise", "rotation", "pixel-dropout"]
        .iter()
        .flat_map(|k| (1..=5).map(move |s| format!("shift/{k}/{s}")));
    let want: Vec<String> = ["val", "test"]
        .map(String::from)
        .into_iter()
        .chain(shifts)
        .chain(["ood".to_string()])
        .collect();
    assert_eq!(file.sets(), want);
    assert_eq!(file.meta["format"], "loren-predictions-v1");
    assert_eq!(file.meta["method"], "lora");
    assert_eq!(file.meta["members"], "3");
    let names: Vec<String> = serde_json::from_str(&file.meta["class_names"]).unwrap();
    assert_eq!(names, (0..9).map(|c| c.to_string()).collect::<Vec<_>>());
    assert!(!file.tensors.contains_key("ood/labels"));
    assert_eq!(file.tensors.len(), 2 * want.len() - 1);

    // The report's figures, computed again from the file.
    let test = file.probs("test");
    let labels = file.labels("test");
    assert_eq!((test.members, test.classes), (3, 9));
    let c = calibration(&test, &labels).unwrap();
    for (got, key) in [(c.accuracy, "accuracy"), (c.nll, "nll"), (c.ece, "ece")] {
        close(got, &r["test"][key], key);
    }
    for (i, set) in want[2..17].iter().enumerate() {
        let c = calibration(&file.probs(set), &file.labels(set)).unwrap();
        close(c.accuracy, &r["shift"][i]["accuracy"], set);
        close(c.ece, &r["shift"][i]["ece"], set);
    }
    let ood = ood_detection(&test, &file.probs("ood")).unwrap();
    close(
        ood.entropy.auroc,
        &r["ood"]["entropy"]["auroc"],
        "ood auroc",
    );
    let val = calibration(&file.probs("val"), &file.labels("val")).unwrap();
    close(val.nll, &report["val_nll"], "val nll");
    close(
        file.meta["temperature"].parse().unwrap(),
        &r["tempered"]["temperature"],
        "temperature",
    );

    // `loren eval` writes the same test probabilities, bit for bit, with the checkpoint named.
    run_ok(&["eval", "--checkpoint", out, "--save-predictions", "-q"]);
    let again = read(&dir.join("eval-predictions.safetensors"));
    assert_eq!(again.sets(), want);
    assert!(again.meta["checkpoint"].ends_with("checkpoint.safetensors"));
    assert_eq!(again.tensors["test/probs"], file.tensors["test/probs"]);
    assert_eq!(again.tensors["ood/probs"], file.tensors["ood/probs"]);

    // Two --ood-data folders of one name are two sets, the second named apart. (Their test
    // parts are scored: a fifth of each class.)
    for parent in ["a", "b"] {
        for (class, i) in ["x", "y"].iter().flat_map(|c| (0..5).map(move |i| (c, i))) {
            let path = dir
                .join(parent)
                .join("imgs")
                .join(class)
                .join(format!("{i}.png"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let file = std::fs::File::create(&path).unwrap();
            let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 4, 4);
            enc.set_color(png::ColorType::Grayscale);
            enc.write_header()
                .unwrap()
                .write_image_data(&[90; 16])
                .unwrap();
        }
    }
    let [a, b] = ["a", "b"].map(|p| format!("folder:{}", dir.join(p).join("imgs").display()));
    let extra = ["--no-shift", "--save-predictions", "-q", "--ood-data"];
    run_ok(
        &[
            &["eval", "--checkpoint", out][..],
            &extra,
            &[&a, "--ood-data", &b],
        ]
        .concat(),
    );
    let sets = read(&dir.join("eval-predictions.safetensors")).sets();
    assert_eq!(
        sets,
        ["val", "test", "ood", "ood/imgs/test", "ood/imgs/test#2"]
    );

    // Without the flag, an earlier run's file is not left to pass for this run's.
    run_ok(&["eval", "--checkpoint", out, "--no-shift", "--no-ood", "-q"]);
    assert!(!dir.join("eval-predictions.safetensors").exists());
    train_into(out, &["--no-shift", "--no-ood"]);
    assert!(!dir.join("predictions.safetensors").exists());
}
