//! Temperature scaling of the ensemble's prediction (Guo et al., 2017), pooled then calibrated:
//! the mean of the members' probabilities p̄ becomes softmax(ln p̄ / T), with the one T > 0 that
//! minimises the NLL on held-out data. It never changes the predicted class, so it shows how much
//! of a method's calibration error a single post-hoc parameter would remove, which is the
//! question to ask before crediting an ensemble with better calibration.

use serde::{Deserialize, Serialize};

use super::calibration::validate_labels;
use super::{MetricsError, Predictions, Result, calibration};

/// Temperatures are searched in [1/`RANGE`, `RANGE`].
const RANGE: f64 = 100.0;
/// A mean probability f32 rounded to 0 counts as this: its log stays finite, and it is too
/// small to move any tempered distribution that has a likelier class.
const UNDERFLOW: f64 = 1e-45;

/// The test scores of the temperature-scaled prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemperedReport {
    /// T, fitted on the validation part; above 1 softens an overconfident prediction.
    pub temperature: f64,
    /// Whether the fit stopped at the search's bound (1/100 or 100) rather than at a minimum:
    /// on a validation part classified without an error the NLL keeps falling as T does, and
    /// the scaled test prediction is then close to one-hot; on one of a model that has learnt
    /// nothing it may keep falling as T rises, to a prediction close to uniform.
    #[serde(default)]
    pub at_bound: bool,
    pub ece: f64,
    pub adaptive_ece: f64,
    pub nll: f64,
    pub brier: f64,
}

/// ln p̄ for every sample and class, [N, C], in f64.
fn log_mean(preds: &Predictions) -> Vec<f64> {
    preds
        .mean_f64()
        .into_iter()
        .map(|p| p.max(UNDERFLOW).ln())
        .collect()
}

/// softmax(z / T) of one row, into `out`.
fn tempered_row(z: &[f64], t: f64, out: &mut [f64]) {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v / t));
    let mut sum = 0.0;
    for (o, &v) in out.iter_mut().zip(z) {
        *o = (v / t - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

/// The mean NLL of softmax(z / T) (unfloored: the fit needs its smooth form).
fn tempered_nll(z: &[f64], classes: usize, labels: &[u32], t: f64) -> f64 {
    let total: f64 = z
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &y)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v / t));
            let lse = max + row.iter().map(|&v| (v / t - max).exp()).sum::<f64>().ln();
            lse - row[y as usize] / t
        })
        .sum();
    total / labels.len() as f64
}

/// The temperature that minimises the NLL of softmax(ln p̄ / T) on `preds` and `labels`. The
/// NLL is convex in 1/T, so a golden-section search over ln T in [−ln 100, ln 100] finds its
/// minimum, to about 1e-9 relative.
///
/// # Errors
/// As [`calibration`] for invalid predictions or labels.
pub fn fit_temperature(preds: &Predictions, labels: &[u32]) -> Result<f64> {
    preds.validate()?;
    validate_labels(labels, preds.samples, preds.classes)?;
    let z = log_mean(preds);
    let nll = |u: f64| tempered_nll(&z, preds.classes, labels, u.exp());
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut lo, mut hi) = (-RANGE.ln(), RANGE.ln());
    let (mut a, mut b) = (hi - phi * (hi - lo), lo + phi * (hi - lo));
    let (mut fa, mut fb) = (nll(a), nll(b));
    while hi - lo > 1e-9 {
        if fa <= fb {
            (hi, b, fb) = (b, a, fa);
            a = hi - phi * (hi - lo);
            fa = nll(a);
        } else {
            (lo, a, fa) = (a, b, fb);
            b = lo + phi * (hi - lo);
            fb = nll(b);
        }
    }
    Ok(((lo + hi) / 2.0).exp())
}

/// The prediction softmax(ln p̄ / T), as one member.
///
/// # Errors
/// As [`Predictions::new`] for invalid predictions; [`MetricsError::BadTemperature`] for a
/// temperature that is not positive and finite.
pub fn tempered(preds: &Predictions, t: f64) -> Result<Predictions> {
    preds.validate()?;
    if !(t.is_finite() && t > 0.0) {
        return Err(MetricsError::BadTemperature(t));
    }
    let z = log_mean(preds);
    let c = preds.classes;
    let mut row = vec![0.0f64; c];
    let mut probs = Vec::with_capacity(z.len());
    for zs in z.chunks_exact(c) {
        tempered_row(zs, t, &mut row);
        probs.extend(row.iter().map(|&p| p as f32));
    }
    Predictions::new(1, preds.samples, c, probs)
}

