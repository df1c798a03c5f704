//! A run's learning curves as SVG (DIR/training.svg): the training loss and the validation
//! figures by epoch, to see where a run overfits or its calibration drifts.

use loren_nn::train::EpochInfo;

use crate::plot::{Chart, Series, palette, render};

fn by_epoch(epochs: &[EpochInfo], y: impl Fn(&EpochInfo) -> Option<f64>) -> Vec<(f64, f64)> {
    epochs
        .iter()
        .filter_map(|e| Some((e.epoch as f64, y(e)?)))
        .collect()
}

fn series(name: &str, color: usize, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.to_string(),
        points,
        color: palette(color),
        dashed: false,
    }
}

/// The loss panel, and where epochs were scored on the validation part, its accuracy and ECE.
pub fn learning_curves_svg(title: &str, epochs: &[EpochInfo]) -> String {
    let mut loss = Chart::new("loss", "epoch", "cross-entropy");
    loss.series.push(series(
        "training (the epoch's mean)",
        0,
        by_epoch(epochs, |e| Some(e.mean_loss)),
    ));
    let val_nll = by_epoch(epochs, |e| e.val.map(|v| v.nll));
    let mut charts = vec![loss];
    let subtitle = if val_nll.is_empty() {
        "no epoch was scored on a validation part (--val-every, --train-on-val)"
    } else {
        charts[0]
            .series
            .push(series("validation NLL (the ensemble's)", 1, val_nll));
        let mut accuracy = Chart::new("validation accuracy", "epoch", "accuracy");
        accuracy.series.push(series(
            "ensemble",
            1,
            by_epoch(epochs, |e| e.val.map(|v| v.accuracy)),
        ));
        let mut ece = Chart::new("validation ECE (15 bins)", "epoch", "ECE");
        ece.series.push(series(
            "ensemble",
            1,
            by_epoch(epochs, |e| e.val.map(|v| v.ece)),
        ));
        charts.extend([accuracy, ece]);
        "validation: the mean of the members' probabilities"
    };
    render(title, subtitle, &charts, 3)
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
        }
    }

    #[test]
    fn scored_epochs_get_their_panels_and_unscored_ones_say_so() {
        let scored = [
            epoch(1, 2.0, Some(0.5)),
            epoch(2, 1.0, None),
            epoch(3, 0.5, Some(0.25)),
        ];
        let svg = learning_curves_svg("t", &scored);
        for panel in ["loss", "validation accuracy", "validation ECE (15 bins)"] {
            assert!(svg.contains(&format!(">{panel}<")), "{panel} missing");
        }
        assert!(svg.contains("validation NLL"));
        let none = learning_curves_svg("t", &[epoch(1, 2.0, None)]);
        assert!(!none.contains("validation accuracy"));
        assert!(none.contains("no epoch was scored"));
    }
}
