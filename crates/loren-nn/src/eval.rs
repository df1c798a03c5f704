//! Evaluation: every member's probabilities on a dataset, and the calibration, shift and
//! out-of-distribution report built from them.

use loren_tensor::{MemTag, Tensor};
use serde::Serialize;

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
    let (m, n, c) = (model.members(), data.len(), model.ensemble.classes);
    let dev = model.device();
    let mut probs = vec![0.0f32; m * n * c];
    let order: Vec<usize> = (0..n).collect();
    let chunks: Vec<&[usize]> = batches(&order, batch_size)?.collect();
    std::thread::scope(|scope| -> Result<()> {
        // Each chunk is made (resized, normalised) and staged on a background thread while the
        // model runs on the one before, as in training.
        let make = |i: usize| data.batch(chunks[i], None).stage(dev);
        let made = prefetch(scope, chunks.len(), DEPTH, make);
        let mut done = 0;
        for (idx, images) in chunks.iter().zip(made) {
            let images = Tensor::from_staged(images?, MemTag::Workspace)?;
            let p = model.predict(&images, done as u64)?.to_vec()?;
            let b = idx.len();
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

/// How much to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub batch_size: usize,
    pub shift: bool,
    pub ood: bool,
    /// Also score the test prediction scaled by this temperature (fitted on validation data by
    /// [`fit_temperature`](crate::metrics::fit_temperature)).
    pub temperature: Option<f64>,
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
    let preds = predict(model, test, opts.batch_size, progress)?;
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
        Some(ood_detection(&preds, &p)?)
    } else {
        None
    };
    let mut against = Vec::new();
    for data in ood_sets {
        let p = predict(model, data, opts.batch_size, progress)?;
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
    })
}
