//! Learning-rate schedules.

/// Linear warmup from 0 to `base_lr` over `warmup` steps, then cosine decay to `min_lr` at
/// `total` steps (and `min_lr` after).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    pub base_lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub total: u64,
    /// The warmup's first step at learning rate 0 (`step / warmup`, as PyTorch's `LambdaLR`
    /// gives it in the LoRA-Ensemble paper's code), where the default's first step is already
    /// at `base_lr / warmup` (`(step + 1) / warmup`) so that no step is spent moving nothing.
    /// Each warmup step of the one is the step before's of the other, so from zero the peak
    /// comes one step later, as the decay's first step; from step `warmup` on the two agree.
    pub from_zero: bool,
}

impl WarmupCosine {
    /// The learning rate for the 0-based step `step`.
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup {
            let done = if self.from_zero { step } else { step + 1 };
            return self.base_lr * done as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        (self.min_lr as f64 + (self.base_lr - self.min_lr) as f64 * cos) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        let s = WarmupCosine {
            base_lr: 1.0,
            min_lr: 0.1,
            warmup: 4,
            total: 14,
            from_zero: false,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(9) - 0.55).abs() < 1e-6, "midpoint {}", s.lr(9));
        // Off the midpoint, where a linear decay would agree: 0.1 + 0.9·(1 + cos(π·t))/2.
        assert!((s.lr(6) - 0.914_057_6).abs() < 1e-6, "t = 0.2: {}", s.lr(6));
        assert!(
            (s.lr(11) - 0.285_496_6).abs() < 1e-6,
            "t = 0.7: {}",
            s.lr(11)
        );
        assert!((s.lr(14) - 0.1).abs() < 1e-6);
        assert!((s.lr(100) - 0.1).abs() < 1e-6);
        let lrs: Vec<f32> = (4..=14).map(|i| s.lr(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "{lrs:?}");
    }

    #[test]
    fn from_zero_starts_one_step_behind_and_decays_the_same() {
        let ours = WarmupCosine {
            base_lr: 2.0,
            min_lr: 0.0,
            warmup: 4,
            total: 10,
            from_zero: false,
        };
        let paper = WarmupCosine {
            from_zero: true,
            ..ours
        };
        let warm: Vec<f32> = (0..5).map(|i| paper.lr(i)).collect();
        assert_eq!(warm, [0.0, 0.5, 1.0, 1.5, 2.0]);
        for i in 0..4 {
            assert_eq!(paper.lr(i + 1), ours.lr(i), "step {i}");
        }
        assert_eq!(
            paper.lr(3),
            1.5,
            "from zero, the warmup's last step is below the peak"
        );
        for i in 4..12 {
            assert_eq!(paper.lr(i), ours.lr(i), "step {i}");
        }
        // The paper's cosine: 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))).
        assert!((paper.lr(7) - 1.0).abs() < 1e-6, "{}", paper.lr(7));
        assert_eq!(paper.lr(10), 0.0);
    }
}
