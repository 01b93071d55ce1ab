//! [`Contribution`]: the only shape in which a client's update may leave it. It is built from a
//! [`ClippedUpdate`] (one clipped update: no privacy, or the client unit) or a
//! [`CustomerSum`] (customer unit), and noised in place where the task's noise placement puts
//! the noise at the client.

use super::ClippedUpdate;
use crate::model::mf::CustomerSum;
use rand::{CryptoRng, Rng};

/// What a client uploads: clipped (per update or per customer), possibly noised, values of the
/// global parameters only.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    values: Vec<f32>,
    norm_before_clip: f64,
    unclipped: f64,
    private: bool,
    /// Customer sums: each customer's clipped contribution, sparse (see
    /// [`CustomerSum::parts`]).
    parts: Vec<Vec<(u32, f64)>>,
}

impl Contribution {
    /// One clipped update. `unclipped` is 1 when its norm was within the clipping norm.
    pub fn clipped(update: ClippedUpdate) -> Contribution {
        let norm = update.norm_before_clip();
        let unclipped = if norm <= f64::from(update.clip_norm()) { 1.0 } else { 0.0 };
        Contribution {
            values: update.into_values(),
            norm_before_clip: norm,
            unclipped,
            private: false,
            parts: Vec::new(),
        }
    }

    /// A store's sum of clipped per-customer contributions.
    pub fn customers(mut sum: CustomerSum) -> Contribution {
        let unclipped = sum.n_unclipped() as f64;
        let parts = sum.take_parts();
        Contribution {
            values: sum.into_sum().into_iter().map(|v| v as f32).collect(),
            norm_before_clip: 0.0,
            unclipped,
            private: false,
            parts,
        }
    }

    /// A customer sum's contributions one by one (sparse; empty for a single update or the
    /// ranking objective).
    pub fn parts(&self) -> &[Vec<(u32, f64)>] {
        &self.parts
    }

    /// Adds `N(0, std²)` to every value and `N(0, count_std²)` to the unclipped count, from a
    /// cryptographically secure generator, and marks the contribution private. Private tasks
    /// call this even with zero noise (central placement).
    pub fn add_noise<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        std: f64,
        count_std: f64,
        rng: &mut R,
    ) {
        if std > 0.0 {
            let mut wide: Vec<f64> = self.values.iter().map(|&v| f64::from(v)).collect();
            super::noise::add_gaussian(&mut wide, std, rng);
            self.values = wide.into_iter().map(|v| v as f32).collect();
        }
        let mut count = [self.unclipped];
        super::noise::add_gaussian(&mut count, count_std, rng);
        self.unclipped = count[0];
        self.private = true;
    }

    /// Sets the unclipped count to 0, for rounds that do not ask for it: the count is about the
    /// data and is sent only noised.
    pub fn forget_unclipped(&mut self) {
        self.unclipped = 0.0;
    }

    /// The values to send.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Takes the values out.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// L2 norm of the single update before clipping (0 for customer sums).
    pub fn norm_before_clip(&self) -> f64 {
        self.norm_before_clip
    }

    /// Contributions within the clipping norm (noised if [`Contribution::add_noise`] ran).
    pub fn unclipped(&self) -> f64 {
        self.unclipped
    }

    /// Whether this went through [`Contribution::add_noise`] (a private task's update, even
    /// when the noise is added at the coordinator): then only the values and the unclipped
    /// count may be sent, not the pre-clipping norm.
    pub fn is_private(&self) -> bool {
        self.private
    }
}
