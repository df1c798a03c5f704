//! Train, export, load through the embedding API, predict: the probabilities are bit-for-bit
//! those `loren eval` computes from the training checkpoint.

use std::path::{Path, PathBuf};

mod common;
use common::{all_tensors, loren, run_ok, temp_dir};

use loren::Ensemble;
use loren::backbone::read_backbone;
use loren::dataset::{DataSource, Normalize};
use loren_nn::checkpoint::TensorFile;
use loren_nn::config::VitConfig;
use loren_nn::data::Dataset;
use loren_nn::eval::predict;
use loren_nn::metrics::{Predictions, calibration};
use loren_nn::train::load_trained;
use loren_tensor::{Device, DeviceSpec};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Train `method` for an epoch with the CLI (and `extra` flags), score it with `loren eval`,
/// export it.
fn train_eval_export(method: &str, dir: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    let out = dir.to_str().unwrap();
    let ckpt = dir.join("checkpoint.safetensors");
    let quick = [
        "--epochs",
        "1",
        "--no-shift",
        "--no-ood",
        "-q",
        "--seed",
        "5",
    ];
    let mut args = vec![
        "train",
        "--method",
        method,
        "--members",
        "3",
        "--rank",
        "4",
        "--out",
        out,
    ];
    args.extend(quick);
    args.extend(extra);
    run_ok(&args);
    let c = ckpt.to_str().unwrap();
    run_ok(&["eval", "--checkpoint", c, "--no-shift", "--no-ood", "-q"]);
    let file = dir.join("ensemble.safetensors");
    let printed = run_ok(&["export", "--checkpoint", c, "--out", file.to_str().unwrap()]);
    assert!(printed.contains("ensemble of M=3"), "{printed}");
    (ckpt, file)
}

/// What `loren eval` computes: the model rebuilt from the checkpoint, predicting on test in
/// chunks of `batch` images (its --eval-batch-size, 256 by default).
fn eval_probabilities(ckpt: &Path, test: &Dataset, batch: usize) -> Predictions {
    let file = TensorFile::read(ckpt).unwrap();
    let vit: VitConfig = file.meta_json("vit").unwrap();
    let backbone = read_backbone(Path::new(file.meta("backbone").unwrap()), &vit).unwrap();
    let model = load_trained(&file, Some(&backbone.file), &Device::cpu()).unwrap();
    predict(&model, test, batch, &mut |_| Ok(())).unwrap()
}

