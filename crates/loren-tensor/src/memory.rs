use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// What an allocation holds. Every tensor carries one, so memory can be broken down the way a
/// user reasons about an ensemble's cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemTag {
    /// Weights that are shared and never updated (the pretrained backbone under LoRA).
    FrozenWeights,
    /// Weights the optimizer updates.
    Trainable,
    /// Parameter gradients.
    Gradients,
    /// Optimizer moments and momentum buffers.
    OptimizerState,
    /// Forward activations, including what the tape keeps for backward.
    Activations,
    /// Temporaries: activation gradients during backward, scratch inside ops, inputs.
    Workspace,
}

impl MemTag {
    pub const ALL: [MemTag; 6] = [
        MemTag::FrozenWeights,
        MemTag::Trainable,
        MemTag::Gradients,
        MemTag::OptimizerState,
        MemTag::Activations,
        MemTag::Workspace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MemTag::FrozenWeights => "frozen_weights",
            MemTag::Trainable => "trainable",
            MemTag::Gradients => "gradients",
            MemTag::OptimizerState => "optimizer_state",
            MemTag::Activations => "activations",
            MemTag::Workspace => "workspace",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for MemTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Live and peak bytes per tag, and the peak of their sum, for one device.
///
/// The total peak is tracked on its own: it is the high-water mark of all tags together, which is
/// not the sum of the per-tag peaks (those can happen at different times).
#[derive(Default)]
pub struct MemoryTracker {
    live: [AtomicU64; 6],
    peak: [AtomicU64; 6],
    total_live: AtomicU64,
    total_peak: AtomicU64,
}

impl MemoryTracker {
    pub fn alloc(&self, tag: MemTag, bytes: u64) {
        let i = tag.index();
        let now = self.live[i].fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak[i].fetch_max(now, Ordering::Relaxed);
        let total = self.total_live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.total_peak.fetch_max(total, Ordering::Relaxed);
    }

    pub fn free(&self, tag: MemTag, bytes: u64) {
        self.live[tag.index()].fetch_sub(bytes, Ordering::Relaxed);
        self.total_live.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Start a new measurement window: every peak becomes the current live figure.
    pub fn reset_peaks(&self) {
        for i in 0..6 {
            self.peak[i].store(self.live[i].load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.total_peak
            .store(self.total_live.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn report(&self) -> MemoryReport {
        let mut r = MemoryReport::default();
        for i in 0..6 {
            r.live[i] = self.live[i].load(Ordering::Relaxed);
            r.peak[i] = self.peak[i].load(Ordering::Relaxed);
        }
        r.total_live = self.total_live.load(Ordering::Relaxed);
        r.total_peak = self.total_peak.load(Ordering::Relaxed);
        r
    }
}

/// A snapshot of a [`MemoryTracker`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    live: [u64; 6],
    peak: [u64; 6],
    pub total_live: u64,
    pub total_peak: u64,
}

impl MemoryReport {
    pub fn live(&self, tag: MemTag) -> u64 {
        self.live[tag.index()]
    }

    pub fn peak(&self, tag: MemTag) -> u64 {
        self.peak[tag.index()]
    }
}
