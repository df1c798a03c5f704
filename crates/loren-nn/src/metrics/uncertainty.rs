//! Per-sample uncertainty of an ensemble: top-label confidence, predictive entropy, and the
//! mutual information between the prediction and the member (the disagreement part of the
//! entropy).

use serde::{Deserialize, Serialize};

use super::{Predictions, Result, argmax, entropy};

/// Per-sample uncertainty scores of the ensemble (mean) prediction, all in f64, one per sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// max_c p̄_c: the top-label confidence (high = certain).
    pub max_prob: Vec<f64>,
    /// H(p̄) in nats (high = uncertain).
    pub entropy: Vec<f64>,
    /// H(p̄) − (1/M) Σ_m H(p_m), clamped at 0 against rounding. Identically 0 for M = 1.
    pub mutual_information: Vec<f64>,
}

/// The three per-sample uncertainty scores of the ensemble prediction.
///
/// # Errors
/// Invalid `preds`, as [`Predictions::new`] reports them.
pub fn scores(preds: &Predictions) -> Result<Scores> {
    preds.validate()?;
    let stats = SampleStats::compute(preds);
    Ok(Scores {
        mutual_information: stats.mutual_information(),
        max_prob: stats.confidence,
        entropy: stats.entropy,
    })
}

/// What every metric needs per sample, computed once from validated predictions.
pub(crate) struct SampleStats {
    /// [N, C] mean probabilities.
    pub mean: Vec<f64>,
    /// Top-label confidence of the mean.
    pub confidence: Vec<f64>,
    /// Argmax of the mean (lowest index on ties).
    pub prediction: Vec<usize>,
    /// H(p̄).
    pub entropy: Vec<f64>,
    /// (1/M) Σ_m H(p_m).
    pub expected_entropy: Vec<f64>,
}

impl SampleStats {
    /// `preds` must have been validated (classes ≥ 1 and the shape consistent).
    pub fn compute(preds: &Predictions) -> Self {
        let mean = preds.mean_f64();
        let rows = || mean.chunks_exact(preds.classes);
        let prediction: Vec<usize> = rows().map(argmax).collect();
        let confidence = rows().zip(&prediction).map(|(r, &k)| r[k]).collect();
        let entropy = rows().map(|r| entropy(r.iter().copied())).collect();
        Self {
            expected_entropy: expected_entropy(preds),
            mean,
            confidence,
            prediction,
            entropy,
        }
    }

    /// Per-sample H(p̄) − E_m H(p_m). Jensen makes it ≥ 0 in exact arithmetic; the clamp removes
    /// the rounding that can push identical members a hair below.
    pub fn mutual_information(&self) -> Vec<f64> {
        self.entropy
            .iter()
            .zip(&self.expected_entropy)
            .map(|(h, e)| (h - e).max(0.0))
            .collect()
    }
}

/// (1/M) Σ_m H(p_m) per sample.
fn expected_entropy(preds: &Predictions) -> Vec<f64> {
    let mut sum = vec![0.0f64; preds.samples];
    for m in 0..preds.members {
        let rows = preds.member(m).chunks_exact(preds.classes);
        for (s, row) in sum.iter_mut().zip(rows) {
            *s += entropy(row.iter().map(|&p| f64::from(p)));
        }
    }
    let members = preds.members as f64;
    for s in &mut sum {
        *s /= members;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::super::MetricsError;
    use super::super::test_util::{close, preds};
    use super::*;

    #[test]
    fn mutual_information_is_zero_for_identical_members() {
        let row: &[&[f32]] = &[&[0.7, 0.2, 0.1], &[0.3, 0.3, 0.4]];
        let s = scores(&preds(&[row, row, row])).unwrap();
        // Zero up to the rounding of averaging three equal entropies.
        assert!(
            s.mutual_information
                .iter()
                .all(|&mi| (0.0..1e-15).contains(&mi))
        );
        let h0 = -(0.7f64.ln() * 0.7 + 0.2 * 0.2f64.ln() + 0.1 * 0.1f64.ln());
        assert!(close(s.entropy[0], h0, 1e-6));
        assert!(close(s.max_prob[0], 0.7, 1e-6));
        assert!(close(s.max_prob[1], 0.4, 1e-6));
    }

    #[test]
    fn mutual_information_is_positive_when_members_disagree() {
        // Two confident members that disagree: p̄ = [0.5, 0.5], H(p̄) = ln 2, each H(p_m) = 0,
        // so MI = ln 2. Sample 1 agrees exactly, so its MI is 0.
        let a: &[&[f32]] = &[&[1.0, 0.0], &[0.9, 0.1]];
        let b: &[&[f32]] = &[&[0.0, 1.0], &[0.9, 0.1]];
        let s = scores(&preds(&[a, b])).unwrap();
        assert!(close(s.mutual_information[0], 2f64.ln(), 1e-12));
        assert_eq!(s.mutual_information[1], 0.0);
        // A milder disagreement: [0.8, 0.2] and [0.4, 0.6], mean [0.6, 0.4].
        let c: &[&[f32]] = &[&[0.8, 0.2]];
        let d: &[&[f32]] = &[&[0.4, 0.6]];
        let s = scores(&preds(&[c, d])).unwrap();
        let h = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        let want = h(0.6) - (h(0.8) + h(0.4)) / 2.0;
        assert!(want > 0.0);
        assert!(close(s.mutual_information[0], want, 1e-6));
    }

    #[test]
    fn single_member_has_zero_mutual_information() {
        let s = scores(&preds(&[&[&[0.6, 0.4], &[0.1, 0.9]]])).unwrap();
        assert_eq!(s.mutual_information, vec![0.0, 0.0]);
    }

    #[test]
    fn scores_reject_tampered_predictions() {
        let mut p = preds(&[&[&[0.6, 0.4]]]);
        p.probs[0] = f32::NAN;
        assert!(matches!(
            scores(&p),
            Err(MetricsError::BadProbability { .. })
        ));
    }
}
