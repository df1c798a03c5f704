//! Each method's peak learning rate, chosen on validation (`loren compare --lrs`).
//!
//! The rule: of the rates tried, start at the lowest and step up to the next while that one's
//! validation NLL is lower at every seed. A step needs every seed to agree because one lucky
//! seed moves a mean over four by more than the rates differ on a small validation part; the
//! test split chooses nothing.

use std::fmt::Write;

use anyhow::{Result, bail};
use loren_nn::Method;
use serde::Serialize;

use crate::report::{aligned_columns, rate};
use crate::run::RunResult;

/// One rate tried for a method at one ensemble size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateTrial {
    pub lr: f32,
    /// The validation NLL at each seed, in the order of [`RateChoice::seeds`].
    pub val_nll: Vec<f64>,
    pub picked: bool,
}

/// A method at one ensemble size over the rates tried, lowest first, one of them picked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateChoice {
    pub method: Method,
    pub members: usize,
    pub seeds: Vec<u64>,
    pub trials: Vec<RateTrial>,
}

impl RateChoice {
    pub fn picked(&self) -> f32 {
        self.trials
            .iter()
            .find(|t| t.picked)
            .map(|t| t.lr)
            .expect("a choice picks one rate")
    }
}

/// The runs grouped by method and size, in the order they first appear, each group's rate
/// picked by the rule. Refused when a run has no validation score (it trained on that part) or
/// when the rates were not all run at the same seeds.
pub fn choose_rates(runs: &[RunResult]) -> Result<Vec<RateChoice>> {
    let mut choices: Vec<RateChoice> = Vec::new();
    for r in runs {
        let Some(nll) = r.val_nll else {
            bail!(
                "{} (M={}) has no validation score to choose its learning rate by: it trained on \
                 the validation part (--train-on-val)",
                r.method,
                r.members
            );
        };
        let choice = match choices
            .iter_mut()
            .position(|c| (c.method, c.members) == (r.method, r.members))
        {
            Some(i) => &mut choices[i],
            None => {
                choices.push(RateChoice {
                    method: r.method,
                    members: r.members,
                    seeds: Vec::new(),
                    trials: Vec::new(),
                });
                choices.last_mut().expect("just pushed")
            }
        };
        if !choice.seeds.contains(&r.seed) {
            choice.seeds.push(r.seed);
        }
        let lr = r.settings.train.lr;
        match choice.trials.iter_mut().find(|t| t.lr == lr) {
            Some(t) => t.val_nll.push(nll),
            None => choice.trials.push(RateTrial {
                lr,
                val_nll: vec![nll],
                picked: false,
            }),
        }
    }
    for c in &mut choices {
        if let Some(t) = c.trials.iter().find(|t| t.val_nll.len() != c.seeds.len()) {
            bail!(
                "{} (M={}) ran at lr {} for {} of its {} seeds: the rule compares rates seed by \
                 seed",
                c.method,
                c.members,
                rate(t.lr),
                t.val_nll.len(),
                c.seeds.len()
            );
        }
        c.trials.sort_by(|a, b| a.lr.total_cmp(&b.lr));
        let pick = step_up(&c.trials);
        c.trials[pick].picked = true;
    }
    Ok(choices)
}

/// The rule over trials sorted by rate: the index it stops at.
fn step_up(trials: &[RateTrial]) -> usize {
    let mut pick = 0;
    while pick + 1 < trials.len() {
        let (here, next) = (&trials[pick].val_nll, &trials[pick + 1].val_nll);
        if next.iter().zip(here).all(|(n, h)| n < h) {
            pick += 1;
        } else {
            break;
        }
    }
    pick
}

/// The choices as a table: each rate's validation NLL per seed and their mean, the picked one
/// marked.
pub fn rate_table(choices: &[RateChoice]) -> String {
    let mut s = String::from(
        "peak learning rate by validation NLL (the lowest, then the next while it is lower at \
         every seed):\n",
    );
    let mut rows = Vec::new();
    let mut seeds_above: Option<&[u64]> = None;
    for c in choices {
        // A header where the seeds change: in a comparison, once.
        if seeds_above != Some(&c.seeds) {
            let mut header = vec!["method".to_string(), "M".to_string(), "lr".to_string()];
            header.extend(c.seeds.iter().map(|s| format!("seed {s}")));
            if c.seeds.len() > 1 {
                header.push("mean".to_string());
            }
            rows.push(header);
            seeds_above = Some(&c.seeds);
        }
        for t in &c.trials {
            let mut row = vec![
                c.method.name().to_string(),
                c.members.to_string(),
                rate(t.lr),
            ];
            row.extend(t.val_nll.iter().map(|v| format!("{v:.4}")));
            if c.seeds.len() > 1 {
                let mean = t.val_nll.iter().sum::<f64>() / t.val_nll.len() as f64;
                row.push(format!("{mean:.4}"));
            }
            if t.picked {
                row.push("picked".to_string());
            }
            rows.push(row);
        }
    }
    let _ = write!(s, "{}", aligned_columns(&rows, 1));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(lr: f32, val_nll: &[f64]) -> RateTrial {
        RateTrial {
            lr,
            val_nll: val_nll.to_vec(),
            picked: false,
        }
    }

    #[test]
    fn steps_up_only_while_every_seed_agrees() {
        // The next rate lower at every seed: step; lower at some only: stop, whatever the mean.
        let trials = [
            trial(3e-4, &[0.5, 0.5, 0.5]),
            trial(1e-3, &[0.4, 0.3, 0.49]),
            trial(3e-3, &[0.1, 0.1, 0.6]),
        ];
        assert_eq!(step_up(&trials), 1);
        let trials = [trial(3e-4, &[0.5, 0.5]), trial(1e-3, &[0.1, 0.5])];
        assert_eq!(step_up(&trials), 0, "a tie at one seed is no step");
        let trials = [
            trial(3e-4, &[0.5]),
            trial(1e-3, &[0.4]),
            trial(3e-3, &[0.3]),
        ];
        assert_eq!(step_up(&trials), 2);
        assert_eq!(step_up(&[trial(1e-3, &[0.2])]), 0);
    }

    #[test]
    fn a_lower_rate_past_a_worse_one_is_not_reached() {
        // The rule stops at the first rate that does not win; it does not look beyond it.
        let trials = [
            trial(3e-4, &[0.5, 0.5]),
            trial(1e-3, &[0.6, 0.6]),
            trial(3e-3, &[0.1, 0.1]),
        ];
        assert_eq!(step_up(&trials), 0);
    }
}
