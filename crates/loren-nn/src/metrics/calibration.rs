//! Accuracy, calibration (ECE, adaptive ECE, reliability bins), proper scoring rules (NLL,
//! Brier) and ensemble diversity of an ensemble's predictions against labels.

use serde::{Deserialize, Serialize};

use super::uncertainty::SampleStats;
use super::{MetricsError, Predictions, Result, argmax};

/// Number of bins of ECE, adaptive ECE and the reliability diagram (the common choice of
/// torchmetrics, torch-uncertainty and uncertainty-baselines).
pub const NUM_BINS: usize = 15;

/// NLL clamps p̄_y below at this value, so a confident miss costs ln(1e12) ≈ 27.6 nats rather
/// than infinity; and above at 1, which a row may pass by its rounding (up to
/// [`super::PROB_TOLERANCE`]), so that no sample's NLL is negative.
pub const NLL_FLOOR: f64 = 1e-12;

/// A confidence within this many bin widths below an edge counts as on the edge. f32(k/15) and
/// the f64 mean of f32 member probabilities are off k/15 by at most ~1e-7 bin widths; without
/// the snap such a value could fall one bin down from where an f32 reference puts it.
const EDGE_SNAP: f64 = 1e-6;

/// One equal-width confidence bin of the reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lower: f64,
    pub upper: f64,
    /// Samples whose top-label confidence falls in the bin.
    pub count: usize,
    /// Fraction of those samples predicted correctly (0 when the bin is empty).
    pub accuracy: f64,
    /// Mean top-label confidence of those samples (0 when the bin is empty).
    pub confidence: f64,
}

/// Calibration, accuracy and diversity of an ensemble on one labelled set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    pub samples: usize,
    pub members: usize,
    pub classes: usize,
    /// Accuracy of the mean prediction (argmax, ties to the lowest class index).
    pub accuracy: f64,
    /// Mean top-label confidence of the mean prediction.
    pub mean_confidence: f64,
    /// Expected calibration error over [`NUM_BINS`] equal-width bins; see [`calibration`].
    pub ece: f64,
    /// The same over [`NUM_BINS`] equal-mass bins.
    pub adaptive_ece: f64,
    /// ECE as the LoRA-Ensemble paper's code computes it, for comparison with its tables; see
    /// [`paper_ece`]. Absent from reports written before it (read as 0).
    #[serde(default)]
    pub ece_paper: f64,
    /// Mean of −ln max(p̄_y, [`NLL_FLOOR`]), nats.
    pub nll: f64,
    /// Σ_c (p̄_c − 1[y = c])², summed over classes and averaged over samples; in [0, 2].
    pub brier: f64,
    /// Accuracy of each member on its own.
    pub member_accuracy: Vec<f64>,
    pub mean_member_accuracy: f64,
    /// Mean over unordered member pairs of the fraction of samples on which their argmax
    /// differs; 0 for a single member.
    pub disagreement: f64,
    /// Mean over samples of H(p̄), nats.
    pub predictive_entropy: f64,
    /// Mean over samples of (1/M) Σ_m H(p_m), nats.
    pub expected_entropy: f64,
    /// Mean over samples of max(0, H(p̄) − (1/M) Σ_m H(p_m)), nats. Because of the per-sample
    /// clamp it can exceed `predictive_entropy − expected_entropy` by rounding error.
    pub mutual_information: f64,
    /// The [`NUM_BINS`] equal-width bins behind `ece`, for the reliability diagram.
    pub bins: Vec<ReliabilityBin>,
}

/// One row of a distribution-shift table: how accuracy and calibration hold up on one corruption
/// at one severity. The caller runs [`calibration`] on each shifted set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiftRow {
    pub kind: String,
    pub severity: u8,
    pub accuracy: f64,
    pub ece: f64,
    /// The ECE after temperature scaling with the temperature fitted on the (unshifted)
    /// validation part, when there is one: whether a calibration fitted in distribution holds
    /// under shift.
    #[serde(default)]
    pub ece_tempered: Option<f64>,
}

impl ShiftRow {
    pub fn from_report(kind: impl Into<String>, severity: u8, report: &CalibrationReport) -> Self {
        Self {
            kind: kind.into(),
            severity,
            accuracy: report.accuracy,
            ece: report.ece,
            ece_tempered: None,
        }
    }
}

