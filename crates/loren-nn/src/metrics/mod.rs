//! Evaluation metrics for ensembles: accuracy, calibration, proper scoring rules, ensemble
//! diversity, per-sample uncertainty scores and out-of-distribution detection.
//!
//! Everything here is a pure function over member probabilities ([`Predictions`]) and labels.
//! Inputs are f32 (what the models produce); every sum is accumulated in f64. Bad input (shapes
//! that do not agree, a label out of range, a probability that is NaN, negative, or a row that
//! does not sum to 1) is a [`MetricsError`], never a panic. The functions re-validate their
//! [`Predictions`] because its fields are public and may have been changed after construction.

mod calibration;
mod ood;
mod size;
mod temperature;
mod uncertainty;

pub use calibration::{
    CalibrationReport, NLL_FLOOR, NUM_BINS, ReliabilityBin, ShiftRow, calibration, paper_ece,
};
pub use ood::{DetectionMetrics, OodReport, detection_metrics, ood_detection};
pub use size::{SizeRow, by_ensemble_size, ensemble_sizes};
pub use temperature::{TemperedReport, fit_temperature, tempered, tempered_report};
pub use uncertainty::{Scores, scores};

/// How far a row of probabilities may sum from 1, and how far above 1 a single probability may
/// sit: softmax in f32 (or bf16 on the GPU) is only that exact.
pub const PROB_TOLERANCE: f64 = 1e-3;

/// Everything that can be wrong with the input of a metric.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("{what} must be at least 1, got 0")]
    Empty { what: &'static str },
    #[error("{members} members × {samples} samples × {classes} classes overflows usize")]
    TooLarge {
        members: usize,
        samples: usize,
        classes: usize,
    },
    #[error(
        "probs has {got} values, expected {expected} = {members} members × {samples} samples × \
         {classes} classes"
    )]
    ProbsLength {
        expected: usize,
        got: usize,
        members: usize,
        samples: usize,
        classes: usize,
    },
    #[error(
        "member {member}, sample {sample}, class {class}: probability {value} is not a number in \
         [0, 1]"
    )]
    BadProbability {
        member: usize,
        sample: usize,
        class: usize,
        value: f32,
    },
    #[error("member {member}, sample {sample}: probabilities sum to {sum}, not 1 (±{tolerance})")]
    BadRowSum {
        member: usize,
        sample: usize,
        sum: f64,
        tolerance: f64,
    },
    #[error("{got} labels for {expected} samples")]
    LabelCount { expected: usize, got: usize },
    #[error("sample {sample}: label {label} is not below the number of classes {classes}")]
    LabelOutOfRange {
        sample: usize,
        label: u32,
        classes: usize,
    },
    #[error("in-distribution and OOD predictions differ in {what}: {in_dist} vs {ood}")]
    Mismatch {
        what: &'static str,
        in_dist: usize,
        ood: usize,
    },
    #[error("temperature {0} is not positive and finite")]
    BadTemperature(f64),
    #[error("no {what} scores")]
    NoScores { what: &'static str },
    #[error("{what} score {index} is not finite: {value}")]
    NonFiniteScore {
        what: &'static str,
        index: usize,
        value: f64,
    },
}

pub type Result<T> = std::result::Result<T, MetricsError>;

/// Per-member softmax probabilities of an ensemble over a set of samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    pub members: usize,
    pub samples: usize,
    pub classes: usize,
    /// [M, N, C], member-major: member m's [N, C] block is contiguous.
    pub probs: Vec<f32>,
}

impl Predictions {
    /// Checks the shape and that every row is a probability distribution.
    ///
    /// # Errors
    /// [`MetricsError::Empty`], [`MetricsError::TooLarge`] or [`MetricsError::ProbsLength`] for
    /// a bad shape; [`MetricsError::BadProbability`] for a value that is NaN, infinite, negative
    /// or above 1 + [`PROB_TOLERANCE`]; [`MetricsError::BadRowSum`] for a row whose sum is off 1
    /// by more than [`PROB_TOLERANCE`].
    pub fn new(members: usize, samples: usize, classes: usize, probs: Vec<f32>) -> Result<Self> {
        let preds = Self {
            members,
            samples,
            classes,
            probs,
        };
        preds.validate()?;
        Ok(preds)
    }

