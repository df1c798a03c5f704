//! Learning curves as SVG: the training loss and the validation figures by epoch, to see where a
//! run overfits or its calibration drifts. One run's (DIR/training.svg), or a comparison's, every
//! run a line (DIR/curves.svg).

use loren_nn::Method;
use loren_nn::train::EpochInfo;

use crate::plot::{Chart, Series, palette, render};
use crate::run::RunResult;

/// One run's line in every panel.
pub struct Curve<'a> {
    pub name: String,
    pub color: String,
    pub dashed: bool,
    pub epochs: &'a [EpochInfo],
}

fn by_epoch(epochs: &[EpochInfo], y: impl Fn(&EpochInfo) -> Option<f64>) -> Vec<(f64, f64)> {
    epochs
        .iter()
        .filter_map(|e| Some((e.epoch as f64, y(e)?)))
        .collect()
}

/// Four panels: the training loss (each epoch's mean over its steps and the members), and the
/// validation part's NLL, accuracy and ECE of the ensemble's mean probabilities, where epochs
/// were scored.
pub fn learning_curves_svg(title: &str, curves: &[Curve]) -> String {
    let scored = curves
        .iter()
        .flat_map(|c| c.epochs)
        .any(|e| e.val.is_some());
    let subtitle = match scored {
        true => "validation: the ensemble's mean probabilities, on the epochs scored (--val-every)",
        false => "no epoch was scored on a validation part (--val-every, --train-on-val)",
    };
    render(title, subtitle, &learning_curves(curves), 2)
}

/// The four panels of [`learning_curves_svg`], every curve a line in each.
fn learning_curves(curves: &[Curve]) -> Vec<Chart> {
    type Figure = fn(&EpochInfo) -> Option<f64>;
    let panels: [(&str, &str, Figure); 4] = [
        ("training loss (epoch mean)", "cross-entropy", |e| {
            Some(e.mean_loss)
        }),
        ("validation NLL", "NLL", |e| e.val.map(|v| v.nll)),
        ("validation accuracy", "accuracy", |e| {
            e.val.map(|v| v.accuracy)
        }),
        ("validation ECE (15 bins)", "ECE", |e| e.val.map(|v| v.ece)),
    ];
    panels
        .iter()
        .map(|(name, y_label, y)| {
            let mut chart = Chart::new(*name, "epoch", *y_label);
            chart.series = curves
                .iter()
                .map(|c| Series {
                    name: c.name.clone(),
                    points: by_epoch(c.epochs, y),
                    color: c.color.clone(),
                    dashed: c.dashed,
                })
                .collect();
            chart
        })
        .collect()
}

/// A run's line, in the `i`th color of the palette.
pub fn curve(name: String, i: usize, dashed: bool, epochs: &[EpochInfo]) -> Curve<'_> {
    Curve {
        name,
        color: palette(i),
        dashed,
        epochs,
    }
}

/// A comparison's runs in one figure: a color per method and ensemble size, the seeds of one
/// alike and named once.
pub fn comparison_curves_svg(runs: &[RunResult]) -> String {
    let styles = group_styles(runs.iter().map(|r| (r.method, r.members)));
    let curves: Vec<Curve> = runs
        .iter()
        .zip(styles)
        .map(|(r, s)| curve(s.name, s.color, s.dashed, &r.train.epochs))
        .collect();
    let groups = curves.iter().filter(|c| !c.name.is_empty()).count();
    let seeds = runs.len() / groups.max(1);
    let title = match seeds {
        0 | 1 => "loren compare: training by epoch".to_string(),
        n => format!("loren compare: training by epoch, {n} seeds each"),
    };
    learning_curves_svg(&title, &curves)
}

/// How one run's line is drawn in a comparison.
struct Style {
    /// The group's name on its first run, empty on its other seeds (named once).
    name: String,
    color: usize,
    dashed: bool,
}

/// A color per method and ensemble size, in the order they first appear; past the palette's
/// eight colours the lines are dashed.
fn group_styles(groups: impl Iterator<Item = (Method, usize)>) -> Vec<Style> {
    let mut seen: Vec<(Method, usize)> = Vec::new();
    groups
        .map(|group| {
            let (color, first) = match seen.iter().position(|g| *g == group) {
                Some(i) => (i, false),
                None => {
                    seen.push(group);
                    (seen.len() - 1, true)
                }
            };
            Style {
                name: match first {
                    true => format!("{} M={}", group.0, group.1),
                    false => String::new(),
                },
                color,
                dashed: color >= 8,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use loren_nn::train::EpochVal;

    use super::*;

    fn epoch(epoch: usize, loss: f64, val: Option<f64>) -> EpochInfo {
        EpochInfo {
            epoch,
            mean_loss: loss,
            seconds: 1.0,
            val: val.map(|v| EpochVal {
                accuracy: 1.0 - v,
                nll: v,
                ece: v / 2.0,
                seconds: 0.1,
            }),
            skipped_steps: 0,
        }
    }

    #[test]
    fn a_comparison_colours_each_group_names_it_once_and_dashes_past_eight() {
        // Ten sizes of LoRA at two seeds each, the seeds interleaved.
        let runs = (0..2).flat_map(|_| (1..=10).map(|m| (Method::Lora, m)));
        let styles = group_styles(runs);
        assert_eq!(styles.len(), 20);
        for (i, s) in styles.iter().enumerate() {
            let (m, second_seed) = (i % 10, i >= 10);
            assert_eq!(s.color, m, "run {i}");
            assert_eq!(s.dashed, m >= 8, "run {i}");
            match second_seed {
                true => assert!(s.name.is_empty(), "run {i}: {}", s.name),
                false => assert_eq!(s.name, format!("lora M={}", m + 1)),
            }
        }
    }

    #[test]
    fn every_run_is_a_line_in_every_panel_and_unscored_runs_say_so() {
        let a = [
            epoch(1, 2.0, Some(0.5)),
            epoch(2, 1.0, None),
            epoch(3, 0.5, Some(0.25)),
        ];
        let b = [epoch(1, 3.0, Some(0.75))];
        let runs = [
            curve("lora M=8".into(), 0, false, &a),
            curve("explicit M=8".into(), 1, true, &b),
        ];
        let svg = learning_curves_svg("t", &runs);
        for panel in [
            "training loss (epoch mean)",
            "validation NLL",
            "validation accuracy",
            "validation ECE (15 bins)",
        ] {
            assert!(svg.contains(&format!(">{panel}<")), "{panel} missing");
        }
        assert_eq!(svg.matches(">explicit M=8<").count(), 4, "{svg}");
        assert!(svg.contains("on the epochs scored"));
        let none = learning_curves_svg("t", &[curve("x".into(), 0, false, &[epoch(1, 2.0, None)])]);
        assert!(none.contains("no epoch was scored"));
    }

    #[test]
    fn each_panel_plots_its_own_figure() {
        // Validation NLL 0.2, accuracy 0.8, ECE 0.1 at epoch 1; epoch 2 unscored.
        let a = [epoch(1, 2.0, Some(0.2)), epoch(2, 1.0, None)];
        let charts = learning_curves(&[curve("a".into(), 0, false, &a)]);
        let got: Vec<Vec<(f64, f64)>> = charts.iter().map(|c| c.series[0].points.clone()).collect();
        let want = [
            vec![(1.0, 2.0), (2.0, 1.0)],
            vec![(1.0, 0.2)],
            vec![(1.0, 0.8)],
            vec![(1.0, 0.1)],
        ];
        assert_eq!(got, want);
    }
}