/// Scores the ensemble prediction (the mean of the members' probabilities) against `labels`.
///
/// **ECE binning.** Top-label confidences go into [`NUM_BINS`] = 15 equal-width bins
/// `[k/15, (k+1)/15)` for k = 0..13 and a closed last bin `[14/15, 1]`: a confidence exactly on
/// an inner edge k/15 belongs to bin k (the upper one), 0 to bin 0 and 1.0 to bin 14. This is
/// `floor(15·conf)` clipped to [0, 14], exactly what uncertainty-baselines does through
/// `tf.histogram_fixed_width_bins(conf, [0, 1], nbins=15)` (uncertainty_metrics /
/// robustness_metrics `ExpectedCalibrationError`), and what current torchmetrics (whose
/// `_binning_bucketize` torch-uncertainty reuses) does with
/// `torch.bucketize(conf, linspace(0, 1, 16), right=True) - 1` for every confidence below 1.
/// The one difference: torchmetrics gives confidence exactly 1.0 a degenerate 16th bucket of its
/// own, which we fold into the last bin as uncertainty-baselines does. (Older torchmetrics used
/// right-closed bins (k/15, (k+1)/15], which this does not follow.) A confidence within `1e-6` bin widths below an edge is snapped onto it (see
/// `EDGE_SNAP`), so f32 rounding of k/15 cannot move a sample down a bin.
///
/// ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over non-empty bins.
///
/// **Adaptive ECE** uses the same formula over 15 equal-mass bins: samples sorted by confidence
/// (stably, so equal confidences keep sample order), split as `torch.tensor_split` does (the
/// first N mod 15 bins hold one sample more). With N < 15 the empty bins are skipped.
///
/// # Errors
/// Invalid `preds` (as [`Predictions::new`] reports them), [`MetricsError::LabelCount`] when
/// `labels` does not have one label per sample, [`MetricsError::LabelOutOfRange`] for a label
/// ≥ `classes`.
pub fn calibration(preds: &Predictions, labels: &[u32]) -> Result<CalibrationReport> {
    preds.validate()?;
    validate_labels(labels, preds.samples, preds.classes)?;
    let stats = SampleStats::compute(preds);
    let correct: Vec<bool> = stats
        .prediction
        .iter()
        .zip(labels)
        .map(|(&p, &y)| p == y as usize)
        .collect();
    let bins = equal_width_bins(&stats.confidence, &correct, NUM_BINS);
    let member_predictions = member_predictions(preds);
    let member_accuracy: Vec<f64> = member_predictions
        .iter()
        .map(|p| accuracy(p, labels))
        .collect();
    Ok(CalibrationReport {
        samples: preds.samples,
        members: preds.members,
        classes: preds.classes,
        accuracy: mean(correct.iter().map(|&c| f64::from(u8::from(c)))),
        mean_confidence: mean(stats.confidence.iter().copied()),
        ece: binned_calibration_error(&bins, preds.samples),
        adaptive_ece: adaptive_ece(&stats.confidence, &correct, NUM_BINS),
        ece_paper: paper_ece(preds, labels),
        nll: nll(&stats.mean, labels, preds.classes),
        brier: brier(&stats.mean, labels, preds.classes),
        mean_member_accuracy: mean(member_accuracy.iter().copied()),
        member_accuracy,
        disagreement: disagreement(&member_predictions),
        predictive_entropy: mean(stats.entropy.iter().copied()),
        expected_entropy: mean(stats.expected_entropy.iter().copied()),
        mutual_information: mean(stats.mutual_information()),
        bins,
    })
}

pub(crate) fn validate_labels(labels: &[u32], samples: usize, classes: usize) -> Result<()> {
    if labels.len() != samples {
        return Err(MetricsError::LabelCount {
            expected: samples,
            got: labels.len(),
        });
    }
    match labels.iter().position(|&y| y as usize >= classes) {
        Some(sample) => Err(MetricsError::LabelOutOfRange {
            sample,
            label: labels[sample],
            classes,
        }),
        None => Ok(()),
    }
}

