//! Out-of-distribution detection: how well each uncertainty score separates OOD samples from
//! in-distribution ones.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::uncertainty::scores;
use super::{MetricsError, Predictions, Result};

/// The TPR (recall of OOD) at which [`DetectionMetrics::fpr95`] is read, in percent.
const TPR_PERCENT: u64 = 95;

/// Detection quality of one score. OOD is the positive class; higher score = more OOD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectionMetrics {
    /// Area under the ROC curve, ties counted half (sklearn's `roc_auc_score`).
    pub auroc: f64,
    /// Average precision (sklearn's `average_precision_score`, step-wise, no interpolation).
    pub aupr: f64,
    /// Fraction of in-distribution samples flagged as OOD at the strictest threshold that still
    /// flags ≥ 95% of the OOD samples.
    pub fpr95: f64,
}

/// OOD detection by the three uncertainty scores of the ensemble prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodReport {
    pub in_samples: usize,
    pub ood_samples: usize,
    /// Score −max_c p̄_c (low confidence = OOD).
    pub max_prob: DetectionMetrics,
    /// Score H(p̄).
    pub entropy: DetectionMetrics,
    /// Score H(p̄) − (1/M) Σ_m H(p_m). Constant 0 for M = 1, which honestly gives AUROC 0.5.
    pub mutual_information: DetectionMetrics,
}

/// Scores how well the ensemble's uncertainty flags `ood` samples against `in_dist` ones.
///
/// Convention: OOD is the positive class, and every score is oriented so that higher means more
/// OOD: −max_prob, entropy, mutual information. See [`detection_metrics`] for the definitions,
/// including ties. Both sets must come from the same ensemble (same members and classes).
///
/// # Errors
/// [`MetricsError::Mismatch`] when the two differ in members or classes; either set invalid, as
/// [`Predictions::new`] reports it.
pub fn ood_detection(in_dist: &Predictions, ood: &Predictions) -> Result<OodReport> {
    for (what, a, b) in [
        ("members", in_dist.members, ood.members),
        ("classes", in_dist.classes, ood.classes),
    ] {
        if a != b {
            return Err(MetricsError::Mismatch {
                what,
                in_dist: a,
                ood: b,
            });
        }
    }
    let (id, od) = (scores(in_dist)?, scores(ood)?);
    let negate = |v: &[f64]| v.iter().map(|&x| -x).collect::<Vec<_>>();
    Ok(OodReport {
        in_samples: in_dist.samples,
        ood_samples: ood.samples,
        max_prob: detection_metrics(&negate(&id.max_prob), &negate(&od.max_prob))?,
        entropy: detection_metrics(&id.entropy, &od.entropy)?,
        mutual_information: detection_metrics(&id.mutual_information, &od.mutual_information)?,
    })
}

/// AUROC, AUPR and FPR@95%TPR of a score that should be higher on `ood_scores` (positives) than
/// on `in_scores` (negatives). A sample is flagged OOD at threshold t when its score is ≥ t, so
/// samples tied at a threshold are flagged together; the curves are evaluated at the distinct
/// score values, from the highest down, as sklearn's `_binary_clf_curve` does.
///
/// - **AUROC**: trapezoidal area under (FPR, TPR) through those points from (0, 0), the value of
///   sklearn's `roc_auc_score`; equals P(s_ood > s_in) + ½·P(s_ood = s_in).
/// - **AUPR**: Σ_k (R_k − R_{k−1})·P_k over the same points with R_0 = 0, sklearn's
///   `average_precision_score` (no interpolation).
/// - **FPR95**: the FPR at the first point (the highest threshold t) where at least 95% of OOD
///   samples score ≥ t, tested exactly as 100·TP ≥ 95·P; all in-distribution samples tied at t
///   count as flagged.
///
/// # Errors
/// [`MetricsError::NoScores`] when either set is empty, [`MetricsError::NonFiniteScore`] for a
/// NaN or infinite score.
pub fn detection_metrics(in_scores: &[f64], ood_scores: &[f64]) -> Result<DetectionMetrics> {
    check_scores("in-distribution", in_scores)?;
    check_scores("OOD", ood_scores)?;
    let points = operating_points(in_scores, ood_scores);
    let (negatives, positives) = (in_scores.len() as u64, ood_scores.len() as u64);
    Ok(DetectionMetrics {
        auroc: auroc(&points, negatives, positives),
        aupr: average_precision(&points, positives),
        fpr95: fpr_at_tpr(&points, negatives, positives, TPR_PERCENT),
    })
}

fn check_scores(what: &'static str, scores: &[f64]) -> Result<()> {
    if scores.is_empty() {
        return Err(MetricsError::NoScores { what });
    }
    match scores.iter().position(|s| !s.is_finite()) {
        Some(index) => Err(MetricsError::NonFiniteScore {
            what,
            index,
            value: scores[index],
        }),
        None => Ok(()),
    }
}

