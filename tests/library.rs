//! loren as a library: an ensemble trained from a program's own arrays, through `Trainer::fit`,
//! reads back as it was trained (its inputs' scaling, its class names, its backbone), and the
//! trainer refuses data it was not made for.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use loren::backbone::read_backbone;
use loren::nn::NnError;
use loren::nn::checkpoint::{self, TensorFile};
use loren::nn::config::{EnsembleConfig, LoraConfig, Method, VitConfig};
use loren::nn::data::folder::read_images;
use loren::nn::data::{DataError, Dataset};
use loren::nn::eval::predict;
use loren::nn::train::{
    CheckpointSpec, EpochInfo, Observer, Quiet, StepInfo, TrainConfig, Trainer, input_metadata,
};
use loren::nn::vit::Vit;
use loren::tensor::{DeviceSpec, MemTag, Rng};
use loren::{Ensemble, EnsembleError, InputError, PIXEL_RANGE};

mod common;
use common::temp_dir;

const NAMES: [&str; 3] = ["cat", "dog", "eel"];

/// `n` random 8×8 images of 3 classes with names and a scaling of their own, none of the
/// bundled digits'.
fn arrays(n: usize) -> Dataset {
    let mut rng = Rng::new(7);
    let pixels: Vec<f32> = (0..n * 64).map(|_| rng.uniform(0.0, 1.0)).collect();
    let labels = (0..n as u32).map(|i| i % 3).collect();
    let names = NAMES.map(String::from).to_vec();
    Dataset::new("my-arrays", [1, 8, 8], pixels, labels, names)
        .unwrap()
        .with_normalization(vec![0.2], vec![0.4])
        .unwrap()
}

/// `n` images of 3 channels, made of the pixels of `3 n` of [`arrays`]' one-channel images.
fn three_channels(n: usize) -> Dataset {
    let mut data = arrays(3 * n);
    data.channels = 3;
    data.labels.truncate(n);
    data.norm_mean = vec![0.2; 3];
    data.norm_std = vec![0.4; 3];
    data
}

fn backbone_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/backbone-tiny.safetensors")
}

fn model() -> Vit {
    let vit = VitConfig::tiny();
    let ensemble = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method: Method::Lora,
        members: 2,
        classes: 3,
        lora: LoraConfig {
            rank: 2,
            ..LoraConfig::default()
        },
    };
    let mut model = Vit::new(&vit, &ensemble, &DeviceSpec::Cpu.open().unwrap(), 1).unwrap();
    let backbone = read_backbone(&backbone_path(), &vit).unwrap().file;
    model.load_backbone(&backbone).unwrap();
    model
}

fn config() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        ..TrainConfig::plain(8, 1e-3, Default::default())
    }
}

/// The 24 images of [`arrays`], a [`model`] fitted to them for one epoch, and the checkpoint
/// `fit` wrote into `dir`.
fn trained_into(dir: &Path) -> (Dataset, Vit, PathBuf) {
    let data = arrays(24);
    let mut model = model();
    let ckpt = dir.join("checkpoint.safetensors");
    let spec = CheckpointSpec {
        path: Some(ckpt.clone()),
        ..Default::default()
    };
    Trainer::new(&mut model, &config(), data.len())
        .unwrap()
        .fit(&data, &spec, &mut Quiet)
        .unwrap();
    (data, model, ckpt)
}

/// Adapters trained on one frozen backbone resume on that backbone only: on any other weights
/// they would train on as if nothing had changed, and the next save would record the new ones.
#[test]
fn a_run_resumes_on_the_backbone_it_trained_on() {
    let (data, _, ckpt) = trained_into(&temp_dir("resume-backbone"));
    let file = TensorFile::read(&ckpt).unwrap();
    let two = TrainConfig {
        epochs: 2,
        ..config()
    };
    let refusal = |model: &mut Vit| {
        let mut trainer = Trainer::new(model, &two, data.len()).unwrap();
        trainer.resume(&file).unwrap_err().to_string()
    };
    // Random weights.
    let ours = model();
    let mut random = Vit::new(&ours.config, &ours.ensemble, ours.device(), 1).unwrap();
    let e = refusal(&mut random);
    assert!(e.contains("the model's was not loaded from a file"), "{e}");
    // The backbone with one weight changed.
    let mut changed = model();
    let ours = read_backbone(&backbone_path(), &changed.config)
        .unwrap()
        .file;
    let mut tensors: std::collections::BTreeMap<_, _> = ours
        .names()
        .map(|n| (n.to_string(), ours.get(n).unwrap().clone()))
        .collect();
    tensors.values_mut().next().unwrap().data[0] += 1.0;
    let path = Path::new("other/backbone.safetensors");
    let other = TensorFile::from_entries(path, tensors, ours.metadata().clone());
    changed.load_backbone(&other).unwrap();
    let e = refusal(&mut changed);
    assert!(
        e.contains("trained from a backbone with fingerprint"),
        "{e}"
    );
    assert!(e.contains("other/backbone.safetensors has "), "{e}");
    // Epochs of another length than it saved: its step is no epoch's end here.
    let mut ours = model();
    let e = Trainer::new(&mut ours, &two, 16)
        .unwrap()
        .resume(&file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("saved at step 3 after 1 epoch, which is no epoch's end at this trainer's 2"),
        "{e}"
    );
    // The weights it names, loaded: it resumes.
    let mut model = model();
    Trainer::new(&mut model, &two, data.len())
        .unwrap()
        .resume(&file)
        .unwrap();
}