/// Arithmetic mean; 0 for no values (only reachable with zero members, which validation stops).
fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The equal-width bin of a confidence; see [`calibration`] for the convention.
pub(crate) fn bin_index(confidence: f64, n_bins: usize) -> usize {
    let x = confidence * n_bins as f64;
    let nearest = x.round();
    let snapped = if (x - nearest).abs() <= EDGE_SNAP {
        nearest
    } else {
        x.floor()
    };
    // `as usize` saturates: negative or NaN becomes 0.
    (snapped as usize).min(n_bins.saturating_sub(1))
}

fn equal_width_bins(confidence: &[f64], correct: &[bool], n_bins: usize) -> Vec<ReliabilityBin> {
    binned(confidence, correct, n_bins, |c| Some(bin_index(c, n_bins)))
}

/// `n_bins` equal-width bins of the samples, each put in bin `bin_of(confidence)` (none: in no
/// bin).
fn binned(
    confidence: &[f64],
    correct: &[bool],
    n_bins: usize,
    bin_of: impl Fn(f64) -> Option<usize>,
) -> Vec<ReliabilityBin> {
    let mut count = vec![0usize; n_bins];
    let mut hits = vec![0usize; n_bins];
    let mut conf_sum = vec![0.0f64; n_bins];
    for (&c, &ok) in confidence.iter().zip(correct) {
        let Some(b) = bin_of(c) else { continue };
        count[b] += 1;
        hits[b] += usize::from(ok);
        conf_sum[b] += c;
    }
    (0..n_bins)
        .map(|b| {
            let n = count[b].max(1) as f64;
            ReliabilityBin {
                lower: b as f64 / n_bins as f64,
                upper: (b + 1) as f64 / n_bins as f64,
                count: count[b],
                accuracy: hits[b] as f64 / n,
                confidence: conf_sum[b] / n,
            }
        })
        .collect()
}

/// Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|; empty bins weigh 0.
fn binned_calibration_error(bins: &[ReliabilityBin], samples: usize) -> f64 {
    let weighted: f64 = bins
        .iter()
        .map(|b| b.count as f64 * (b.accuracy - b.confidence).abs())
        .sum();
    weighted / samples.max(1) as f64
}

/// ECE as the LoRA-Ensemble paper's code (`utils_uncertainty._ECELoss`, fed the members' mean
/// logits) computes it: the prediction is the softmax of the members' mean logits, and its
/// top-label confidences go into 10 bins `(k/10, (k+1)/10]`. A member's logits are its log
/// probabilities up to a constant per sample, and constants cancel in a softmax, so that
/// prediction is the members' geometric mean of probabilities, normalised: what is computed
/// here. A probability that f32 rounded to 0 counts as 1e-45, about f32's least positive
/// value: the logits would give something as small, too small to move the confidence, and the
/// logarithms stay finite. `preds` and `labels` are valid ([`calibration`]).
pub fn paper_ece(preds: &Predictions, labels: &[u32]) -> f64 {
    const BINS: usize = 10;
    const UNDERFLOW: f64 = 1e-45;
    let (n, c) = (preds.samples, preds.classes);
    let mut confidence = Vec::with_capacity(n);
    let mut correct = Vec::with_capacity(n);
    let mut log_sum = vec![0.0f64; c];
    for (s, &label) in labels.iter().enumerate().take(n) {
        log_sum.fill(0.0);
        for m in 0..preds.members {
            let row = &preds.member(m)[s * c..(s + 1) * c];
            for (acc, &p) in log_sum.iter_mut().zip(row) {
                *acc += f64::from(p).max(UNDERFLOW).ln();
            }
        }
        let top = log_sum.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // Lowest index on ties, as torch.max.
        let predicted = log_sum.iter().position(|&v| v == top).unwrap_or(0);
        let members = preds.members as f64;
        let total: f64 = log_sum.iter().map(|&v| ((v - top) / members).exp()).sum();
        confidence.push(1.0 / total);
        correct.push(predicted == label as usize);
    }
    // (k/10, (k+1)/10]: the ceiling, less one; a confidence of 0 is in no bin.
    let bin_of = |c: f64| (c > 0.0).then(|| ((c * BINS as f64).ceil() as usize).clamp(1, BINS) - 1);
    binned_calibration_error(&binned(&confidence, &correct, BINS, bin_of), n)
}

