//! Evaluation: every member's probabilities on a dataset, and the calibration, shift and
//! out-of-distribution report built from them.

use loren_tensor::{MemTag, Tensor};
use serde::Serialize;

use crate::checkpoint::{Dtype, Out, Values, write_out};
use crate::data::prefetch::{DEPTH, prefetch};
use crate::data::{Dataset, ShiftKind, batches, ood_set, shift_suite};
use crate::error::{NnError, Result};
use crate::metrics::{
    CalibrationReport, OodReport, Predictions, ShiftRow, SizeRow, TemperedReport, by_ensemble_size,
    calibration, ood_detection, tempered_report,
};
use crate::vit::Vit;

/// The shifted and OOD sets are drawn with this seed, never the user's, so every method and
/// every run is scored on the same images.
pub const EVAL_SEED: u64 = 0x4556_414c_2d73_6574;

/// Every member's class probabilities on `data`, [M, N, C], in `batch_size` chunks.
/// `progress` hears how many images each chunk held; an error from it (a stop asked for) ends the
/// prediction with that error.
pub fn predict(
    model: &Vit,
    data: &Dataset,
    batch_size: usize,
    progress: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<Predictions> {
    model.check_data_images(data)?;
    let (m, n, c) = (model.members(), data.len(), model.ensemble.classes);
    let mut probs = vec![0.0f32; m * n * c];
    let order: Vec<usize> = (0..n).collect();
    let chunks: Vec<&[usize]> = batches(&order, batch_size)?.collect();
    std::thread::scope(|scope| -> Result<()> {
        // Each chunk is made (resized, normalised), keyed and staged on a background thread while
        // the model runs on the one before, as in training.
        let make = |i: usize| {
            let batch = data.batch(chunks[i], None);
            model.stage_for_prediction(&batch.images, batch.image_shape())
        };
        let made = prefetch(scope, chunks.len(), DEPTH, make);
        let mut done = 0;
        for (idx, made) in chunks.iter().zip(made) {
            let (images, keys) = made?;
            let images = Tensor::from_staged(images, MemTag::Workspace)?;
            let p = model.predict(&images, &keys)?.to_vec()?;
            let b = idx.len();
            check_numbers(&p, b, c, done)?;
            for member in 0..m {
                let src = &p[member * b * c..][..b * c];
                probs[(member * n + done) * c..][..b * c].copy_from_slice(src);
            }
            done += b;
            progress(b)?;
        }
        Ok(())
    })?;
    Ok(Predictions::new(m, n, c, probs)?)
}

/// That every probability of a chunk of `batch` images, [M, batch, `classes`], the first of them
/// image `first`, is a number: a model whose weights diverged in training predicts NaN, which
/// the metrics would otherwise report as a malformed probability.
pub fn check_numbers(probs: &[f32], batch: usize, classes: usize, first: usize) -> Result<()> {
    match probs.iter().position(|p| !p.is_finite()) {
        None => Ok(()),
        Some(i) => Err(NnError::NotANumber {
            member: i / (batch * classes),
            image: first + i % (batch * classes) / classes,
            value: probs[i],
        }),
    }
}

/// How much to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub batch_size: usize,
    pub shift: bool,
    pub ood: bool,
    /// Also score the test prediction scaled by this temperature (fitted on validation data by
    /// [`fit_temperature`](crate::metrics::fit_temperature)).
    pub temperature: Option<f64>,
    /// Keep every scored set's probabilities in [`EvalReport::predictions`].
    pub keep_predictions: bool,
}

/// The full report for one model.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub method: String,
    pub members: usize,
    pub test: CalibrationReport,
    /// The test scores of smaller ensembles made of the members, by size.
    pub by_size: Vec<SizeRow>,
    /// The test scores of the prediction scaled by [`EvalOptions::temperature`], when given.
    pub tempered: Option<TemperedReport>,
    /// Accuracy and ECE per shift kind and severity.
    pub shift: Vec<ShiftRow>,
    /// Against the built-in OOD set: inverted and noise images, and the held-out classes.
    pub ood: Option<OodReport>,
    /// Against each other dataset given (`--ood-data`), in order.
    pub ood_sets: Vec<DatasetOodReport>,
    /// Every scored set's probabilities, in the order scored, when
    /// [`EvalOptions::keep_predictions`] asks (else empty); see [`write_predictions`].
    #[serde(skip)]
    pub predictions: Vec<ScoredSet>,
}

