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

use crate::report::{aligned_columns, rate, unique};
use crate::run::RunResult;

/// One rate tried for a method at one ensemble size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateTrial {
    pub lr: f32,
    /// The validation NLL at each seed, in the order of [`RateChoice::seeds`]; `null` where the
    /// run diverged (its loss stopped being a number), which any rate that did not beats.
    pub val_nll: Vec<Option<f64>>,
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

/// A run of a rate sweep whose loss stopped being a number: a rate too high is an outcome of
/// the sweep, not the end of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Diverged {
    pub method: Method,
    pub members: usize,
    pub seed: u64,
    pub lr: f32,
}

/// The runs, and those that diverged, grouped by method and size (in the order they first
/// appear, the finished runs' first), each group's rate picked by the rule. Refused when a run
/// has no validation score (it trained on that part), when a rate was not run at every seed,
/// or when the rate picked diverged (the lowest, none above it better at every seed).
pub fn choose_rates(runs: &[RunResult], diverged: &[Diverged]) -> Result<Vec<RateChoice>> {
    let tried = runs
        .iter()
        .map(|r| (r.method, r.members))
        .chain(diverged.iter().map(|d| (d.method, d.members)));
    unique(tried)
        .into_iter()
        .map(|(method, members)| {
            let runs: Vec<&RunResult> = runs
                .iter()
                .filter(|r| (r.method, r.members) == (method, members))
                .collect();
            let diverged: Vec<&Diverged> = diverged
                .iter()
                .filter(|d| (d.method, d.members) == (method, members))
                .collect();
            choose(method, members, &runs, &diverged)
        })
        .collect()
}

/// One method at one size: its runs at every rate and seed.
fn choose(
    method: Method,
    members: usize,
    runs: &[&RunResult],
    diverged: &[&Diverged],
) -> Result<RateChoice> {
    let tried = || {
        let ran = runs.iter().map(|r| (r.seed, r.settings.train.lr));
        ran.chain(diverged.iter().map(|d| (d.seed, d.lr)))
    };
    let seeds = unique(tried().map(|(seed, _)| seed));
    let mut lrs = unique(tried().map(|(_, lr)| lr));
    lrs.sort_by(f32::total_cmp);
    let mut trials = Vec::new();
    for lr in lrs {
        let val_nll = seeds
            .iter()
            .map(|&seed| {
                if let Some(r) = runs
                    .iter()
                    .find(|r| (r.seed, r.settings.train.lr) == (seed, lr))
                {
                    let nll = r.val_nll.with_context(|| {
                        format!(
                            "{method} (M={members}) has no validation score to choose its \
                             learning rate by: it trained on the validation part (--train-on-val)"
                        )
                    })?;
                    return Ok(Some(nll));
                }
                match diverged.iter().any(|d| (d.seed, d.lr) == (seed, lr)) {
                    true => Ok(None),
                    false => bail!(
                        "{method} (M={members}) did not run at lr {} at seed {seed}, and ran at \
                         seeds {seeds:?}: the rule compares rates seed by seed",
                        rate(lr)
                    ),
                }
            })
            .collect::<Result<Vec<Option<f64>>>>()?;
        trials.push(RateTrial {
            lr,
            val_nll,
            picked: false,
        });
    }
    let pick = step_up(&trials);
    if let Some(at) = trials[pick].val_nll.iter().position(Option::is_none) {
        bail!(
            "{method} (M={members}) diverged at its lowest rate, lr {} (seed {}), and no rate \
             above it did better at every seed: give --lrs lower rates",
            rate(trials[pick].lr),
            seeds[at]
        );
    }
    trials[pick].picked = true;
    Ok(RateChoice {
        method,
        members,
        seeds,
        trials,
    })
}

/// The rule over trials sorted by rate: the index it stops at. A diverged run is worse than
/// any that did not.
fn step_up(trials: &[RateTrial]) -> usize {
    let lower = |next: &Option<f64>, here: &Option<f64>| match (next, here) {
        (Some(n), Some(h)) => n < h,
        (Some(_), None) => true,
        (None, _) => false,
    };
    let mut pick = 0;
    while pick + 1 < trials.len() {
        let (here, next) = (&trials[pick].val_nll, &trials[pick + 1].val_nll);
        if next.iter().zip(here).all(|(n, h)| lower(n, h)) {
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
            let nll = |v: Option<f64>| v.map_or("diverged".to_string(), |v| format!("{v:.4}"));
            row.extend(t.val_nll.iter().map(|&v| nll(v)));
            if c.seeds.len() > 1 {
                let sum: Option<f64> = t.val_nll.iter().copied().sum();
                row.push(nll(sum.map(|s| s / t.val_nll.len() as f64)));
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
            // Infinity stands for a diverged run.
            val_nll: val_nll
                .iter()
                .map(|&v| v.is_finite().then_some(v))
                .collect(),
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
    fn a_diverged_run_loses_to_any_that_did_not() {
        let inf = f64::INFINITY;
        // Diverged at one seed of the next rate: no step.
        let trials = [trial(3e-4, &[0.5, 0.5]), trial(1e-3, &[0.1, inf])];
        assert_eq!(step_up(&trials), 0);
        // The lowest diverged: any finite next rate is a step, a diverged one is not.
        let trials = [
            trial(3e-4, &[inf, 0.5]),
            trial(1e-3, &[0.9, 0.4]),
            trial(3e-3, &[inf, inf]),
        ];
        assert_eq!(step_up(&trials), 1);
        assert_eq!(step_up(&[trial(1e-3, &[inf]), trial(3e-3, &[inf])]), 0);
        // The table says so, and the mean over a diverged seed is no number.
        let choice = RateChoice {
            method: Method::Lora,
            members: 2,
            seeds: vec![1, 2],
            trials: vec![trial(1e-3, &[0.5, inf])],
        };
        let row = rate_table(&[choice]).lines().last().unwrap().to_string();
        let row: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(row, ["lora", "2", "1e-3", "0.5000", "diverged", "diverged"]);
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