    /// Re-checks what [`Predictions::new`] checks: the fields are public, so a metric cannot
    /// trust that they still agree.
    ///
    /// # Errors
    /// As [`Predictions::new`].
    pub fn validate(&self) -> Result<()> {
        self.validate_shape()?;
        for member in 0..self.members {
            for (sample, row) in self.member(member).chunks_exact(self.classes).enumerate() {
                validate_row(member, sample, row)?;
            }
        }
        Ok(())
    }

    fn validate_shape(&self) -> Result<()> {
        let (members, samples, classes) = (self.members, self.samples, self.classes);
        for (what, n) in [
            ("members", members),
            ("samples", samples),
            ("classes", classes),
        ] {
            if n == 0 {
                return Err(MetricsError::Empty { what });
            }
        }
        let expected = members
            .checked_mul(samples)
            .and_then(|n| n.checked_mul(classes))
            .ok_or(MetricsError::TooLarge {
                members,
                samples,
                classes,
            })?;
        if self.probs.len() != expected {
            return Err(MetricsError::ProbsLength {
                expected,
                got: self.probs.len(),
                members,
                samples,
                classes,
            });
        }
        Ok(())
    }

    /// Member m's [N, C] probabilities. Empty when m is not a member (or the fields disagree),
    /// rather than a panic.
    pub fn member(&self, m: usize) -> &[f32] {
        if m >= self.members {
            return &[];
        }
        let len = self.samples.saturating_mul(self.classes);
        m.checked_mul(len)
            .and_then(|start| self.probs.get(start..start.checked_add(len)?))
            .unwrap_or(&[])
    }

    /// The ensemble prediction, [N, C]: the mean of the members' probabilities.
    pub fn mean(&self) -> Vec<f32> {
        self.mean_f64().into_iter().map(|p| p as f32).collect()
    }

    /// The mean in f64, which the metrics use so the average of M f32 rows loses nothing.
    pub(crate) fn mean_f64(&self) -> Vec<f64> {
        // Bounded by probs.len() so inconsistent public fields cannot ask for a huge buffer.
        let len = self
            .samples
            .saturating_mul(self.classes)
            .min(self.probs.len());
        let mut sum = vec![0.0f64; len];
        for m in 0..self.members {
            for (s, &p) in sum.iter_mut().zip(self.member(m)) {
                *s += f64::from(p);
            }
        }
        // Divide rather than multiply by 1/M: M copies of one f32 sum exactly in f64, so
        // identical members give a mean bit-equal to each of them.
        let members = self.members.max(1) as f64;
        for s in &mut sum {
            *s /= members;
        }
        sum
    }
}

fn validate_row(member: usize, sample: usize, row: &[f32]) -> Result<()> {
    let mut sum = 0.0f64;
    for (class, &value) in row.iter().enumerate() {
        let v = f64::from(value);
        // `contains` is false for NaN, so NaN is rejected here too.
        if !(0.0..=1.0 + PROB_TOLERANCE).contains(&v) {
            return Err(MetricsError::BadProbability {
                member,
                sample,
                class,
                value,
            });
        }
        sum += v;
    }
    if (sum - 1.0).abs() > PROB_TOLERANCE {
        return Err(MetricsError::BadRowSum {
            member,
            sample,
            sum,
            tolerance: PROB_TOLERANCE,
        });
    }
    Ok(())
}