/// The 24 images of [`arrays`], three epochs of [`config`], checkpointed in `dir`.
fn three_epochs_into(dir: &Path) -> (Dataset, TrainConfig, CheckpointSpec) {
    let three = TrainConfig {
        epochs: 3,
        ..config()
    };
    let spec = CheckpointSpec {
        path: Some(dir.join("checkpoint.safetensors")),
        ..Default::default()
    };
    (arrays(24), three, spec)
}

/// A checkpoint that cannot be written at an epoch's end (a full disk, here a folder where its
/// temporary file goes) stops training with the error and what was kept: the last good
/// checkpoint, whole, which resumes.
#[test]
fn a_checkpoint_that_cannot_be_written_says_what_was_kept() {
    struct BlockSecond(PathBuf);
    impl Observer for BlockSecond {
        fn epoch(&mut self, info: &EpochInfo) {
            if info.epoch == 2 {
                std::fs::create_dir_all(&self.0).unwrap();
            }
        }
    }
    let dir = temp_dir("not-saved");
    let (data, three, spec) = three_epochs_into(&dir);
    let ckpt = dir.join("checkpoint.safetensors");
    let mut model = model();
    let mut block = BlockSecond(dir.join("checkpoint.safetensors.tmp"));
    let e = Trainer::new(&mut model, &three, data.len())
        .unwrap()
        .fit(&data, &spec, &mut block)
        .unwrap_err();
    assert!(matches!(e, NnError::NotSaved { .. }), "{e:?}");
    let kept = format!(
        "; the last good checkpoint is kept at {0} (--resume {0} continues from its epoch's end)",
        ckpt.display()
    );
    assert!(e.to_string().ends_with(&kept), "{e}");
    let file = TensorFile::read(&ckpt).unwrap();
    assert_eq!(file.meta("epoch").unwrap(), "1");
    std::fs::remove_dir(dir.join("checkpoint.safetensors.tmp")).unwrap();
    let mut model = self::model();
    let mut trainer = Trainer::new(&mut model, &three, data.len()).unwrap();
    trainer.resume(&file).unwrap();
    trainer.fit(&data, &spec, &mut Quiet).unwrap();
}