/// The test scores of `test` scaled by `temperature`.
///
/// # Errors
/// As [`calibration`].
pub fn tempered_report(
    test: &Predictions,
    labels: &[u32],
    temperature: f64,
) -> Result<TemperedReport> {
    let r = calibration(&tempered(test, temperature)?, labels)?;
    Ok(TemperedReport {
        temperature,
        at_bound: (temperature.ln().abs() - RANGE.ln()).abs() < 1e-6,
        ece: r.ece,
        adaptive_ece: r.adaptive_ece,
        nll: r.nll,
        brier: r.brier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::test_util::close;

    /// Three members whose mean is softmax(k·z) for random logits z over 5 classes, with labels
    /// drawn from softmax(z): overconfident by k, so the fitted temperature is near k.
    fn overconfident(k: f64, n: usize) -> (Predictions, Vec<u32>) {
        let c = 5;
        let mut rng = loren_tensor::Rng::new(5);
        let (mut probs, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let z: Vec<f64> = (0..c).map(|_| 2.0 * rng.next_f32() as f64).collect();
            let mut p = vec![0.0; c];
            tempered_row(&z, 1.0, &mut p);
            let u = rng.next_f32() as f64;
            let mut acc = 0.0;
            let y = p.iter().position(|&q| {
                acc += q;
                u < acc
            });
            labels.push(y.unwrap_or(c - 1) as u32);
            tempered_row(&z, 1.0 / k, &mut p);
            probs.extend(p.iter().map(|&q| q as f32));
        }
        let three = probs.repeat(3);
        (Predictions::new(3, n, c, three).unwrap(), labels)
    }

    #[test]
    fn the_fitted_temperature_undoes_known_overconfidence_and_minimises_the_nll() {
        let (preds, labels) = overconfident(3.0, 20_000);
        let t = fit_temperature(&preds, &labels).unwrap();
        assert!((t - 3.0).abs() < 0.15, "fitted {t}");
        let z = log_mean(&preds);
        let nll = |t: f64| tempered_nll(&z, 5, &labels, t);
        assert!(nll(t) <= nll(t * 1.001) && nll(t) <= nll(t / 1.001));
        // And it calibrates: the scaled ECE is well below the raw one.
        let raw = calibration(&preds, &labels).unwrap();
        let scaled = tempered_report(&preds, &labels, t).unwrap();
        assert!(
            scaled.ece < raw.ece / 3.0,
            "{} against {}",
            scaled.ece,
            raw.ece
        );
        assert!(scaled.nll < raw.nll);
        assert!(!scaled.at_bound);
    }

    /// Far overconfident, as a large ensemble trained long can be: a search stopping at 10
    /// would end at its bound.
    #[test]
    fn the_search_reaches_large_temperatures() {
        let (preds, labels) = overconfident(30.0, 5_000);
        let t = fit_temperature(&preds, &labels).unwrap();
        assert!((t - 30.0).abs() < 3.0, "fitted {t}");
        assert!(!tempered_report(&preds, &labels, t).unwrap().at_bound);
    }

    /// With no error on the fitting set, sharper is always better: the fit ends at the bound,
    /// and says so.
    #[test]
    fn a_set_without_errors_drives_the_temperature_to_its_bound() {
        let (preds, _) = overconfident(1.0, 300);
        let argmax: Vec<u32> = preds
            .mean_f64()
            .chunks_exact(5)
            .map(|row| (0..5).fold(0, |b, c| if row[c] > row[b] { c } else { b }) as u32)
            .collect();
        let t = fit_temperature(&preds, &argmax).unwrap();
        // The bound the docs give, written as itself.
        assert!(close(t, 0.01, 1e-8), "{t}");
        assert!(tempered_report(&preds, &argmax, t).unwrap().at_bound);
    }

    #[test]
    fn temperature_one_keeps_the_mean_and_no_temperature_changes_the_prediction() {
        let (preds, labels) = overconfident(2.0, 200);
        let mean = preds.mean_f64();
        let same = tempered(&preds, 1.0).unwrap();
        for (a, b) in same.probs.iter().zip(&mean) {
            assert!(close(*a as f64, *b, 1e-6), "{a} against {b}");
        }
        let raw = calibration(&preds, &labels).unwrap();
        for t in [0.2, 0.5, 4.0, 50.0] {
            let r = calibration(&tempered(&preds, t).unwrap(), &labels).unwrap();
            assert_eq!(r.accuracy, raw.accuracy, "T = {t}");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let (preds, labels) = overconfident(2.0, 10);
        assert!(fit_temperature(&preds, &labels[..9]).is_err());
        assert!(tempered(&preds, 0.0).is_err());
        assert!(tempered(&preds, f64::NAN).is_err());
    }
}
