//! How the ensemble's accuracy and calibration grow with its size, from one trained ensemble: the
//! scores of smaller ensembles made of its members, with no more forward passes.

use serde::{Deserialize, Serialize};

use super::{Predictions, Result, calibration};

/// The scores of ensembles of `members` of the trained members, averaged over the groups they
/// were made from (see [`by_ensemble_size`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeRow {
    pub members: usize,
    /// How many disjoint groups of `members` the figures are the mean of.
    pub groups: usize,
    pub accuracy: f64,
    pub ece: f64,
    pub nll: f64,
    pub brier: f64,
}

/// The sizes scored for an ensemble of `m`: the powers of two below it, then `m` itself.
pub fn ensemble_sizes(m: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |k| k.checked_mul(2))
        .take_while(|&k| k < m)
        .collect();
    sizes.push(m);
    sizes
}

/// For each size k of [`ensemble_sizes`], the mean accuracy, ECE, NLL and Brier score (as
/// [`calibration`] scores them) of the ⌊M/k⌋ ensembles made of disjoint runs of k consecutive
/// members: members 0..k, k..2k, and so on. The members start independently and are trained
/// alike, so each group stands in for an ensemble of k (not exactly one trained at that size:
/// the loss is averaged over all M, and clipping is of all their gradients together). Averaging
/// over the groups uses every member wherever k divides M (at k = 1, each member alone; for
/// M = 6 at k = 4, members 4 and 5 sit out), and the last row is the whole ensemble's own
/// scores.
///
/// # Errors
/// As [`calibration`].
pub fn by_ensemble_size(preds: &Predictions, labels: &[u32]) -> Result<Vec<SizeRow>> {
    preds.validate()?;
    let per_member = preds.samples * preds.classes;
    let mut rows = Vec::new();
    for k in ensemble_sizes(preds.members) {
        let groups = preds.members / k;
        let mut sums = [0.0f64; 4];
        for g in 0..groups {
            let probs = preds.probs[g * k * per_member..(g + 1) * k * per_member].to_vec();
            let part = Predictions::new(k, preds.samples, preds.classes, probs)?;
            let r = calibration(&part, labels)?;
            for (s, v) in sums.iter_mut().zip([r.accuracy, r.ece, r.nll, r.brier]) {
                *s += v;
            }
        }
        let [accuracy, ece, nll, brier] = sums.map(|s| s / groups as f64);
        rows.push(SizeRow {
            members: k,
            groups,
            accuracy,
            ece,
            nll,
            brier,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::test_util::close;

    /// `members` members' random probabilities over 4 classes for 50 samples.
    fn random_preds(members: usize) -> (Predictions, Vec<u32>) {
        let (n, c) = (50, 4);
        let mut rng = loren_tensor::Rng::new(11);
        let mut probs = Vec::with_capacity(members * n * c);
        for _ in 0..members * n {
            let row: Vec<f32> = (0..c).map(|_| rng.next_f32() + 0.05).collect();
            let sum: f32 = row.iter().sum();
            probs.extend(row.iter().map(|p| p / sum));
        }
        let labels = (0..n).map(|i| (i * 7 % c) as u32).collect();
        (Predictions::new(members, n, c, probs).unwrap(), labels)
    }

    #[test]
    fn sizes_are_the_powers_of_two_below_m_and_m() {
        assert_eq!(ensemble_sizes(1), [1]);
        assert_eq!(ensemble_sizes(8), [1, 2, 4, 8]);
        assert_eq!(ensemble_sizes(6), [1, 2, 4, 6]);
    }

    #[test]
    fn each_size_is_the_mean_over_disjoint_groups_and_the_last_is_the_whole_ensemble() {
        let (preds, labels) = random_preds(6);
        let rows = by_ensemble_size(&preds, &labels).unwrap();
        let sizes: Vec<(usize, usize)> = rows.iter().map(|r| (r.members, r.groups)).collect();
        assert_eq!(sizes, [(1, 6), (2, 3), (4, 1), (6, 1)]);

        let whole = calibration(&preds, &labels).unwrap();
        let last = &rows[3];
        assert_eq!(
            (last.accuracy, last.ece, last.nll, last.brier),
            (whole.accuracy, whole.ece, whole.nll, whole.brier)
        );
        // One member alone: their mean accuracy is the report's mean member accuracy.
        assert!(close(rows[0].accuracy, whole.mean_member_accuracy, 1e-12));

        // Pairs 0-1, 2-3 and 4-5, each scored as its own ensemble.
        let pair = |g: usize| {
            let len = preds.samples * preds.classes;
            let probs = preds.probs[2 * g * len..2 * (g + 1) * len].to_vec();
            calibration(&Predictions::new(2, 50, 4, probs).unwrap(), &labels).unwrap()
        };
        let nll = (0..3).map(|g| pair(g).nll).sum::<f64>() / 3.0;
        let ece = (0..3).map(|g| pair(g).ece).sum::<f64>() / 3.0;
        assert!(close(rows[1].nll, nll, 1e-12) && close(rows[1].ece, ece, 1e-12));
        // Members 4 and 5 are left out at size 4: the first four alone.
        let first4 = preds.probs[..4 * 200].to_vec();
        let four = calibration(&Predictions::new(4, 50, 4, first4).unwrap(), &labels).unwrap();
        assert_eq!(rows[2].brier, four.brier);
    }

    #[test]
    fn bad_labels_are_an_error() {
        let (preds, _) = random_preds(2);
        assert!(by_ensemble_size(&preds, &[0; 3]).is_err());
    }
}