/// A trainer runs and saves epochs whole: one stopped inside an epoch, or stepped by hand, is
/// told to resume from its checkpoint; a stop asked for in an epoch's last step keeps the epoch.
#[test]
fn a_trainer_runs_and_saves_whole_epochs_only() {
    struct StopAt(u64);
    impl Observer for StopAt {
        fn step(&mut self, _: &StepInfo) {
            self.0 = self.0.saturating_sub(1);
        }
        fn stop_requested(&self) -> bool {
            self.0 == 0
        }
    }
    let (data, three, spec) = three_epochs_into(&temp_dir("whole-epochs"));
    let ckpt = spec.path.clone().unwrap();
    // 3 steps an epoch: stopped after the 2nd, inside the first epoch.
    let mut model = model();
    let mut trainer = Trainer::new(&mut model, &three, data.len()).unwrap();
    let e = trainer.fit(&data, &spec, &mut StopAt(2)).unwrap_err();
    assert!(matches!(e, NnError::Interrupted { step: 2, .. }), "{e:?}");
    let e = trainer
        .fit(&data, &spec, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("at step 2, inside epoch 1 (which began at step 0)"),
        "{e}"
    );
    assert!(e.contains("resume it from its last checkpoint"), "{e}");
    let e = trainer.save(&ckpt, &Default::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("a checkpoint is written at an epoch's end"),
        "{e}"
    );
    // Stepped by hand: the same.
    let mut model = self::model();
    let mut trainer = Trainer::new(&mut model, &three, data.len()).unwrap();
    trainer.step(&data.batch(&[0, 1, 2, 3], None)).unwrap();
    let e = trainer
        .run_epoch(&data, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at step 1, inside epoch 1"), "{e}");
    // A stop in the 3rd step, the first epoch's last: the epoch ends and is saved first.
    let mut model = self::model();
    let mut trainer = Trainer::new(&mut model, &three, data.len()).unwrap();
    let e = trainer.fit(&data, &spec, &mut StopAt(3)).unwrap_err();
    assert!(matches!(e, NnError::Interrupted { step: 3, .. }), "{e:?}");
    assert_eq!(TensorFile::read(&ckpt).unwrap().meta("epoch").unwrap(), "1");
}

/// A program that runs its epochs itself and saves with `input_metadata` writes a checkpoint
/// `Ensemble::load` reads, predicting as the model it saved.
#[test]
fn a_checkpoint_saved_by_hand_with_its_input_metadata_loads_as_an_ensemble() {
    let data = arrays(24);
    let mut model = model();
    let path = temp_dir("saved-by-hand").join("checkpoint.safetensors");
    {
        let mut trainer = Trainer::new(&mut model, &config(), data.len()).unwrap();
        trainer.run_epoch(&data, &mut Quiet).unwrap();
        let extra = input_metadata(&data).into_iter().collect();
        trainer.save(&path, &extra).unwrap();
    }
    let loaded = Ensemble::load(&path, DeviceSpec::Cpu).unwrap();
    assert_eq!(loaded.class_names(), NAMES);
    let here = Ensemble::from_trained(model, &data).unwrap();
    let pixels = arrays(5).images.to_f32().into_owned();
    assert_eq!(
        loaded.predict_pixels(&pixels, 5).unwrap(),
        here.predict_pixels(&pixels, 5).unwrap()
    );
}

/// Throughput counts the images trained on: a batch larger than the data is the data, once.
#[test]
fn a_fit_counts_the_images_it_trained_on() {
    let data = arrays(24);
    let mut model = model();
    let big = TrainConfig {
        epochs: 2,
        ..TrainConfig::plain(100, 1e-3, Default::default())
    };
    let summary = Trainer::new(&mut model, &big, data.len())
        .unwrap()
        .fit(&data, &CheckpointSpec::default(), &mut Quiet)
        .unwrap();
    let images = summary.images_per_second * summary.seconds;
    assert!((images - 48.0).abs() < 1e-6 * 48.0, "{images}");
}

#[test]
fn an_ensemble_trained_from_arrays_reads_back_as_it_was_trained() {
    let dir = temp_dir("from-arrays");
    let (data, model, ckpt) = trained_into(&dir);

    // No backbone given: the checkpoint names the one the model was loaded from.
    let ens = Ensemble::load(&ckpt, DeviceSpec::Cpu).unwrap();
    assert_eq!(ens.normalization(), (&[0.2f32][..], &[0.4f32][..]));
    assert_eq!(ens.class_names(), NAMES);
    let shown = format!("{ens:?}");
    assert!(
        shown.contains("method: Lora, members: 2") && shown.contains("device: \"cpu\""),
        "{shown}"
    );
    // The same probabilities as the model in memory gives the data scaled as it trained.
    let pixels: Vec<f32> = (0..data.len())
        .flat_map(|i| {
            let mut image = vec![0.0; 64];
            data.read_image(i, &mut image);
            image
        })
        .collect();
    let read_back = ens.predict_pixels(&pixels, data.len()).unwrap();
    let in_memory = predict(&model, &data, 8, &mut |_| Ok(())).unwrap().mean();
    for (b, want) in in_memory.chunks(3).enumerate() {
        for (got, want) in read_back.mean(b).iter().zip(want) {
            assert!((got - want).abs() < 1e-5, "image {b}: {got} against {want}");
        }
    }

    // An export onto the checkpoint it is made from is refused as the output's fault.
    let e = loren::ensemble::export(&ckpt, None, &ckpt).unwrap_err();
    assert!(
        matches!(&e, EnsembleError::Output { path, .. } if path == &ckpt),
        "{e:?}"
    );

    // What predicting used, beside the weights it keeps.
    let after = ens.memory();
    assert!(after.live(MemTag::FrozenWeights) > 0, "{after:?}");
    assert!(after.peak(MemTag::Activations) > 0, "{after:?}");
    assert_eq!(after.live(MemTag::Activations), 0, "{after:?}");
    ens.reset_memory_peaks();
    assert_eq!(ens.memory().total_peak, ens.memory().total_live);

    // Other weights under the backbone's name are refused.
    let original = TensorFile::read(&backbone_path()).unwrap();
    let mut tensors: Vec<_> = original
        .names()
        .map(|n| (n.to_string(), original.get(n).unwrap().clone()))
        .collect();
    tensors[0].1.data[0] += 0.5;
    let other = dir.join("other-backbone.safetensors");
    checkpoint::write(&other, &tensors, original.metadata().clone()).unwrap();
    let Err(e) = Ensemble::open(&ckpt, Some(&other), DeviceSpec::Cpu) else {
        panic!("a checkpoint was opened with other backbone weights");
    };
    assert!(
        matches!(&e, EnsembleError::File { path, .. } if path == &ckpt),
        "{e:?}"
    );
    assert!(e.to_string().contains("fingerprint"), "{e}");
    assert!(e.to_string().contains(&*other.to_string_lossy()), "{e}");
    assert!(e.to_string().contains("Ensemble::open's backbone"), "{e}");

    // A non-finite input is named by its image and place.
    let mut bad = pixels[..2 * 64].to_vec();
    bad[64 + 8 + 3] = f32::NAN;
    let e = ens.predict_pixels(&bad, 2).unwrap_err();
    assert!(
        matches!(
            e,
            EnsembleError::Input(InputError::NotFinite { image: 1, at: [0, 1, 3], value })
                if value.is_nan()
        ),
        "{e:#}"
    );
    assert!(
        e.to_string()
            .contains("image 1: its value at channel 0, row 1, column 3 is NaN")
    );
    // Pixels of 0..=255 not divided by 255 are named by the first one past the range...
    let bytes: Vec<f32> = pixels[..2 * 64]
        .iter()
        .map(|p| (p * 255.0).round())
        .collect();
    let first = bytes.iter().position(|p| !PIXEL_RANGE.contains(p)).unwrap();
    let e = ens.predict_pixels(&bytes, 2).unwrap_err();
    assert!(
        matches!(
            e,
            EnsembleError::Input(InputError::PixelRange { image, at, value })
                if image == first / 64
                    && at == [0, first % 64 / 8, first % 8]
                    && value == bytes[first]
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("divided by 255"), "{e}");
    // ...as are images already normalised, while a resampling filter's overshoot passes.
    let normalised = ens.normalize(&pixels[..2 * 64], 2).unwrap();
    assert!(ens.predict(&normalised, 2).is_ok());
    let e = ens.predict_pixels(&normalised, 2).unwrap_err();
    assert!(
        matches!(e, EnsembleError::Input(InputError::PixelRange { .. })),
        "{e:#}"
    );
    let mut overshoot = pixels[..2 * 64].to_vec();
    (overshoot[0], overshoot[1]) = (1.2, -0.2);
    assert!(ens.predict_pixels(&overshoot, 2).is_ok());
    // So is an input of other than the images the caller says it holds.
    let e = ens.predict_pixels(&pixels[..100], 2).unwrap_err();
    assert!(
        matches!(
            e,
            EnsembleError::Input(InputError::Length {
                batch: 2,
                shape: [1, 8, 8],
                len: 100
            })
        ),
        "{e:?}"
    );
    // Any finite values, up to f32's largest, give probabilities: the patch embedding's sums and
    // the LayerNorms' squares do not overflow.
    let mut huge = ens.normalize(&pixels[..3 * 64], 3).unwrap();
    huge[64..128]
        .iter_mut()
        .for_each(|v| *v = v.signum() * 3e38);
    let p = ens.predict(&huge, 3).unwrap();
    assert!(p.probs.iter().all(|v| v.is_finite()), "{p:?}");
    // A batch whose values would overflow a usize is said in full, not wrapped.
    let e = ens
        .predict_pixels(&pixels[..100], usize::MAX / 2)
        .unwrap_err();
    let want = (usize::MAX / 2) as u128 * 64;
    assert!(e.to_string().contains(&format!("are {want} values")), "{e}");
    let e = ens.predict_pixels(&[], 0).unwrap_err();
    assert!(
        matches!(e, EnsembleError::Input(InputError::NoImages)),
        "{e:?}"
    );
}

/// A resumed run stopped before its first checkpoint names the one it resumed from, and the
/// --epochs that goes on extending it.
#[test]
fn a_resumed_run_stopped_early_says_how_to_go_on() {
    struct StopAtOnce;
    impl Observer for StopAtOnce {
        fn stop_requested(&self) -> bool {
            true
        }
    }
    let dir = temp_dir("resumed-stopped");
    let (data, _, ckpt) = trained_into(&dir);
    let file = TensorFile::read(&ckpt).unwrap();
    let three = TrainConfig {
        epochs: 3,
        ..config()
    };
    let mut model = model();
    let mut trainer = Trainer::new(&mut model, &three, data.len()).unwrap();
    trainer.resume(&file).unwrap();
    let spec = CheckpointSpec {
        path: Some(ckpt.clone()),
        ..Default::default()
    };
    let e = trainer.fit(&data, &spec, &mut StopAtOnce).unwrap_err();
    let go_on = format!(
        "the checkpoint it resumed from, {0}, is the last good one (--resume {0} --epochs 3 \
         continues from it)",
        ckpt.display()
    );
    assert!(
        matches!(&e, NnError::Interrupted { kept, .. } if *kept == go_on),
        "{e:?}"
    );
}

/// A run knows before its first step how large its checkpoints are, to hold them against the
/// room on the disk: the tensors exactly, and at most a MiB for the header.
#[test]
fn a_trainer_knows_the_size_of_its_checkpoint() {
    let dir = temp_dir("checkpoint-bytes");
    let (data, _, ckpt) = trained_into(&dir);
    let mut model = model();
    let trainer = Trainer::new(&mut model, &config(), data.len()).unwrap();
    let (estimate, written) = (
        trainer.checkpoint_bytes(),
        std::fs::metadata(&ckpt).unwrap().len(),
    );
    assert!(
        written <= estimate && estimate - written <= 1 << 20,
        "{estimate} for {written}"
    );
    let e = loren::nn::checkpoint::check_room(&ckpt, u64::MAX)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MiB free: free some space"), "{e}");
    loren::nn::checkpoint::check_room(&ckpt, written).unwrap();
}

/// A PNG's bytes, `w`×`h` of `color`, its samples drawn from `seed`.
fn png_bytes(w: u32, h: u32, color: png::ColorType, seed: usize) -> Vec<u8> {
    let n = (w * h) as usize * color.samples();
    let samples: Vec<u8> = (0..n)
        .map(|i| ((i * 37 + seed * 101) % 256) as u8)
        .collect();
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, w, h);
    enc.set_color(color);
    enc.write_header()
        .unwrap()
        .write_image_data(&samples)
        .unwrap();
    bytes
}

/// Image files' bytes predict as the same files do through the loader `loren predict` uses
/// (read_images, which rounds each resized pixel to 8 bits), bit for bit, on a device the program
/// opened itself; bytes that are not an image are the caller's fault, by image.
#[test]
fn encoded_images_predict_as_their_files_do() {
    let dir = temp_dir("encoded");
    let (_, _, ckpt) = trained_into(&dir);
    let device = DeviceSpec::Cpu.open().unwrap();
    let ens = Ensemble::open_on(&ckpt, None, &device).unwrap();
    let images = [
        png_bytes(12, 10, png::ColorType::Rgb, 1),
        png_bytes(8, 8, png::ColorType::Grayscale, 2),
        png_bytes(5, 9, png::ColorType::Rgba, 3),
    ];
    let files: Vec<PathBuf> = (0..images.len())
        .map(|i| dir.join(format!("{i}.png")))
        .collect();
    for (file, bytes) in files.iter().zip(&images) {
        std::fs::write(file, bytes).unwrap();
    }
    let pixels = read_images(&files, ens.image_shape())
        .unwrap()
        .to_f32()
        .into_owned();
    let want = ens.predict_pixels(&pixels, 3).unwrap();
    let got = ens.predict_encoded(&images).unwrap();
    assert_eq!(got.probs, want.probs);

    let e = ens
        .predict_encoded(&[&images[0][..], b"GIF89a\x01\x00\x01\x00"])
        .unwrap_err();
    assert!(
        matches!(
            &e,
            EnsembleError::Input(InputError::Undecodable { image: 1, .. })
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("image 1: cannot decode the image: not a PNG"),
        "{e}"
    );
    let none: [&[u8]; 0] = [];
    let e = ens.predict_encoded(&none).unwrap_err();
    assert!(
        matches!(e, EnsembleError::Input(InputError::NoImages)),
        "{e:?}"
    );
    // Scaling alone checks the images' length as predicting does.
    let e = ens.normalize(&pixels[..7], 1).unwrap_err();
    assert!(matches!(e, InputError::Length { len: 7, .. }), "{e:?}");
}

#[test]
fn load_errors_say_whose_fault_they_are() {
    // A file not there, or not an ensemble, is the file's fault, and names it.
    let missing = Path::new("no/such/ensemble.safetensors");
    let e = Ensemble::load(missing, DeviceSpec::Cpu).unwrap_err();
    assert!(
        matches!(&e, EnsembleError::File { path, .. } if path == missing),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("no/such/ensemble.safetensors"),
        "{e}"
    );
    // A server tells a missing model from an unusable one by the I/O error's kind.
    assert!(
        matches!(
            &e,
            EnsembleError::File {
                io: Some(std::io::ErrorKind::NotFound),
                ..
            }
        ),
        "{e:?}"
    );
    let e = Ensemble::load(backbone_path(), DeviceSpec::Cpu).unwrap_err();
    assert!(matches!(&e, EnsembleError::File { io: None, .. }), "{e:?}");
    assert!(e.to_string().contains("neither an ensemble"), "{e}");
    // A device that cannot be opened is the device's, so that a caller may fall back to the CPU.
    let e = Ensemble::load(backbone_path(), DeviceSpec::Cuda(99)).unwrap_err();
    assert!(matches!(&e, EnsembleError::Device(_)), "{e:?}");
}

#[test]
fn fit_refuses_data_its_trainer_was_not_made_for() {
    let mut model = model();
    let spec = CheckpointSpec::default();
    let fails = |model: &mut Vit, train_len: usize, data: &Dataset| {
        let mut trainer = Trainer::new(model, &config(), train_len).unwrap();
        format!("{:#}", trainer.fit(data, &spec, &mut Quiet).unwrap_err())
    };
    // Made for 10 images (2 steps an epoch): its schedule would end after 2 of 3 steps.
    let e = fails(&mut model, 10, &arrays(24));
    assert!(e.contains("made for 2"), "{e}");
    // Four classes for three heads.
    let mut four = arrays(24);
    four.classes = 4;
    four.class_names.push("fox".into());
    let e = fails(&mut model, 24, &four);
    assert!(
        e.contains("4 classes, and the heads of model 'tiny' have 3"),
        "{e}"
    );
    // Images the model does not take: checked before the first step, not found by it.
    let e = fails(&mut model, 24, &three_channels(24));
    assert!(e.contains("3 channels, and model 'tiny' takes 1"), "{e}");
    let e = fails(&mut model, 24, &arrays(24).resized_on_batch(16, 16));
    assert!(
        e.contains("16x16 images, and model 'tiny' takes 8x8"),
        "{e}"
    );
    // A label taken out through the public fields: one image no longer has one.
    let mut short = arrays(24);
    short.labels.pop();
    let e = fails(&mut model, 23, &short);
    assert!(e.contains("23"), "{e}");
    // An epoch or a prediction on its own checks them too: no normalisation is an error, not
    // a division by zero.
    let mut unnormalised = arrays(24);
    unnormalised.norm_mean.clear();
    let e = Trainer::new(&mut model, &config(), 24)
        .unwrap()
        .run_epoch(&unnormalised, &mut Quiet)
        .unwrap_err();
    assert!(format!("{e:#}").contains("norm"), "{e:#}");
    let e = format!(
        "{:#}",
        predict(&model, &unnormalised, 8, &mut |_| Ok(())).unwrap_err()
    );
    assert!(e.contains("norm"), "{e}");
    let e = predict(&model, &three_channels(8), 8, &mut |_| Ok(())).unwrap_err();
    assert!(format!("{e:#}").contains("takes 1"), "{e:#}");
    // Images of other classes are predicted: an out-of-distribution set's labels are its own.
    let mut four = arrays(8);
    four.classes = 4;
    four.class_names.push("fox".into());
    assert_eq!(
        predict(&model, &four, 8, &mut |_| Ok(())).unwrap().classes,
        3
    );
}

/// A program that trained an ensemble predicts with it as it is, with no file between, as the
/// checkpoint its training wrote would; and is told when the data it gives is not the model's.
#[test]
fn an_ensemble_trained_here_predicts_as_its_checkpoint_does() {
    let (data, mut model, ckpt) = trained_into(&temp_dir("from-trained"));
    let pixels = arrays(5).images.to_f32().into_owned();
    let loaded = Ensemble::load(&ckpt, DeviceSpec::Cpu).unwrap();

    // Data that is not the model's is refused by what is wrong with it, the model kept.
    let mut four = arrays(24);
    four.classes = 4;
    four.class_names.push("fox".into());
    let mut unnormalised = arrays(24);
    unnormalised.norm_std.clear();
    for (bad, says) in [
        (four, "4 classes, and the heads of model 'tiny' have 3"),
        (
            three_channels(8),
            "images of 3 channels, and model 'tiny' takes 1",
        ),
        (
            arrays(24).resized_on_batch(4, 4),
            "batches of 4x4 images, and model 'tiny' takes 8x8",
        ),
        (unnormalised, "norm_mean and norm_std need 1 finite values"),
    ] {
        let e = Ensemble::from_trained(model, &bad).unwrap_err();
        assert!(matches!(e.error(), EnsembleError::Mismatch(_)), "{e:?}");
        // Typed, for a caller to act on.
        let classes = matches!(
            e.error(),
            EnsembleError::Mismatch(DataError::ModelClasses {
                expected: 3,
                found: 4,
                ..
            })
        );
        assert_eq!(classes, says.starts_with("4 classes"), "{e:?}");
        assert!(e.to_string().starts_with("dataset `my-arrays`: "), "{e}");
        assert!(e.to_string().contains(says), "{e}");
        // The model comes back as it was.
        model = e.into_model();
    }

    let here = Ensemble::from_trained(model, &data).unwrap();
    let want = loaded.predict_pixels(&pixels, 5).unwrap();
    assert_eq!(here.predict_pixels(&pixels, 5).unwrap(), want);
    // Its model, borrowed, scores a whole `Dataset` of those pixels as it predicts them.
    let scored = predict(here.model(), &arrays(5), 5, &mut |_| Ok(())).unwrap();
    assert_eq!(scored, want.predictions());
    // Image 5 of 5 is past the batch, not member 1's image 0.
    assert!(std::panic::catch_unwind(|| want.member(0, 5).to_vec()).is_err());
    // And the model it took comes back out, to train on or to serve again.
    let again = Ensemble::from_trained(here.into_model(), &data).unwrap();
    assert_eq!(again.predict_pixels(&pixels, 5).unwrap(), want);
    let here = again;
    assert_eq!(here.normalization(), loaded.normalization());
    assert_eq!(here.class_names(), NAMES);
    let keys = [
        "format",
        "vit",
        "ensemble",
        "layout",
        "norm_mean",
        "norm_std",
        "class_names",
    ];
    let mut held: Vec<_> = here.metadata().keys().map(String::as_str).collect();
    held.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(held, want);
    for key in keys {
        assert_eq!(here.metadata()[key], loaded.metadata()[key], "{key}");
    }
}

/// What a server hands between threads, or returns through `?` into `anyhow`, must be `Send` and
/// `Sync`: a compile-time check.
#[test]
fn the_ensemble_and_its_errors_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Ensemble>();
    send_sync::<EnsembleError>();
    send_sync::<loren::FromTrainedError>();
}

/// A server trains on a worker thread of its own: the `Trainer`, validation included, moves
/// there and trains as it would have where it was made.
#[test]
fn a_trainer_trains_on_another_thread_as_it_would_here() {
    let (data, val) = (arrays(24), arrays(8));
    let scored = AtomicUsize::new(0);
    fn trainer<'m>(
        model: &'m mut Vit,
        len: usize,
        val: &'m Dataset,
        scored: &'m AtomicUsize,
    ) -> Trainer<'m> {
        let mut trainer = Trainer::new(model, &config(), len).unwrap();
        trainer.validate_every(
            1,
            Box::new(move |model: &Vit| {
                scored.fetch_add(1, Ordering::Relaxed);
                predict(model, val, 8, &mut |_| Ok(())).map(|_| None)
            }),
        );
        trainer
    }
    let probs = |model: &Vit| predict(model, &val, 8, &mut |_| Ok(())).unwrap().mean();

    let mut here = model();
    let summary = trainer(&mut here, data.len(), &val, &scored)
        .fit(&data, &CheckpointSpec::default(), &mut Quiet)
        .unwrap();
    let mut there = model();
    let mut moved = trainer(&mut there, data.len(), &val, &scored);
    let summary_there = std::thread::scope(|s| {
        s.spawn(move || moved.fit(&data, &CheckpointSpec::default(), &mut Quiet))
            .join()
            .unwrap()
            .unwrap()
    });
    assert_eq!(scored.into_inner(), 2, "each run scores its one epoch");
    assert_eq!(
        summary.epochs[0].mean_loss,
        summary_there.epochs[0].mean_loss
    );
    assert_eq!(probs(&here), probs(&there));
}