/// A point of the curves: counts flagged at one threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    false_pos: u64,
    true_pos: u64,
}

/// Cumulative (FP, TP) after each distinct score, highest first; the last point flags all.
fn operating_points(in_scores: &[f64], ood_scores: &[f64]) -> Vec<Point> {
    let mut labelled: Vec<(f64, bool)> = in_scores.iter().map(|&s| (s, false)).collect();
    labelled.extend(ood_scores.iter().map(|&s| (s, true)));
    // Scores are finite, so partial_cmp never fails; unlike total_cmp it also ties −0.0 with 0.0.
    labelled.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal));
    let mut points = Vec::new();
    let mut current = Point {
        false_pos: 0,
        true_pos: 0,
    };
    for (i, &(score, is_ood)) in labelled.iter().enumerate() {
        if is_ood {
            current.true_pos += 1;
        } else {
            current.false_pos += 1;
        }
        let last_of_tie = labelled.get(i + 1).is_none_or(|next| next.0 != score);
        if last_of_tie {
            points.push(current);
        }
    }
    points
}

fn auroc(points: &[Point], negatives: u64, positives: u64) -> f64 {
    let mut previous = Point {
        false_pos: 0,
        true_pos: 0,
    };
    // Twice the area in count units: Σ ΔFP·(TP_prev + TP), exact in u128.
    let mut twice_area: u128 = 0;
    for &p in points {
        let width = u128::from(p.false_pos - previous.false_pos);
        twice_area += width * u128::from(previous.true_pos + p.true_pos);
        previous = p;
    }
    twice_area as f64 / (2.0 * negatives as f64 * positives as f64)
}

fn average_precision(points: &[Point], positives: u64) -> f64 {
    let mut previous_tp = 0;
    let mut sum = 0.0;
    for p in points {
        if p.true_pos > previous_tp {
            let recall_step = (p.true_pos - previous_tp) as f64 / positives as f64;
            let precision = p.true_pos as f64 / (p.true_pos + p.false_pos) as f64;
            sum += recall_step * precision;
            previous_tp = p.true_pos;
        }
    }
    sum
}