/// ECE over equal-mass bins of the confidence-sorted samples.
fn adaptive_ece(confidence: &[f64], correct: &[bool], n_bins: usize) -> f64 {
    let mut order: Vec<usize> = (0..confidence.len()).collect();
    // Stable, and NaN-free because confidences come from validated probabilities.
    order.sort_by(|&a, &b| confidence[a].total_cmp(&confidence[b]));
    let n = order.len();
    let (base, extra) = (n / n_bins.max(1), n % n_bins.max(1));
    let mut start = 0;
    let mut weighted = 0.0;
    for b in 0..n_bins {
        let size = base + usize::from(b < extra);
        let members = &order[start..start + size];
        start += size;
        if size == 0 {
            continue;
        }
        let acc = members.iter().filter(|&&i| correct[i]).count() as f64 / size as f64;
        let conf = members.iter().map(|&i| confidence[i]).sum::<f64>() / size as f64;
        weighted += size as f64 * (acc - conf).abs();
    }
    weighted / n.max(1) as f64
}

fn nll(mean: &[f64], labels: &[u32], classes: usize) -> f64 {
    let rows = mean.chunks_exact(classes);
    let losses = rows
        .zip(labels)
        .map(|(row, &y)| -row[y as usize].clamp(NLL_FLOOR, 1.0).ln());
    self::mean(losses)
}

fn brier(mean: &[f64], labels: &[u32], classes: usize) -> f64 {
    let rows = mean.chunks_exact(classes);
    let scores = rows.zip(labels).map(|(row, &y)| {
        row.iter()
            .enumerate()
            .map(|(c, &p)| {
                let target = if c == y as usize { 1.0 } else { 0.0 };
                (p - target) * (p - target)
            })
            .sum::<f64>()
    });
    self::mean(scores)
}

/// Argmax of each member's probabilities, [M][N].
fn member_predictions(preds: &Predictions) -> Vec<Vec<usize>> {
    (0..preds.members)
        .map(|m| {
            let rows = preds.member(m).chunks_exact(preds.classes);
            rows.map(argmax).collect()
        })
        .collect()
}

fn accuracy(predictions: &[usize], labels: &[u32]) -> f64 {
    let hits = predictions
        .iter()
        .zip(labels)
        .filter(|&(&p, &y)| p == y as usize)
        .count();
    hits as f64 / predictions.len().max(1) as f64
}