/// The signal handlers are the process's: one test at a time changes them.
#[cfg(unix)]
static SIGNAL_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A host's handler installed with sigaction(2) comes back whole, `SA_SIGINFO` and all (a
/// handler that takes three arguments, as signal-hook's and tokio's do, called with one would
/// read garbage); SIGTERM asks a run to stop as Ctrl-C does, and is handed back alike.
#[cfg(unix)]
#[test]
fn a_host_programs_sigaction_handlers_come_back_whole() {
    use loren::interrupt::{Guard, exit_status, requested};
    let _alone = SIGNAL_TESTS.lock();

    static HOST_SAW: AtomicUsize = AtomicUsize::new(0);
    extern "C" fn host(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        HOST_SAW.fetch_add(1, Ordering::SeqCst);
    }
    let host_handler = host as *const () as libc::sighandler_t;
    let flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: zeroed sigactions are valid to fill in; the handler only touches an atomic, and
    // raise(3) runs it on this thread.
    let current = |signal| unsafe {
        let mut now: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut now);
        (now.sa_sigaction, now.sa_flags & flags)
    };
    for signal in [libc::SIGTERM, libc::SIGINT] {
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = host_handler;
            act.sa_flags = flags;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(signal, &act, std::ptr::null_mut());
        }
    }
    let guard = Guard::install();
    assert_ne!(
        current(libc::SIGTERM).0,
        host_handler,
        "the guard takes SIGTERM"
    );
    // Restarting what it interrupts, as signal(2) did: CUDA's calls need not retry on EINTR.
    assert_eq!(current(libc::SIGTERM).1, libc::SA_RESTART);
    unsafe { libc::raise(libc::SIGTERM) };
    assert!(requested(), "SIGTERM asks the run to stop");
    assert_eq!(exit_status(), 143);
    assert_eq!(HOST_SAW.load(Ordering::SeqCst), 0);
    assert_eq!(
        current(libc::SIGTERM),
        (host_handler, flags),
        "the next is the host's"
    );
    unsafe { libc::raise(libc::SIGTERM) };
    assert_eq!(HOST_SAW.load(Ordering::SeqCst), 1);
    assert_ne!(
        current(libc::SIGINT).0,
        host_handler,
        "Ctrl-C is still the guard's"
    );
    drop(guard);
    assert_eq!(current(libc::SIGINT), (host_handler, flags));
    unsafe { libc::raise(libc::SIGINT) };
    assert_eq!(HOST_SAW.load(Ordering::SeqCst), 2);
}