/// One scored set's probabilities.
#[derive(Clone, Debug)]
pub struct ScoredSet {
    /// `test`, `val`, `shift/KIND/SEVERITY` (`shift/rotation/3`), `ood` (the built-in OOD set:
    /// the test images inverted, as many noise images, then the held-out classes' images) or
    /// `ood/` and an `--ood-data` set's name (`ood/cifar100/test`), with `#2`, `#3`, … after a
    /// name already taken.
    pub name: String,
    pub probs: Predictions,
    /// The true classes, for the sets that have them (not the OOD sets).
    pub labels: Option<Vec<u32>>,
}

impl ScoredSet {
    /// The validation part's probabilities, kept as `val`: the set the temperature is fitted on,
    /// scored before the others and written first.
    pub fn validation(probs: Predictions, labels: &[u32]) -> Self {
        Self {
            name: "val".to_string(),
            probs,
            labels: Some(labels.to_vec()),
        }
    }
}

/// Marks a file written by [`write_predictions`].
pub const PREDICTIONS_FORMAT: &str = "loren-predictions-v1";

/// Write `sets` to `path` as safetensors: for each set `NAME`, `NAME/probs` (f32, `[M, N, C]`,
/// every member's softmax probabilities) and, where it has labels, `NAME/labels` (i64, `[N]`).
/// `metadata` goes beside `format` = [`PREDICTIONS_FORMAT`] and `sets`, the names in order as a
/// JSON array.
pub fn write_predictions(
    path: &std::path::Path,
    sets: &[ScoredSet],
    mut metadata: std::collections::HashMap<String, String>,
) -> Result<()> {
    // What the tensors borrow; the probabilities, the bulk, are written from where they are.
    let names: Vec<[String; 2]> = sets
        .iter()
        .map(|s| [format!("{}/probs", s.name), format!("{}/labels", s.name)])
        .collect();
    let shapes: Vec<[usize; 3]> = sets
        .iter()
        .map(|s| [s.probs.members, s.probs.samples, s.probs.classes])
        .collect();
    let labels: Vec<Option<(Vec<u8>, [usize; 1])>> = sets
        .iter()
        .map(|s| {
            let labels = s.labels.as_ref()?;
            let bytes = labels.iter().flat_map(|&l| i64::from(l).to_le_bytes());
            Some((bytes.collect(), [labels.len()]))
        })
        .collect();
    let mut tensors = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        tensors.push(Out {
            name: &names[i][0],
            dtype: Dtype::F32,
            shape: &shapes[i],
            values: Values::F32(&set.probs.probs),
        });
        if let Some((bytes, shape)) = &labels[i] {
            tensors.push(Out {
                name: &names[i][1],
                dtype: Dtype::I64,
                shape,
                values: Values::Bytes(bytes),
            });
        }
    }
    let sets_json: Vec<&str> = sets.iter().map(|s| s.name.as_str()).collect();
    metadata.insert("format".into(), PREDICTIONS_FORMAT.into());
    metadata.insert(
        "sets".into(),
        serde_json::Value::from(sets_json).to_string(),
    );
    write_out(path, tensors, metadata)
}

/// OOD detection against one whole dataset, named as its images are (`cifar100/test`).
#[derive(Clone, Debug, Serialize)]
pub struct DatasetOodReport {
    pub dataset: String,
    #[serde(flatten)]
    pub report: OodReport,
}

/// Images `evaluate` will predict on, for sizing a progress bar.
pub fn eval_images(
    test: &Dataset,
    held_out: Option<&Dataset>,
    ood_sets: &[Dataset],
    opts: &EvalOptions,
) -> usize {
    let mut n = test.len();
    if opts.shift {
        n += ShiftKind::ALL.len() * 5 * test.len();
    }
    if opts.ood {
        // The OOD set: every test image inverted, as many noise images, and the held-out classes.
        n += 2 * test.len() + held_out.map_or(0, Dataset::len);
    }
    n + ood_sets.iter().map(Dataset::len).sum::<usize>()
}

