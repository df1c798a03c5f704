//! The pretrained backbone that fine-tuning starts from: where the bundled one lives, how
//! `loren pretrain` makes it, and how a run finds (or first makes) it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use loren_nn::NnError;
use loren_nn::checkpoint::{self, TensorFile};
use loren_nn::config::{Activations, EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::Splits;
use loren_nn::eval::predict;
use loren_nn::import::{Imported, Scheme, import_backbone};
use loren_nn::metrics::calibration;
use loren_nn::train::{CheckpointSpec, TrainConfig, TrainSummary, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::DeviceSpec;
use serde::Serialize;

use crate::files::FileKind;
use crate::outputs::writable_file;
use crate::progress::{TrainBar, Verbosity};

/// Marks a file written by [`pretrain`].
pub const FORMAT: &str = "loren-backbone-v1";

/// Where the repository keeps the pretrained backbone of a config.
/// `assets/` under the working directory when the binary runs from a checkout (a copied
/// tree, a GPU machine), else the repository it was built from.
pub fn default_path(vit: &VitConfig) -> PathBuf {
    let file = Path::new("assets").join(format!("backbone-{}.safetensors", vit.name));
    if file.exists() {
        return file;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(file)
}

/// How `loren pretrain` trains a backbone: a single network, every weight trained from a random
/// start, on the pretrain split.
#[derive(Clone, Debug)]
pub struct PretrainSpec {
    pub vit: VitConfig,
    pub train: TrainConfig,
    pub seed: u64,
    pub device: DeviceSpec,
    pub out: PathBuf,
}

impl PretrainSpec {
    /// The recipe that made the bundled tiny backbone.
    pub fn bundled(out: PathBuf) -> PretrainSpec {
        PretrainSpec {
            vit: VitConfig::tiny(),
            train: TrainConfig {
                epochs: 300,
                batch_size: 64,
                lr: 1e-3,
                min_lr: 1e-5,
                warmup_steps: 100,
                warmup_from_zero: false,
                optimizer: loren_autograd::optim::OptimizerKind::adamw(0.05),
                grad_clip: Some(1.0),
                augment: loren_nn::data::Augment::digits(),
                shuffle: true,
                seed: 0,
                activations: Activations::Keep,
            },
            seed: 0,
            device: DeviceSpec::Auto,
            out,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PretrainResult {
    pub path: PathBuf,
    /// On the validation part; `None` when the run that asked for the backbone trains on that
    /// part (`--train-on-val`), so it has none.
    pub val_accuracy: Option<f64>,
    pub summary: TrainSummary,
}

/// Train a backbone on the pretrain split and write it, without its group axis, to `spec.out`.
pub fn pretrain(
    spec: &PretrainSpec,
    data: &Splits,
    verbosity: Verbosity,
) -> Result<PretrainResult> {
    if data.pretrain.is_empty() {
        bail!(
            "{} has no pretraining split: loren pretrain trains on the bundled digits; for CIFAR or an image folder, import pretrained weights with --backbone",
            data.train.name
        );
    }
    let device = crate::open_device(spec.device)?;
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method: Method::Single,
        members: 1,
        classes: data.pretrain.classes,
        lora: LoraConfig::default(),
    };
    let mut model = Vit::new(&spec.vit, &ens, &device, spec.seed)?;
    let summary = {
        let mut trainer = Trainer::new(&mut model, &spec.train, data.pretrain.len())?;
        if verbosity == Verbosity::Normal {
            // The first line of a log, terminal or not: how long the work ahead is.
            let epochs = spec.train.epochs;
            crate::note!(
                "pretrain: {} on {device}, {} images, {epochs} epoch{} of {} steps (batch {})",
                spec.vit.name,
                data.pretrain.len(),
                if epochs == 1 { "" } else { "s" },
                trainer.total_steps() / epochs.max(1) as u64,
                spec.train.batch_size
            );
        }
        let mut bar = TrainBar::new("pretrain", verbosity);
        let _ctrl_c = crate::interrupt::Guard::install();
        trainer.fit(&data.pretrain, &CheckpointSpec::default(), &mut bar)?
    };
    let val_accuracy = match &data.val {
        Some(val) => {
            let probs = predict(&model, val, 256, &mut |_| Ok(()))?;
            Some(calibration(&probs, &val.labels)?.accuracy)
        }
        None => None,
    };
    let mut tensors = model.backbone_tensors()?;
    // The pretraining head comes along for reference; fine-tuning starts new heads.
    for (name, e) in model.tensors(|name, _| name.starts_with("head."))? {
        tensors.push((format!("pretrain_{name}"), e));
    }
    let mut meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("vit".to_string(), serde_json::to_string(&spec.vit)?),
        ("train".to_string(), serde_json::to_string(&spec.train)?),
        ("seed".to_string(), spec.seed.to_string()),
        ("data".to_string(), "digits pretrain split".to_string()),
    ]);
    if let Some(acc) = val_accuracy {
        meta.insert("val_accuracy".to_string(), format!("{acc:.4}"));
    }
    checkpoint::write(&spec.out, &tensors, meta)?;
    Ok(PretrainResult {
        path: spec.out.clone(),
        val_accuracy,
        summary,
    })
}

/// The backbone a run starts from, in loren's names: `given` when set (it must exist), else
/// the config's bundled one, which is pretrained first when it is missing and the config is
/// `tiny`. Weights in timm, Hugging Face or torchvision naming are converted
/// ([`loren_nn::import`]), and `vit.ln_eps` is set to the epsilon their library trains with.
pub fn resolve(
    given: Option<&Path>,
    vit: &mut VitConfig,
    data: &Splits,
    verbosity: Verbosity,
) -> Result<TensorFile> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => bundled_or_pretrained(vit, data, verbosity)?,
    };
    // Only the digits have a pretraining split: other data met the digits' backbone.
    if given.is_none() && data.pretrain.is_empty() && verbosity == Verbosity::Normal {
        crate::note!(
            "note: {} starts from {}, pretrained on the 8x8 digits (images are {}resized to the \
             config's {}x{}); pass --config vit-b-32 --backbone FILE for real pretrained weights",
            data.train.name,
            path.display(),
            // Colour, where there is any, is lost on the way: the one channel is the luma.
            if vit.channels == 1 {
                "read in grey and "
            } else {
                ""
            },
            vit.image_size,
            vit.image_size
        );
    }
    let imported = match given {
        Some(_) => read_backbone(&path, vit).context("--backbone")?,
        None => read_backbone(&path, vit)?,
    };
    if let Some(eps) = imported.ln_eps {
        vit.ln_eps = eps;
    }
    if verbosity == Verbosity::Normal && imported.scheme != Scheme::Loren {
        let resampled = if imported.interpolated {
            ", position embeddings resampled to the config's patch grid"
        } else {
            ""
        };
        crate::note!(
            "backbone {}: {} weights{resampled}",
            path.display(),
            imported.scheme
        );
    }
    Ok(imported.file)
}

/// What can go wrong reading a backbone with [`read_backbone`].
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// The file cannot be read, or is no tensor file; the message names it.
    #[error(transparent)]
    Read(NnError),
    /// Its tensors hold no ViT of the config asked for, in any naming scheme loren reads.
    /// The reason is in the message, not a `source`: printed as a chain it would show twice.
    #[error("importing the backbone for config '{config}': {reason}")]
    Import { config: String, reason: NnError },
    /// A file of loren's own that is not a backbone: an exported ensemble or a training
    /// checkpoint, given where the frozen weights go.
    #[error("{}: {what}, not a backbone: {advice}", path.display())]
    NotABackbone {
        path: PathBuf,
        what: &'static str,
        advice: &'static str,
    },
}