/// A program that embeds loren keeps its own Ctrl-C handler: a run's guard takes Ctrl-C only
/// while it lives, hands it back after the first press, and restores it when dropped.
#[cfg(unix)]
#[test]
fn a_host_programs_ctrl_c_handler_is_handed_back() {
    use loren::interrupt::{Guard, requested};
    let _alone = SIGNAL_TESTS.lock();

    const SIGINT: i32 = 2;
    static HOST_SAW: AtomicUsize = AtomicUsize::new(0);
    extern "C" fn host(_: i32) {
        HOST_SAW.fetch_add(1, Ordering::SeqCst);
    }
    unsafe extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
        fn raise(sig: i32) -> i32;
    }
    let host_handler = host as *const () as usize;
    // SAFETY: the handler only touches an atomic; raise(3) runs handlers on this thread.
    let current = || unsafe {
        let h = signal(SIGINT, host_handler);
        signal(SIGINT, h);
        h
    };
    unsafe { signal(SIGINT, host_handler) };

    let guard = Guard::install();
    assert_ne!(current(), host_handler, "the guard takes Ctrl-C");
    assert!(!requested());
    unsafe { raise(SIGINT) };
    assert!(requested(), "the first Ctrl-C asks the run to stop");
    assert_eq!(HOST_SAW.load(Ordering::SeqCst), 0);
    assert_eq!(current(), host_handler, "the next Ctrl-C is the host's");
    unsafe { raise(SIGINT) };
    assert_eq!(HOST_SAW.load(Ordering::SeqCst), 1);
    drop(guard);
    assert_eq!(current(), host_handler);

    // Dropped without a press, nested or not, it restores the host's too.
    let outer = Guard::install();
    let inner = Guard::install();
    drop(inner);
    assert_ne!(
        current(),
        host_handler,
        "an inner guard leaves the outer one's in place"
    );
    drop(outer);
    assert_eq!(current(), host_handler);
    unsafe { raise(SIGINT) };
    assert_eq!(HOST_SAW.load(Ordering::SeqCst), 2);
}