fn round_trip(method: &str, normalize: Normalize) {
    let dir = temp_dir(&format!("{method}-{normalize}"));
    let flag = normalize.to_string();
    let (ckpt, exported) = train_eval_export(method, &dir, &["--normalize", &flag]);
    // The report says how the run trained, at the method's default rate: 3e-4 for the single
    // networks, 1e-3 for the ensembles.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let lr = report["settings"]["train"]["lr"].as_f64().unwrap();
    let want = if matches!(method, "single" | "single-lora") {
        3e-4
    } else {
        1e-3
    };
    assert!((lr / want - 1.0).abs() < 1e-6, "{method}: lr {lr}");
    assert_eq!(report["settings"]["ensemble"]["method"], method);
    // `loren eval` scored the checkpoint as the run did, to the last bit: MC Dropout's masks
    // among all else, which follow the run's seed (5).
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["test"], report["report"]["test"], "{method}: eval");
    let mut ens = Ensemble::load(&exported, DeviceSpec::Cpu).unwrap();
    assert_eq!((ens.members(), ens.classes()), (3, 10));
    assert_eq!(ens.class_names()[7], "7");
    let test = DataSource::Digits(None)
        .splits(&[], ens.vit(), normalize, false)
        .unwrap()
        .test;
    let all: Vec<usize> = (0..test.len()).collect();
    let images = test.batch(&all, None).images;
    // The default chunking is eval's default, so the same images give the same bits.
    let want = eval_probabilities(&ckpt, &test, 256);
    let got = ens.predict(&images, test.len()).unwrap();
    assert_eq!((got.members, got.batch, got.classes), (3, test.len(), 10));
    assert!(
        bits(&got.probs) == bits(&want.probs),
        "{method}: probabilities differ from eval's"
    );
    assert_eq!(bits(&got.mean), bits(&want.mean()));
    // The training checkpoint itself loads to the same ensemble.
    let from_checkpoint = Ensemble::load(&ckpt, DeviceSpec::Cpu).unwrap();
    assert_eq!(from_checkpoint.metadata(), ens.metadata());
    let got_c = from_checkpoint.predict(&images, test.len()).unwrap();
    assert!(
        bits(&got_c.probs) == bits(&want.probs),
        "{method}: from the checkpoint"
    );
    for batch in [1, 7, 100] {
        // Chunked alike (eval --eval-batch-size N), still bit for bit.
        ens.set_batch_size(batch);
        let want_b = eval_probabilities(&ckpt, &test, batch);
        let got_b = ens.predict(&images, test.len()).unwrap();
        assert!(
            bits(&got_b.probs) == bits(&want_b.probs),
            "{method}, batch {batch}"
        );
        // Across chunkings only the last bits may move: the CPU matrix kernels block small
        // batches differently.
        let worst = got_b
            .probs
            .iter()
            .zip(&want.probs)
            .map(|(a, b)| (a - b).abs())
            .max_by(f32::total_cmp)
            .unwrap_or(0.0);
        assert!(worst < 1e-5, "{method}, batch {batch}: off by {worst}");
    }
    // Predicted in two parts as at once, bit for bit: the chunks fall alike (100 images each).
    ens.set_batch_size(100);
    let whole = ens.predict(&images, test.len()).unwrap();
    let per_image = images.len() / test.len();
    let cut = 100 * per_image;
    let parts = [
        ens.predict(&images[..cut], 100).unwrap(),
        ens.predict(&images[cut..], test.len() - 100).unwrap(),
    ];
    let member = |p: &loren::ensemble::Prediction, m: usize| {
        p.probs[m * p.batch * 10..][..p.batch * 10].to_vec()
    };
    for m in 0..3 {
        let joined = [member(&parts[0], m), member(&parts[1], m)].concat();
        assert!(
            bits(&joined) == bits(&member(&whole, m)),
            "{method}: member {m} in parts"
        );
    }
    // In another order: the first 100 images backwards (a chunk of their own), then 20 others.
    // Each image keeps its masks; only the last bits may move, as the CPU's matrix kernels
    // block rows at other places differently.
    let reordered: Vec<f32> = (0..100)
        .rev()
        .chain(150..170)
        .flat_map(|i| &images[i * per_image..][..per_image])
        .copied()
        .collect();
    let moved = ens.predict(&reordered, 120).unwrap();
    for m in 0..3 {
        let (got, want) = (member(&moved, m), member(&whole, m));
        for (row, i) in (0..100).rev().chain(150..170).enumerate() {
            let worst = (0..10)
                .map(|c| (got[row * 10 + c] - want[i * 10 + c]).abs())
                .max_by(f32::total_cmp)
                .unwrap_or(0.0);
            assert!(
                worst < 1e-5,
                "{method}: member {m}, image {i} at row {row}: off by {worst}"
            );
        }
    }
    ens.set_batch_size(256);
    // Raw pixels through the normalising helper give the same bits.
    let from_pixels = ens
        .predict_pixels(&test.images.to_f32(), test.len())
        .unwrap();
    assert!(
        bits(&from_pixels.probs) == bits(&want.probs),
        "{method}: predict_pixels"
    );
    // Uncertainty: entropy within [0, ln C], mutual information within [0, entropy].
    for b in 0..from_pixels.batch {
        let (h, mi) = (from_pixels.entropy[b], from_pixels.mutual_information[b]);
        assert!((0.0..=10f64.ln() + 1e-9).contains(&h) && (0.0..=h + 1e-9).contains(&mi));
    }
    assert!(from_pixels.mutual_information.iter().any(|&mi| mi > 1e-4));
    // And the numbers `loren eval` wrote to eval.json are those of these probabilities (to
    // the last digit serde_json's float parsing keeps).
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("eval.json")).unwrap()).unwrap();
    // It says what it scored and how: the checkpoint, its training settings, the data.
    assert!(
        report["checkpoint"]
            .as_str()
            .unwrap()
            .ends_with("checkpoint.safetensors"),
        "{}",
        report["checkpoint"]
    );
    assert_eq!(report["batch_size"], 256);
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["settings"]["ensemble"]["method"], method);
    assert_eq!(report["settings"]["train"]["epochs"], 1);
    assert_eq!(
        report["settings"]["data"]["normalize"],
        normalize.to_string()
    );
    let ours = calibration(&want, &test.labels).unwrap();
    for (key, value) in [
        ("accuracy", ours.accuracy),
        ("nll", ours.nll),
        ("ece", ours.ece),
        ("ece_paper", ours.ece_paper),
    ] {
        let written = report["test"][key].as_f64().unwrap();
        assert!(
            (written - value).abs() <= 1e-15 * value.abs().max(1.0),
            "{key}"
        );
    }
    // `loren eval` scores the exported file as it scored the checkpoint: the same figures to
    // the last digit, and the same record of how it was trained and on what.
    let again = dir.join("eval-of-export");
    run_ok(&[
        "eval",
        "--checkpoint",
        exported.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--no-shift",
        "--no-ood",
        "-q",
    ]);
    let mut of_export: serde_json::Value =
        serde_json::from_slice(&std::fs::read(again.join("eval.json")).unwrap()).unwrap();
    assert_eq!(of_export["checkpoint"], exported.to_str().unwrap());
    let mut of_checkpoint = report;
    for r in [&mut of_export, &mut of_checkpoint] {
        r.as_object_mut().unwrap().remove("checkpoint");
    }
    assert!(of_export == of_checkpoint, "{method}: eval of the export");
}

