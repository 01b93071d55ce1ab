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
    let mut sums = EvalSums::default();
    for store in stores {
        sums.merge(&train_alone(spec, store, epochs, seed));
    }
    sums
}