/// Mean over unordered pairs (i < j) of the fraction of samples where members i and j disagree.
fn disagreement(member_predictions: &[Vec<usize>]) -> f64 {
    let mut pairs = Vec::new();
    for (i, a) in member_predictions.iter().enumerate() {
        for b in &member_predictions[i + 1..] {
            let differ = a.iter().zip(b).filter(|(x, y)| x != y).count();
            pairs.push(differ as f64 / a.len().max(1) as f64);
        }
    }
    mean(pairs)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, preds};
    use super::*;

    /// Four single-member two-class samples, one per bin:
    ///   [0.9, 0.1] y=0 → conf 0.9, right, bin 13
    ///   [0.8, 0.2] y=1 → conf 0.8, wrong, bin 12 (on the edge 12/15)
    ///   [0.3, 0.7] y=1 → conf 0.7, right, bin 10
    ///   [0.4, 0.6] y=0 → conf 0.6, wrong, bin 9 (on the edge 9/15)
    fn four_samples() -> (Predictions, Vec<u32>) {
        let rows: &[&[f32]] = &[&[0.9, 0.1], &[0.8, 0.2], &[0.3, 0.7], &[0.4, 0.6]];
        (preds(&[rows]), vec![0, 1, 1, 0])
    }

    #[test]
    fn hand_computed_ece_nll_brier() {
        let (p, y) = four_samples();
        let r = calibration(&p, &y).unwrap();
        // Each bin holds one sample: ECE = (|1−0.9| + |0−0.8| + |1−0.7| + |0−0.6|)/4 = 1.8/4.
        assert!(close(r.ece, 0.45, 1e-6), "{}", r.ece);
        // With N = 4 < 15 the equal-mass bins are the four singletons too.
        assert!(close(r.adaptive_ece, 0.45, 1e-6));
        // NLL = −(ln 0.9 + ln 0.2 + ln 0.7 + ln 0.4)/4.
        let nll = -(0.9f64.ln() + 0.2f64.ln() + 0.7f64.ln() + 0.4f64.ln()) / 4.0;
        assert!(close(r.nll, nll, 1e-6), "{} vs {nll}", r.nll);
        // Brier per sample: 0.01+0.01, 0.64+0.64, 0.09+0.09, 0.36+0.36 → 2.2/4.
        assert!(close(r.brier, 0.55, 1e-6), "{}", r.brier);
        assert_eq!(r.accuracy, 0.5);
        assert!(close(r.mean_confidence, 0.75, 1e-6));
        let counts: Vec<usize> = r.bins.iter().map(|b| b.count).collect();
        let mut want = vec![0; 15];
        for b in [9, 10, 12, 13] {
            want[b] = 1;
        }
        assert_eq!(counts, want);
        assert_eq!(r.bins[12].accuracy, 0.0);
        assert!(close(r.bins[12].confidence, 0.8, 1e-6));
        assert!(close(r.bins[14].upper, 1.0, 0.0) && close(r.bins[0].lower, 0.0, 0.0));
    }

    #[test]
    fn adaptive_ece_splits_like_tensor_split() {
        // 7 samples into 3 bins: sizes 3, 2, 2 of the confidence-sorted samples.
        let conf = [0.9, 0.5, 0.6, 0.7, 0.55, 0.95, 0.8];
        let correct = [true, false, true, true, false, true, false];
        // Sorted: 0.5 F, 0.55 F, 0.6 T | 0.7 T, 0.8 F | 0.9 T, 0.95 T
        // bin 1: acc 1/3, conf 0.55  → 3·|1/3 − 0.55|  = 0.65
        // bin 2: acc 1/2, conf 0.75  → 2·0.25          = 0.5
        // bin 3: acc 1,   conf 0.925 → 2·0.075         = 0.15
        // aECE = (0.65 + 0.5 + 0.15)/7 = 1.3/7
        let got = adaptive_ece(&conf, &correct, 3);
        assert!(close(got, 1.3 / 7.0, 1e-12), "{got}");
        // And equal-width with 2 bins of [0, .5), [.5, 1]: all in bin 1, acc 4/7,
        // conf mean 5.0/7 → ECE = |4/7 − 5/7| = 1/7.
        let bins = equal_width_bins(&conf, &correct, 2);
        assert_eq!(bins[1].count, 7);
        assert!(close(binned_calibration_error(&bins, 7), 1.0 / 7.0, 1e-12));
    }

    #[test]
    fn perfectly_calibrated_predictions_have_zero_ece() {
        // 10 samples at confidence 0.7 with 7 right, 4 at 1.0 all right, 2 at 0.5 with 1 right.
        let mut rows: Vec<&[f32]> = vec![&[0.7, 0.3]; 10];
        rows.extend([&[1.0f32, 0.0][..]; 4]);
        rows.extend([&[0.5f32, 0.5][..]; 2]);
        let mut labels = vec![0u32; 7];
        labels.extend([1, 1, 1]);
        labels.extend([0, 0, 0, 0]);
        labels.extend([0, 1]); // a 0.5/0.5 tie predicts class 0
        let r = calibration(&preds(&[&rows]), &labels).unwrap();
        assert!(r.ece < 1e-7, "{}", r.ece);
        assert_eq!(r.accuracy, 12.0 / 16.0);
        assert_eq!(r.bins[14].count, 4, "confidence 1.0 lands in the last bin");
        assert_eq!(r.bins[7].count, 2, "0.5 = 7.5/15 lands in bin 7");
        assert_eq!(r.bins[10].count, 10, "0.7 = 10.5/15 lands in bin 10");
    }

    #[test]
    fn bin_edges_follow_the_documented_convention() {
        assert_eq!(bin_index(0.0, 15), 0);
        assert_eq!(bin_index(f64::from(1.0f32 / 15.0), 15), 1);
        assert_eq!(bin_index(1.0 / 15.0, 15), 1);
        assert_eq!(bin_index(1.0 / 15.0 - 1e-4, 15), 0);
        assert_eq!(bin_index(f64::from(0.6f32), 15), 9);
        // A hair below the edge 9/15 (f64 rounding of a mean) still counts as on it...
        assert_eq!(bin_index(0.6 - 1e-12, 15), 9);
        // ...but a real gap below the edge does not.
        assert_eq!(bin_index(0.6 - 1e-5, 15), 8);
        assert_eq!(bin_index(14.0 / 15.0, 15), 14);
        assert_eq!(bin_index(1.0, 15), 14);
        // Nothing can index out of range.
        assert_eq!(bin_index(f64::NAN, 15), 0);
        assert_eq!(bin_index(7.0, 15), 14);
        assert_eq!(bin_index(-1.0, 15), 0);
    }

    #[test]
    fn sample_on_edge_lands_in_upper_bin_through_calibration() {
        // Two members averaging to [1/3, 2/3]: confidence 2/3 = 10/15, an edge → bin 10.
        let a: &[&[f32]] = &[&[0.0, 1.0]];
        let b: &[&[f32]] = &[&[2.0 / 3.0, 1.0 / 3.0]];
        let r = calibration(&preds(&[a, b]), &[1]).unwrap();
        assert_eq!(r.bins[10].count, 1, "{:?}", r.bins);
        // f32(1/3) is above 1/3, so that mean sits above the edge without any snap. Here
        // f32(0.7) is below 0.7: the f64 mean (0.69999999 + 0.5)/2 falls ~6e-9 under the edge
        // 9/15, where an f32 mean (which rounds up to 0.60000002) puts it in bin 9. Only the
        // snap keeps the two agreeing.
        let c: &[&[f32]] = &[&[0.3, 0.7]];
        let d: &[&[f32]] = &[&[0.5, 0.5]];
        let r = calibration(&preds(&[c, d]), &[1]).unwrap();
        assert_eq!(r.bins[9].count, 1, "{:?}", r.bins);
    }

    #[test]
    fn the_papers_ece_bins_close_on_the_right_and_average_logits() {
        // Confidence exactly 0.5 (a tie, class 0, right) is in (0.4, 0.5]; 0.55 (wrong) in
        // (0.5, 0.6]: two bins, 0.5 and 0.55 off. In one bin they would be 0.025 off.
        let a: &[&[f32]] = &[&[0.5, 0.5], &[0.55, 0.45]];
        let e = paper_ece(&preds(&[a]), &[0, 1]);
        assert!(close(e, (0.5 + f64::from(0.55f32)) / 2.0, 1e-7), "{e}");
        // Two members at 0.9 and 0.6 for class 0: the softmax of their mean logits is the
        // normalised geometric mean, sqrt(.54) / (sqrt(.54) + sqrt(.04)) = 0.786.., not 0.75.
        let m1: &[&[f32]] = &[&[0.9, 0.1]];
        let m2: &[&[f32]] = &[&[0.6, 0.4]];
        let g = 0.54f64.sqrt() / (0.54f64.sqrt() + 0.04f64.sqrt());
        let e = paper_ece(&preds(&[m1, m2]), &[0]);
        assert!(close(e, 1.0 - g, 1e-7), "{e} against {}", 1.0 - g);
    }

    #[test]
    fn nll_of_a_confident_miss_is_finite() {
        let r = calibration(&preds(&[&[&[1.0, 0.0]]]), &[1]).unwrap();
        assert!(close(r.nll, -NLL_FLOOR.ln(), 1e-9), "{}", r.nll);
        assert_eq!(r.brier, 2.0);
        // A hit whose rounding passes 1, within the tolerance: no sample's NLL is below 0.
        let r = calibration(&preds(&[&[&[1.0005, 0.0]]]), &[0]).unwrap();
        assert_eq!(r.nll, 0.0);
    }

    #[test]
    fn disagreement_of_identical_members_is_zero() {
        let rows: &[&[f32]] = &[&[0.6, 0.4], &[0.2, 0.8], &[0.5, 0.5]];
        let r = calibration(&preds(&[rows, rows, rows]), &[0, 1, 0]).unwrap();
        assert_eq!(r.disagreement, 0.0);
        // Zero up to the rounding of averaging three equal entropies.
        assert!((0.0..1e-15).contains(&r.mutual_information));
        assert_eq!(r.member_accuracy, vec![1.0; 3]);
        assert_eq!(r.mean_member_accuracy, 1.0);
    }

    #[test]
    fn disagreement_on_half_the_samples_is_one_half() {
        let a: &[&[f32]] = &[&[0.9, 0.1], &[0.8, 0.2], &[0.3, 0.7], &[0.4, 0.6]];
        let b: &[&[f32]] = &[&[0.9, 0.1], &[0.2, 0.8], &[0.7, 0.3], &[0.4, 0.6]];
        let labels = [0, 0, 0, 0];
        let r = calibration(&preds(&[a, b]), &labels).unwrap();
        assert_eq!(r.disagreement, 0.5);
        assert_eq!(r.member_accuracy, vec![0.5, 0.5]);
        assert!(r.mutual_information > 0.0);
        assert!(r.predictive_entropy > r.expected_entropy);
        // Three members: pairs (a,b)=0.5, (a,a)=0, (b,a)=0.5 → mean 1/3.
        let r = calibration(&preds(&[a, b, a]), &labels).unwrap();
        assert!(close(r.disagreement, 1.0 / 3.0, 1e-15));
    }

    #[test]
    fn entropies_of_members_with_a_class_at_exactly_zero() {
        let a: &[&[f32]] = &[&[0.5, 0.5, 0.0]];
        let b: &[&[f32]] = &[&[1.0, 0.0, 0.0]];
        let r = calibration(&preds(&[a, b]), &[0]).unwrap();
        // The mean is [0.75, 0.25, 0]; the members' entropies are ln 2 and 0.
        let predictive = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        assert!(close(r.predictive_entropy, predictive, 1e-12), "{r:?}");
        assert!(close(r.expected_entropy, 2f64.ln() / 2.0, 1e-12), "{r:?}");
        let mi = predictive - 2f64.ln() / 2.0;
        assert!(close(r.mutual_information, mi, 1e-12), "{r:?}");
    }

    #[test]
    fn single_member_has_no_disagreement() {
        let (p, y) = four_samples();
        let r = calibration(&p, &y).unwrap();
        assert_eq!(r.disagreement, 0.0);
        assert_eq!(r.mutual_information, 0.0);
        assert_eq!(r.member_accuracy, vec![0.5]);
        assert!(close(r.predictive_entropy, r.expected_entropy, 0.0));
    }

    #[test]
    fn bad_labels_are_errors() {
        let (p, _) = four_samples();
        assert_eq!(
            calibration(&p, &[0, 1, 1]).unwrap_err(),
            MetricsError::LabelCount {
                expected: 4,
                got: 3
            }
        );
        assert_eq!(
            calibration(&p, &[0, 1, 2, 0]).unwrap_err(),
            MetricsError::LabelOutOfRange {
                sample: 2,
                label: 2,
                classes: 2
            }
        );
        assert!(calibration(&p, &[0, 1, u32::MAX, 0]).is_err());
    }

    #[test]
    fn tampered_predictions_are_errors() {
        let (mut p, y) = four_samples();
        p.probs[3] = 0.5; // row [0.8, 0.5]
        assert!(matches!(
            calibration(&p, &y),
            Err(MetricsError::BadRowSum { sample: 1, .. })
        ));
        let (mut p, y) = four_samples();
        p.members = 0;
        assert!(matches!(
            calibration(&p, &y),
            Err(MetricsError::Empty { what: "members" })
        ));
        let (mut p, y) = four_samples();
        p.classes = 4;
        assert!(matches!(
            calibration(&p, &y),
            Err(MetricsError::ProbsLength { .. })
        ));
    }

    #[test]
    fn report_serializes_and_shift_row_copies_it() {
        let (p, y) = four_samples();
        let r = calibration(&p, &y).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"adaptive_ece\"") && json.contains("\"bins\""));
        let back: CalibrationReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.bins.len(), NUM_BINS);
        let row = ShiftRow::from_report("gaussian_noise", 3, &r);
        assert_eq!(
            (row.accuracy, row.ece, row.severity),
            (r.accuracy, r.ece, 3)
        );
        assert!(
            serde_json::to_string(&row)
                .unwrap()
                .contains("gaussian_noise")
        );
    }
}
