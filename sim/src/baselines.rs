//! The references a federated run is judged against: central training on all data pooled (what
//! federation would reach if privacy did not matter) and each store training alone.

use crate::dataset::StoreData;
use fedretail_core::model::Model;
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::model::mf::{MfModel, MfSpec};
use rand::SeedableRng;

/// Trains one model on `store`'s data for `epochs` epochs from the seeded initial model, and
/// evaluates it on the store's held-out ratings.
pub fn train_alone(spec: &MfSpec, store: &StoreData, epochs: u32, seed: u64) -> EvalSums {
    let model = MfModel::new(spec.clone());
    let mut init_rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let mut global = model.init_global(&mut init_rng);
    let mut local = model.init_local(&store.data, None);
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    model.train(&mut global, &mut local, &store.data, epochs, &mut rng);
    model.evaluate(&global, &local, &store.data, seed)
}

/// Every store alone, with its own copy of the model; the stores' sums are merged.
pub fn local_only(spec: &MfSpec, stores: &[StoreData], epochs: u32, seed: u64) -> EvalSums {
    merge_all(&each(stores, |store| train_alone(spec, store, epochs, seed)))
}

/// `evaluate` in every store, in store order.
fn each(stores: &[StoreData], evaluate: impl Fn(&StoreData) -> EvalSums) -> Vec<EvalSums> {
    stores.iter().map(evaluate).collect()
}

/// The stores' sums merged.
pub fn merge_all(per_store: &[EvalSums]) -> EvalSums {
    let mut sums = EvalSums::default();
    per_store.iter().for_each(|e| sums.merge(e));
    sums
}

/// Ranking objective: pooled (or one store's) alternating least squares from the seeded
/// initial model, `iterations` times, evaluated on the store's held-out interactions.
pub fn als_alone(spec: &MfSpec, store: &StoreData, iterations: u32, seed: u64) -> EvalSums {
    let model = MfModel::new(spec.clone());
    let mut global = model.init_global(&mut rand::rngs::ChaCha8Rng::seed_from_u64(seed));
    model.als_fit(&mut global, &store.data, iterations);
    evaluate_in(&model, &global, store, seed)
}

/// Every store alone under ALS; per store, in store order.
pub fn als_local_only(
    spec: &MfSpec,
    stores: &[StoreData],
    iterations: u32,
    seed: u64,
) -> Vec<EvalSums> {
    each(stores, |store| als_alone(spec, store, iterations, seed))
}

/// A model that scores every item by how many users of `counted` interacted with it in
/// training: item biases only, factors 0 (users then solve to 0), so the shared evaluation
/// (negatives, ties) ranks by popularity.
fn popularity_model(spec: &MfSpec, counted: &StoreData) -> (MfModel, Vec<f32>) {
    let model = MfModel::new(spec.clone());
    let mut global = vec![0.0; model.n_global()];
    let mut seen = std::collections::HashSet::new();
    for r in &counted.data.train {
        if seen.insert((r.user, r.item)) {
            global[1 + r.item as usize] += 1.0;
        }
    }
    (model, global)
}

/// Most popular items across all stores (a count over every store's training interactions),
/// evaluated in every store; per store, in store order.
pub fn popularity(
    spec: &MfSpec,
    pooled: &StoreData,
    stores: &[StoreData],
    seed: u64,
) -> Vec<EvalSums> {
    let (model, global) = popularity_model(spec, pooled);
    each(stores, |store| evaluate_in(&model, &global, store, seed))
}

/// `global` evaluated on `store`'s held-out data (user parameters fresh: the ranking objective
/// solves them from the model).
fn evaluate_in(model: &MfModel, global: &[f32], store: &StoreData, seed: u64) -> EvalSums {
    let local = model.init_local(&store.data, None);
    model.evaluate(global, &local, &store.data, seed)
}

/// Each store's own most popular items; per store, in store order.
pub fn popularity_per_store(spec: &MfSpec, stores: &[StoreData], seed: u64) -> Vec<EvalSums> {
    each(stores, |store| {
        let (model, global) = popularity_model(spec, store);
        evaluate_in(&model, &global, store, seed)
    })
}
