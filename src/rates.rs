//! Each method's peak learning rate, chosen on validation (`loren compare --lrs`).
//!
//! The rule: of the rates tried, start at the lowest and step up to the next while that one's
//! validation NLL is lower at every seed. A step needs every seed to agree because one lucky
//! seed moves a mean over four by more than the rates differ on a small validation part; the
//! test split chooses nothing.

use std::fmt::Write;

use anyhow::{Context, Result, bail};
use loren_nn::Method;
use serde::Serialize;

use crate::report::{aligned_columns, by_method_and_size, rate, unique};
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
    by_method_and_size(runs)
        .iter()
        .map(|group| choose(group))
        .collect()
}

/// One method at one size: its runs at every rate and seed.
fn choose(group: &[&RunResult]) -> Result<RateChoice> {
    let (method, members) = (group[0].method, group[0].members);
    let seeds = unique(group.iter().map(|r| r.seed));
    let mut lrs = unique(group.iter().map(|r| r.settings.train.lr));
    lrs.sort_by(f32::total_cmp);
    let mut trials = Vec::new();
    for lr in lrs {
        let at: Vec<&RunResult> = group
            .iter()
            .copied()
            .filter(|r| r.settings.train.lr == lr)
            .collect();
        let at_seeds: Vec<u64> = at.iter().map(|r| r.seed).collect();
        if at_seeds != seeds {
            bail!(
                "{method} (M={members}) ran at lr {} at seeds {at_seeds:?}, not once at each of \
                 {seeds:?}: the rule compares rates seed by seed",
                rate(lr)
            );
        }
        let val_nll = at
            .iter()
            .map(|r| {
                r.val_nll.with_context(|| {
                    format!(
                        "{method} (M={members}) has no validation score to choose its learning \
                         rate by: it trained on the validation part (--train-on-val)"
                    )
                })
            })
            .collect::<Result<Vec<f64>>>()?;
        trials.push(RateTrial {
            lr,
            val_nll,
            picked: false,
        });
    }
    let pick = step_up(&trials);
    trials[pick].picked = true;
    Ok(RateChoice {
        method,
        members,
        seeds,
        trials,
    })
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
    fn the_table_holds_each_seeds_nll_and_their_mean_under_its_header() {
        let choice = |seeds: Vec<u64>, nlls: [&[f64]; 2]| RateChoice {
            method: Method::Lora,
            members: 4,
            seeds,
            trials: vec![
                RateTrial {
                    picked: true,
                    ..trial(1e-3, nlls[0])
                },
                trial(3e-3, nlls[1]),
            ],
        };
        let table = rate_table(&[choice(vec![1, 2], [&[0.5, 0.25], &[0.75, 0.5]])]);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            ["method", "M", "lr", "seed", "1", "seed", "2", "mean"]
        );
        assert_eq!(
            rows[1],
            ["lora", "4", "1e-3", "0.5000", "0.2500", "0.3750", "picked"]
        );
        assert_eq!(rows[2], ["lora", "4", "3e-3", "0.7500", "0.5000", "0.6250"]);
        // One seed: no mean.
        let table = rate_table(&[choice(vec![7], [&[0.5], &[0.75]])]);
        let last: Vec<&str> = table.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(last, ["lora", "4", "3e-3", "0.7500"]);
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
