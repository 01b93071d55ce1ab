//! Models that stores train. A model splits its parameters in two: *global* ones, a flat
//! `f32` vector that is federated, and *local* ones that never leave the store (user factors
//! in the recommender).
//!
//! A [`Model`] value holds only hyper-parameters; parameters are passed in explicitly, so the
//! same value serves the coordinator (which holds the global vector), every client (which holds
//! its local state) and the simulator's central and local-only baselines.

pub mod demand;
pub(crate) mod linalg;
pub mod metrics;
pub mod mf;

use metrics::EvalSums;
use rand::Rng;

/// What one call of [`Model::train`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrainStats {
    /// Examples seen per epoch.
    pub n_examples: usize,
    /// Mean training loss over the last epoch.
    pub mean_loss: f64,
}

/// A federated model: global parameters shared by all stores, local ones kept in each store.
pub trait Model {
    /// A store's data: training examples and held-out examples.
    type Data;
    /// Parameters that never leave the store.
    type Local;

    /// Length of the global parameter vector.
    fn n_global(&self) -> usize;

    /// The initial global parameters.
    fn init_global(&self, rng: &mut dyn Rng) -> Vec<f32>;

    /// Local parameters for `data`, reusing those in `previous` where they exist.
    fn init_local(&self, data: &Self::Data, previous: Option<Self::Local>) -> Self::Local;

    /// Runs `epochs` epochs of local training, updating `global` (the store's copy) and `local`.
    fn train(
        &self,
        global: &mut [f32],
        local: &mut Self::Local,
        data: &Self::Data,
        epochs: u32,
        rng: &mut dyn Rng,
    ) -> TrainStats;

    /// Evaluates on the held-out part of `data`; `seed` fixes any sampling (ranking negatives).
    fn evaluate(
        &self,
        global: &[f32],
        local: &Self::Local,
        data: &Self::Data,
        seed: u64,
    ) -> EvalSums;
}