/// Read a backbone file in any naming scheme and convert it for `vit`. A scheme whose library
/// trains with another LayerNorm epsilon says so in [`Imported::ln_eps`] (Hugging Face's 1e-12):
/// set `vit.ln_eps` from it before building the model, or the imported weights run with loren's
/// 1e-6.
pub fn read_backbone(path: &Path, vit: &VitConfig) -> Result<Imported, BackboneError> {
    let file = TensorFile::read(path).map_err(BackboneError::Read)?;
    let not_one = match FileKind::of(file.metadata()) {
        FileKind::Export => Some((
            "an exported ensemble",
            "it holds its own backbone (loren predict --model and loren eval --checkpoint read \
             it); give the backbone it was trained from",
        )),
        FileKind::Checkpoint => Some((
            "a training checkpoint",
            "give the backbone it was trained from (its `backbone` metadata names it)",
        )),
        FileKind::Backbone | FileKind::Other => None,
    };
    if let Some((what, advice)) = not_one {
        return Err(BackboneError::NotABackbone {
            path: path.to_path_buf(),
            what,
            advice,
        });
    }
    import_backbone(file, vit).map_err(|reason| BackboneError::Import {
        config: vit.name.clone(),
        reason,
    })
}

/// The frozen weights a training checkpoint is used with (by `eval` and `export`): `given`
/// (--backbone), else the backbone the checkpoint recorded; none when it recorded none.
pub fn checkpoint_backbone(
    file: &TensorFile,
    given: Option<&Path>,
    vit: &VitConfig,
) -> Result<Option<TensorFile>> {
    let recorded = file.metadata().get("backbone").map(Path::new);
    Ok(match (given, recorded) {
        (Some(p), _) => Some(
            read_backbone(p, vit)
                .context("the backbone given (--backbone, or Ensemble::open's backbone)")?
                .file,
        ),
        (None, Some(p)) => Some(
            read_backbone(p, vit)
                .context(
                    "the backbone the checkpoint was trained from (name another with --backbone, \
                     or with Ensemble::open's backbone)",
                )?
                .file,
        ),
        (None, None) => None,
    })
}