/// Score `model` on the test set, its shifted copies and the OOD set (inverted and noise
/// images, plus `held_out` classes when given), and its OOD detection against each of
/// `ood_sets` (images of the test set's shape and scaling).
pub fn evaluate(
    model: &Vit,
    test: &Dataset,
    held_out: Option<&Dataset>,
    ood_sets: &[Dataset],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<EvalReport> {
    if let Some(d) = ood_sets
        .iter()
        .find(|d| d.batch_shape() != test.batch_shape())
    {
        return Err(NnError::Config(format!(
            "the OOD set {} makes images of {:?}, the test set {:?}",
            d.name,
            d.batch_shape(),
            test.batch_shape()
        )));
    }
    if test.classes != model.ensemble.classes {
        return Err(NnError::Config(format!(
            "the model has {} classes but the test set {}",
            model.ensemble.classes, test.classes
        )));
    }
    let mut kept: Vec<ScoredSet> = Vec::new();
    let mut keep = |name: String, probs: &Predictions, labels: Option<&[u32]>| {
        if opts.keep_predictions {
            // Two --ood-data folders of one name (`a/imgs`, `b/imgs`) name their sets alike.
            let taken = |n: &str| kept.iter().any(|s| s.name == n);
            let name = (1..)
                .map(|i| match i {
                    1 => name.clone(),
                    i => format!("{name}#{i}"),
                })
                .find(|n| !taken(n))
                .unwrap_or(name);
            kept.push(ScoredSet {
                name,
                probs: probs.clone(),
                labels: labels.map(<[u32]>::to_vec),
            });
        }
    };
    let preds = predict(model, test, opts.batch_size, progress)?;
    keep("test".into(), &preds, Some(&test.labels));
    let report = calibration(&preds, &test.labels)?;
    let by_size = by_ensemble_size(&preds, &test.labels)?;
    let tempered = opts
        .temperature
        .map(|t| tempered_report(&preds, &test.labels, t))
        .transpose()?;
    let mut shift = Vec::new();
    if opts.shift {
        for (kind, severity, data) in shift_suite(test, EVAL_SEED) {
            let p = predict(model, &data, opts.batch_size, progress)?;
            keep(
                format!("shift/{}/{severity}", kind.name()),
                &p,
                Some(&data.labels),
            );
            let mut row =
                ShiftRow::from_report(kind.name(), severity, &calibration(&p, &data.labels)?);
            if let Some(t) = opts.temperature {
                row.ece_tempered = Some(tempered_report(&p, &data.labels, t)?.ece);
            }
            shift.push(row);
        }
    }
    let ood = if opts.ood {
        let data = ood_set(test, held_out, EVAL_SEED)?;
        let p = predict(model, &data, opts.batch_size, progress)?;
        keep("ood".into(), &p, None);
        Some(ood_detection(&preds, &p)?)
    } else {
        None
    };
    let mut against = Vec::new();
    for data in ood_sets {
        let p = predict(model, data, opts.batch_size, progress)?;
        keep(format!("ood/{}", data.name), &p, None);
        against.push(DatasetOodReport {
            dataset: data.name.clone(),
            report: ood_detection(&preds, &p)?,
        });
    }
    Ok(EvalReport {
        method: model.ensemble.method.name().to_string(),
        members: model.members(),
        test: report,
        by_size,
        tempered,
        shift,
        ood,
        ood_sets: against,
        predictions: kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EnsembleConfig, Method, VitConfig};
    use crate::data::{SplitOptions, bundled_digits, split_digits};
    use loren_tensor::Device;

    /// Each figure of the report is its metric of the probabilities it kept: the test part's,
    /// and every shifted set's, plain and at the temperature.
    #[test]
    fn every_figure_is_the_metric_of_the_probabilities_kept() {
        let test = split_digits(&bundled_digits().unwrap(), &SplitOptions::default())
            .unwrap()
            .test;
        let ensemble = EnsembleConfig {
            drop_key: EnsembleConfig::DROP_KEY,
            method: Method::Lora,
            members: 2,
            classes: 10,
            lora: Default::default(),
        };
        let model = Vit::new(&VitConfig::tiny(), &ensemble, &Device::cpu(), 1).unwrap();
        let t = 1.7;
        let opts = EvalOptions {
            batch_size: 128,
            shift: true,
            ood: false,
            temperature: Some(t),
            keep_predictions: true,
        };
        let report = evaluate(&model, &test, None, &[], &opts, &mut |_| Ok(())).unwrap();
        let kept = |name: &str| {
            let set = report.predictions.iter().find(|s| s.name == name);
            let set = set.unwrap_or_else(|| panic!("no set {name} kept"));
            (&set.probs, set.labels.as_deref().unwrap())
        };
        let (probs, labels) = kept("test");
        assert_eq!(report.test, calibration(probs, labels).unwrap());
        let tempered = tempered_report(probs, labels, t).unwrap();
        assert_eq!(report.tempered, Some(tempered));
        assert_eq!(report.shift.len(), 15);
        for row in &report.shift {
            let name = format!("shift/{}/{}", row.kind, row.severity);
            let (probs, labels) = kept(&name);
            let plain = calibration(probs, labels).unwrap();
            assert_eq!(
                (row.accuracy, row.ece),
                (plain.accuracy, plain.ece),
                "{name}"
            );
            let at_t = tempered_report(probs, labels, t).unwrap();
            assert_ne!(
                at_t.ece, at_t.adaptive_ece,
                "{name}: the two ECEs must differ"
            );
            assert_eq!(row.ece_tempered, Some(at_t.ece), "{name}");
        }
    }
}