/// Index of the largest value; ties go to the lowest index (the first maximum), as
/// `torch.argmax`/`np.argmax` do.
pub fn argmax<T: Copy + PartialOrd>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Shannon entropy in nats, with 0·ln 0 = 0.
pub(crate) fn entropy(row: impl IntoIterator<Item = f64>) -> f64 {
    let h: f64 = row
        .into_iter()
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    // A probability a hair above 1 (allowed by PROB_TOLERANCE) gives a tiny negative term.
    h.max(0.0)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::Predictions;

    /// Builds predictions from per-member rows, panicking on bad test data.
    pub fn preds(members: &[&[&[f32]]]) -> Predictions {
        let samples = members[0].len();
        let classes = members[0][0].len();
        let probs = members
            .iter()
            .flat_map(|m| m.iter())
            .flat_map(|r| r.iter())
            .copied();
        Predictions::new(members.len(), samples, classes, probs.collect()).unwrap()
    }

    pub fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::preds;
    use super::*;

    #[test]
    fn mean_averages_members_and_member_slices() {
        let p = preds(&[&[&[0.2, 0.8], &[1.0, 0.0]], &[&[0.6, 0.4], &[0.0, 1.0]]]);
        assert_eq!(p.member(1), &[0.6, 0.4, 0.0, 1.0]);
        assert!(p.member(2).is_empty());
        let mean = p.mean();
        let want = [0.4f32, 0.6, 0.5, 0.5];
        for (a, b) in mean.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{mean:?}");
        }
    }

    #[test]
    fn constructor_rejects_every_bad_shape() {
        let empty = |m, n, c| Predictions::new(m, n, c, vec![]).unwrap_err();
        assert_eq!(empty(0, 1, 1), MetricsError::Empty { what: "members" });
        assert_eq!(empty(1, 0, 1), MetricsError::Empty { what: "samples" });
        assert_eq!(empty(1, 1, 0), MetricsError::Empty { what: "classes" });
        assert!(matches!(
            Predictions::new(usize::MAX, 2, 2, vec![]),
            Err(MetricsError::TooLarge { .. })
        ));
        assert!(matches!(
            Predictions::new(2, 1, 2, vec![0.5, 0.5]),
            Err(MetricsError::ProbsLength {
                expected: 4,
                got: 2,
                ..
            })
        ));
    }

    #[test]
    fn constructor_rejects_bad_probabilities() {
        let bad = |probs: Vec<f32>| Predictions::new(1, 1, 2, probs).unwrap_err();
        assert!(matches!(
            bad(vec![f32::NAN, 1.0]),
            MetricsError::BadProbability { class: 0, .. }
        ));
        assert!(matches!(
            bad(vec![1.5, -0.5]),
            MetricsError::BadProbability { class: 0, .. }
        ));
        assert!(matches!(
            bad(vec![-0.25, 1.0]),
            MetricsError::BadProbability { .. }
        ));
        assert!(matches!(
            bad(vec![f32::INFINITY, 0.0]),
            MetricsError::BadProbability { .. }
        ));
        assert!(matches!(
            bad(vec![0.5, 0.49]),
            MetricsError::BadRowSum { .. }
        ));
        // Within tolerance is fine: f32 softmax rows are not exact.
        assert!(Predictions::new(1, 1, 2, vec![0.5, 0.5004]).is_ok());
    }

    #[test]
    fn tampered_fields_are_caught_without_panicking() {
        let mut p = preds(&[&[&[0.5, 0.5]]]);
        p.samples = 3;
        assert!(matches!(
            p.validate(),
            Err(MetricsError::ProbsLength { .. })
        ));
        assert!(p.member(0).is_empty());
        let _ = p.mean();
        p.classes = 0;
        assert!(p.validate().is_err());
        let _ = p.mean();
    }

    #[test]
    fn argmax_breaks_ties_by_lowest_index() {
        assert_eq!(argmax(&[0.25f32, 0.5, 0.25]), 1);
        assert_eq!(argmax(&[0.4f64, 0.2, 0.4]), 0);
        assert_eq!(argmax(&[0.2f64, 0.4, 0.4]), 1);
    }

    #[test]
    fn entropy_in_nats() {
        assert_eq!(entropy([1.0, 0.0]), 0.0);
        assert!((entropy([0.5, 0.5]) - 2f64.ln()).abs() < 1e-15);
        assert!((entropy([0.25; 4]) - 4f64.ln()).abs() < 1e-15);
        // An exact zero adds nothing, and leaves the rest of its row counted.
        assert!((entropy([0.5, 0.5, 0.0]) - 2f64.ln()).abs() < 1e-15);
        assert!((entropy([0.0, 0.25, 0.25, 0.5]) - 1.5 * 2f64.ln()).abs() < 1e-15);
    }
}