/// The config's bundled backbone, pretrained first when it is `tiny`'s and missing.
fn bundled_or_pretrained(vit: &VitConfig, data: &Splits, verbosity: Verbosity) -> Result<PathBuf> {
    let path = default_path(vit);
    if path.exists() {
        return Ok(path);
    }
    if vit != &VitConfig::tiny() {
        bail!(
            "no pretrained backbone for '{}': pass --backbone FILE (the README shows how to import timm, Hugging Face or torchvision weights)",
            vit.name
        );
    }
    if data.pretrain.is_empty() {
        bail!(
            "no backbone at {} and {} has no pretraining split to make one: pass --backbone FILE, or run loren pretrain first",
            path.display(),
            data.train.name
        );
    }
    // Pretraining takes minutes: first make sure its result can be kept.
    writable_file(&path, "the bundled backbone's path").context(
        "no bundled backbone to start from, and none can be pretrained into its place: \
         pass --backbone FILE (make one with loren pretrain --out FILE)",
    )?;
    let spec = PretrainSpec::bundled(path.clone());
    if verbosity == Verbosity::Normal {
        crate::note!(
            "no backbone at {}: pretraining one first (loren pretrain; {} epochs, minutes on a \
             CPU), once",
            path.display(),
            spec.train.epochs
        );
    }
    pretrain(&spec, data, verbosity).context("pretraining the backbone")?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{DataSource, Normalize};

    /// loren's own files that are not backbones are named as what they are, with what to give.
    #[test]
    fn an_export_or_a_checkpoint_given_as_a_backbone_is_named_as_such() {
        let dir = std::env::temp_dir().join(format!("loren-not-backbone-{}", std::process::id()));
        let entry = loren_nn::checkpoint::Entry {
            shape: vec![1],
            data: vec![0.0],
        };
        for (format, is) in [
            (
                crate::ensemble::FORMAT,
                "an exported ensemble, not a backbone",
            ),
            (
                loren_nn::train::FORMAT,
                "a training checkpoint, not a backbone",
            ),
        ] {
            let path = dir.join(format!("{format}.safetensors"));
            let meta = HashMap::from([("format".to_string(), format.to_string())]);
            loren_nn::checkpoint::write(&path, &[("w".into(), entry.clone())], meta).unwrap();
            let e = read_backbone(&path, &VitConfig::tiny()).unwrap_err();
            assert!(matches!(e, BackboneError::NotABackbone { .. }), "{e:?}");
            assert!(e.to_string().contains(is), "{e}");
        }
    }

    /// A caller tells a file it cannot read from weights of another model by the variant.
    #[test]
    fn backbone_errors_say_whether_the_file_or_its_weights_are_wrong() {
        let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        assert!(matches!(
            read_backbone(&readme, &VitConfig::tiny()),
            Err(BackboneError::Read(_))
        ));
        let tiny = default_path(&VitConfig::tiny());
        let e = read_backbone(&tiny, &VitConfig::by_name("vit-b-32").unwrap()).unwrap_err();
        assert!(
            matches!(&e, BackboneError::Import { config, .. } if config == "vit-b-32"),
            "{e}"
        );
        assert!(e.to_string().contains("patch_embed.weight"), "{e}");
        assert!(read_backbone(&tiny, &VitConfig::tiny()).is_ok());
    }

    /// A run that trains on the validation part can still pretrain a missing backbone: the
    /// backbone just has no validation score. Checked against the same run keeping the part.
    #[test]
    fn pretraining_scores_validation_only_where_there_is_a_part() {
        let dir = std::env::temp_dir().join(format!("loren-pretrain-val-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for train_on_val in [false, true] {
            let data = DataSource::Digits(None)
                .splits(&[], &VitConfig::tiny(), Normalize::Dataset, train_on_val)
                .unwrap();
            let mut spec = PretrainSpec::bundled(dir.join(format!("b-{train_on_val}.safetensors")));
            spec.train.epochs = 1;
            spec.device = DeviceSpec::Cpu;
            let r = pretrain(&spec, &data, Verbosity::Quiet).unwrap();
            assert_eq!(r.val_accuracy.is_some(), !train_on_val);
            let file = TensorFile::read(&r.path).unwrap();
            assert_eq!(file.meta("val_accuracy").is_ok(), !train_on_val);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
