//! A store's data, ready for local training.

pub mod csv;
pub mod purchases;
pub mod sales;

use csv::CsvRating;
use fedretail_core::model::mf::{MfData, Rating, user_seed};
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;

/// A store's ratings with local user indices, and the user ids behind them.
#[derive(Debug, Clone, Default)]
pub struct StoreRatings {
    /// User ids in local-index order. They never leave the store.
    pub user_keys: Vec<String>,
    /// Training and held-out ratings.
    pub data: MfData,
}

impl StoreRatings {
    /// Indexes rows and holds out `holdout_fraction` of them at random (seeded) for evaluation.
    pub fn from_rows(rows: &[CsvRating], holdout_fraction: f64, seed: u64) -> StoreRatings {
        let mut index: BTreeMap<&str, u32> = BTreeMap::new();
        for r in rows {
            index.entry(r.user.as_str()).or_insert(0);
        }
        for (i, v) in index.values_mut().enumerate() {
            *v = i as u32;
        }
        let user_keys: Vec<String> = index.keys().map(|k| k.to_string()).collect();
        let mut data = MfData {
            user_seeds: user_keys.iter().map(|k| user_seed(k)).collect(),
            ..MfData::default()
        };
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
        for r in rows {
            let rating = Rating {
                user: index[r.user.as_str()],
                item: r.item,
                value: r.rating,
                timestamp: r.timestamp,
            };
            if rng.random_bool(holdout_fraction.clamp(0.0, 1.0)) {
                data.test.push(rating)
            } else {
                data.train.push(rating)
            }
        }
        StoreRatings { user_keys, data }
    }
}