fn fpr_at_tpr(points: &[Point], negatives: u64, positives: u64, percent: u64) -> f64 {
    let reached = points
        .iter()
        .find(|p| 100 * p.true_pos >= percent * positives);
    // The last point flags everything, so `reached` is always found; 1.0 is its FPR anyway.
    reached.map_or(1.0, |p| p.false_pos as f64 / negatives as f64)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, preds};
    use super::*;

    #[test]
    fn perfect_separation_scores_one() {
        let m = detection_metrics(&[0.1, 0.2, 0.3], &[0.5, 0.9]).unwrap();
        assert_eq!(m.auroc, 1.0);
        assert_eq!(m.aupr, 1.0);
        assert_eq!(m.fpr95, 0.0);
        // Reversed, it is perfectly wrong.
        let m = detection_metrics(&[0.5, 0.9], &[0.1, 0.2, 0.3]).unwrap();
        assert_eq!(m.auroc, 0.0);
        assert_eq!(m.fpr95, 1.0);
    }

    #[test]
    fn constant_scores_are_chance() {
        let m = detection_metrics(&[0.0; 5], &[0.0; 3]).unwrap();
        assert_eq!(m.auroc, 0.5);
        // One threshold flags everything: precision 3/8 at recall 1.
        assert_eq!(m.aupr, 3.0 / 8.0);
        assert_eq!(m.fpr95, 1.0);
        // −0.0 and 0.0 are the same score.
        let m = detection_metrics(&[-0.0, 0.0], &[0.0, -0.0]).unwrap();
        assert_eq!(m.auroc, 0.5);
    }

    #[test]
    fn matches_sklearn_with_ties() {
        // sklearn 1.9.1: y_true = [0,0,1,1,0,1,0,1], y_score = [.1,.4,.35,.8,.4,.4,.1,.9]
        // roc_auc_score → 0.8125, average_precision_score → 0.8166666666666667.
        let m = detection_metrics(&[0.1, 0.4, 0.4, 0.1], &[0.35, 0.8, 0.4, 0.9]).unwrap();
        assert!(close(m.auroc, 0.8125, 1e-15), "{}", m.auroc);
        assert!(close(m.aupr, 0.816_666_666_666_666_7, 1e-15), "{}", m.aupr);
        // y_true = [1,0,1,0,1,1,0,0,0,1], y_score = [3,3,2,1,5,2,2,0,1,4]
        // roc_auc_score → 0.86, average_precision_score → 0.8357142857142856.
        let m = detection_metrics(&[3.0, 1.0, 2.0, 0.0, 1.0], &[3.0, 2.0, 5.0, 2.0, 4.0]).unwrap();
        assert!(close(m.auroc, 0.86, 1e-15), "{}", m.auroc);
        assert!(close(m.aupr, 0.835_714_285_714_285_6, 1e-15), "{}", m.aupr);
    }

    #[test]
    fn hand_example_aupr_and_fpr95() {
        // Descending: .9 O, .8 O, .7 I, .6 O, .5 I, .4 I, .3 O, .2 I, .1 I.
        // Precision at each OOD hit: 1/1, 2/2, 3/4, 4/7 → AP = (1 + 1 + 3/4 + 4/7)/4.
        // AUROC = (5 + 5 + 4 + 2)/20 = 0.8 (pairs won by each OOD sample).
        // 95% of 4 OOD needs all 4: threshold 0.3 flags 3 of 5 ID → FPR95 = 0.6.
        let m = detection_metrics(&[0.7, 0.5, 0.4, 0.2, 0.1], &[0.9, 0.8, 0.6, 0.3]).unwrap();
        assert!(close(m.aupr, (2.75 + 4.0 / 7.0) / 4.0, 1e-15), "{}", m.aupr);
        assert!(close(m.auroc, 0.8, 1e-15));
        assert_eq!(m.fpr95, 0.6);
    }

    #[test]
    fn fpr95_counts_ties_at_the_threshold_as_flagged() {
        // OOD scores 1..=20: 95% = 19 samples, reached first at threshold 2.
        let ood: Vec<f64> = (1..=20).map(f64::from).collect();
        // ID scores at 2.0 tie with the threshold and are flagged; 1.5 and 0 are not.
        let m = detection_metrics(&[2.0, 2.0, 1.5, 0.0], &ood).unwrap();
        assert_eq!(m.fpr95, 0.5);
        // 19 of 20 exactly is enough (100·19 ≥ 95·20), no float rounding involved.
        let mut ood = vec![5.0; 19];
        ood.push(-1.0);
        let m = detection_metrics(&[5.0, 0.0, 0.0, 0.0], &ood).unwrap();
        assert_eq!(m.fpr95, 0.25);
    }

    #[test]
    fn bad_scores_are_errors() {
        assert_eq!(
            detection_metrics(&[], &[1.0]).unwrap_err(),
            MetricsError::NoScores {
                what: "in-distribution"
            }
        );
        assert!(matches!(
            detection_metrics(&[1.0], &[]),
            Err(MetricsError::NoScores { what: "OOD" })
        ));
        assert!(matches!(
            detection_metrics(&[1.0, f64::NAN], &[1.0]),
            Err(MetricsError::NonFiniteScore { index: 1, .. })
        ));
        assert!(matches!(
            detection_metrics(&[1.0], &[f64::NEG_INFINITY]),
            Err(MetricsError::NonFiniteScore { index: 0, .. })
        ));
    }

    #[test]
    fn ensemble_ood_detection_orients_scores() {
        // In-distribution: confident, members agree. OOD: members confidently disagree.
        let id_a: &[&[f32]] = &[&[0.95, 0.05], &[0.1, 0.9]];
        let ood_a: &[&[f32]] = &[&[0.9, 0.1], &[0.2, 0.8]];
        let ood_b: &[&[f32]] = &[&[0.1, 0.9], &[0.8, 0.2]];
        let r = ood_detection(&preds(&[id_a, id_a]), &preds(&[ood_a, ood_b])).unwrap();
        assert_eq!(r.max_prob.auroc, 1.0);
        assert_eq!(r.entropy.auroc, 1.0);
        assert_eq!(r.mutual_information.auroc, 1.0);
        assert_eq!((r.in_samples, r.ood_samples), (2, 2));
    }

    #[test]
    fn single_member_mutual_information_is_chance() {
        let id: &[&[f32]] = &[&[0.95, 0.05], &[0.1, 0.9], &[0.7, 0.3]];
        let ood: &[&[f32]] = &[&[0.5, 0.5], &[0.6, 0.4]];
        let r = ood_detection(&preds(&[id]), &preds(&[ood])).unwrap();
        assert_eq!(r.mutual_information.auroc, 0.5);
        assert_eq!(r.mutual_information.fpr95, 1.0);
        assert_eq!(r.max_prob.auroc, 1.0);
    }

    #[test]
    fn mismatched_ensembles_are_errors() {
        let two: &[&[f32]] = &[&[0.5, 0.5]];
        let three: &[&[f32]] = &[&[0.2, 0.3, 0.5]];
        assert_eq!(
            ood_detection(&preds(&[two]), &preds(&[three])).unwrap_err(),
            MetricsError::Mismatch {
                what: "classes",
                in_dist: 2,
                ood: 3
            }
        );
        assert!(matches!(
            ood_detection(&preds(&[two, two]), &preds(&[two])),
            Err(MetricsError::Mismatch {
                what: "members",
                ..
            })
        ));
        let mut bad = preds(&[two]);
        bad.probs[0] = -0.5;
        assert!(ood_detection(&preds(&[two]), &bad).is_err());
    }
}