#[test]
fn lora_ensemble_round_trips_bit_for_bit() {
    round_trip("lora", Normalize::Dataset);
}

#[test]
fn mc_dropout_round_trips_bit_for_bit() {
    round_trip("mc-dropout", Normalize::Dataset);
}

#[test]
fn explicit_ensemble_round_trips_bit_for_bit() {
    round_trip("explicit", Normalize::Dataset);
}

/// Trained on pixels in [0, 1]: eval takes that from the checkpoint without being told, and
/// the exported file's normalisation (mean 0, std 1) gives eval's probabilities from raw pixels.
#[test]
fn an_unnormalised_ensemble_round_trips_bit_for_bit() {
    round_trip("lora", Normalize::None);
}

/// A program serving predictions shares one loaded ensemble between threads: each thread's
/// prediction is, bit for bit, the one it gets alone.
#[test]
fn one_ensemble_predicts_from_several_threads_at_once() {
    let dir = temp_dir("threads");
    let (_, exported) = train_eval_export("lora", &dir, &[]);
    let mut ens = Ensemble::load(&exported, DeviceSpec::Cpu).unwrap();
    // Several chunks per call, so each thread also stages batches in the background.
    ens.set_batch_size(16);
    let test = DataSource::Digits(None)
        .splits(&[], ens.vit(), Normalize::Dataset, false)
        .unwrap()
        .test;
    let parts: Vec<(Vec<f32>, usize)> = (0..4)
        .map(|i| {
            let idx: Vec<usize> = (i * 40..(i + 1) * 40 + 7 * i).collect();
            (test.batch(&idx, None).images, idx.len())
        })
        .collect();
    let alone: Vec<Vec<u32>> = parts
        .iter()
        .map(|(p, n)| bits(&ens.predict(p, *n).unwrap().probs))
        .collect();
    let ens = &ens;
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .map(|(p, n)| {
                s.spawn(move || {
                    (0..3)
                        .map(|_| bits(&ens.predict(p, *n).unwrap().probs))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            for (round, got) in h.join().unwrap().into_iter().enumerate() {
                assert!(got == alone[i], "thread {i}, round {round}");
            }
        }
    });
}

#[test]
fn the_exported_file_holds_shared_weights_once_and_stacked_adapters() {
    let dir = temp_dir("layout");
    let (_, exported) = train_eval_export("lora", &dir, &[]);
    let f = TensorFile::read(&exported).unwrap();
    assert_eq!(f.meta("format").unwrap(), "loren-ensemble-v1");
    assert_eq!(f.meta("layout").unwrap(), "shared");
    assert_eq!(f.get("blocks.0.attn.q.weight").unwrap().shape, vec![64, 64]);
    assert_eq!(f.get("pos_embed").unwrap().shape, vec![17, 64]);
    assert_eq!(
        f.get("blocks.3.attn.o.lora_a").unwrap().shape,
        vec![3, 4, 64]
    );
    assert_eq!(
        f.get("blocks.3.attn.o.lora_b").unwrap().shape,
        vec![3, 64, 4]
    );
    assert_eq!(f.get("head.weight").unwrap().shape, vec![3, 10, 64]);
    let vit: VitConfig = f.meta_json("vit").unwrap();
    assert_eq!(vit, VitConfig::tiny());
    let mean: Vec<f32> = f.meta_json("norm_mean").unwrap();
    assert_eq!(mean, vec![0.5]);
    assert_eq!(f.meta("normalize").unwrap(), "dataset");
    assert_eq!(f.meta("train_on_val").unwrap(), "false");
    assert!(!f.names().any(|n| n.starts_with("optim.")));
}

/// The exported file records where its ensemble came from, as its checkpoint did: `predict`
/// and the examples rebuild the data (held-out classes included) from these keys.
#[test]
fn the_exported_file_records_the_data_it_was_trained_on() {
    let dir = temp_dir("provenance");
    let (ckpt, exported) = train_eval_export("lora", &dir, &["--holdout-classes", "3,7"]);
    let (trained, file) = (
        TensorFile::read(&ckpt).unwrap(),
        TensorFile::read(&exported).unwrap(),
    );
    for key in [
        "data",
        "holdout_classes",
        "backbone",
        "train_on_val",
        "normalize",
        "train",
    ] {
        assert_eq!(file.meta(key).unwrap(), trained.meta(key).unwrap(), "{key}");
    }
    assert_eq!(file.meta("holdout_classes").unwrap(), "3,7");
    let names: Vec<String> = file.meta_json("class_names").unwrap();
    assert_eq!(names, ["0", "1", "2", "4", "5", "6", "8", "9"]);
    // The library's export takes the run's folder for its checkpoint, as the command and
    // `Ensemble::open` do, and writes the same file.
    let again = dir.join("from-the-folder.safetensors");
    loren::ensemble::export(&dir, None, &again).unwrap();
    let again = TensorFile::read(&again).unwrap();
    assert_eq!(again.metadata(), file.metadata());
    assert!(file.names().eq(again.names()));
    for name in file.names() {
        assert!(
            again.get(name).unwrap() == file.get(name).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn export_and_load_refuse_the_wrong_files() {
    let dir = temp_dir("wrong");
    let backbone = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/backbone-tiny.safetensors");
    let out = dir.join("e.safetensors");
    let (ok, _, err) = loren(&[
        "export",
        "--checkpoint",
        backbone.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("not a loren training checkpoint"),
        "{err}"
    );
    // A checkpoint whose backbone has gone says how to name another, to the library's caller
    // as to the command's.
    let moved = dir.join("moved-backbone.safetensors");
    std::fs::copy(&backbone, &moved).unwrap();
    let (ckpt, exported) =
        train_eval_export("lora", &dir, &["--backbone", moved.to_str().unwrap()]);
    std::fs::remove_file(&moved).unwrap();
    let e = Ensemble::load(&ckpt, DeviceSpec::Cpu).unwrap_err();
    assert!(
        matches!(e, loren::EnsembleError::File { .. })
            && e.to_string().contains("moved-backbone.safetensors")
            && e.to_string().contains("Ensemble::open's backbone"),
        "{e}"
    );
    // An export keeps no optimizer state: resuming or exporting it names what it is.
    let e = exported.to_str().unwrap();
    for args in [
        vec!["train", "--resume", e, "--epochs", "2"],
        vec!["export", "--checkpoint", e, "--out", out.to_str().unwrap()],
    ] {
        let (ok, _, err) = loren(&args);
        assert!(
            !ok && err.contains("an ensemble loren export wrote")
                && err.contains("name the training checkpoint it was exported from"),
            "{args:?}: {err}"
        );
    }
    let e = Ensemble::load(&backbone, DeviceSpec::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("neither an ensemble written by loren export") && e.contains("nor a training"),
        "{e}"
    );
    let e = Ensemble::load(dir.join("absent.safetensors"), DeviceSpec::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
}

/// A normalisation that is no f32 (1e39 overflows one), or a std that is not positive, in an
/// exported file or a checkpoint, is the file's fault, named when it is loaded (not an input
/// that turned infinite in `predict`) or exported.
#[test]
fn a_broken_normalisation_is_refused_on_loading_and_exporting() {
    use loren_nn::checkpoint::write;
    let dir = temp_dir("norm");
    let (ckpt, exported) = train_eval_export("lora", &dir, &[]);
    for (source, is_export) in [(&exported, true), (&ckpt, false)] {
        let file = TensorFile::read(source).unwrap();
        let tensors = all_tensors(&file);
        for (key, value, says) in [
            ("norm_mean", "[1e39]", "metadata 'norm_mean' is unreadable"),
            ("norm_std", "[1e39]", "metadata 'norm_std' is unreadable"),
            ("norm_std", "[0.0]", "finite values each, std positive"),
            ("norm_std", "[-0.5]", "finite values each, std positive"),
        ] {
            let mut meta = file.metadata().clone();
            meta.insert(key.into(), value.into());
            let broken = dir.join("broken.safetensors");
            write(&broken, &tensors, meta).unwrap();
            let e = Ensemble::load(&broken, DeviceSpec::Cpu).unwrap_err();
            assert!(
                matches!(e, loren::EnsembleError::File { .. }),
                "{key} {value}: {e:?}"
            );
            assert!(e.to_string().contains(says), "{key} {value}: {e}");
            // Nor is a checkpoint recording it exported, to fail only when it is loaded.
            if !is_export {
                let out = dir.join("from-broken.safetensors");
                let e = loren::ensemble::export(&broken, None, &out).unwrap_err();
                assert!(e.to_string().contains(says), "{key} {value}: {e}");
                assert!(!out.exists());
            }
        }
    }
}

#[test]
fn predict_rejects_images_of_the_wrong_size() {
    let dir = temp_dir("size");
    let (_, exported) = train_eval_export("lora", &dir, &[]);
    let ens = Ensemble::load(&exported, DeviceSpec::Cpu).unwrap();
    for bad in [0, 63, 65] {
        let e = ens.predict(&vec![0.0; bad], 1).unwrap_err().to_string();
        assert!(e.contains("[B, 1, 8, 8]"), "{e}");
    }
    // Images of another size whose values make a whole number of the model's: one 16x16 image
    // is not four 8x8 ones.
    let e = ens.predict(&[0.0; 256], 1).unwrap_err().to_string();
    assert!(
        e.contains("1 images of [1, 8, 8] are 64 values, got 256"),
        "{e}"
    );
    assert!(ens.predict(&[0.0; 256], 4).is_ok());
    let e = ens.predict(&[], 0).unwrap_err().to_string();
    assert!(e.contains("0 images"), "{e}");
}
