//! Synthetic ratings from a low-rank model with noise: for tests and for scale runs that need
//! no download. Deterministic per seed.

use super::{RatingsDataset, RawRating};
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Shape of a generated dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticSpec {
    /// Users.
    pub n_users: u32,
    /// Items.
    pub n_items: u32,
    /// Ratings per user.
    pub per_user: u32,
    /// Regions (stores) users are spread over.
    pub n_regions: u32,
    /// Rank of the true preference model.
    pub rank: usize,
}

/// Generates ratings in 1..=5: `3 + b_i + u·v + noise`, rounded and clamped.
pub fn generate(spec: SyntheticSpec, seed: u64) -> RatingsDataset {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).expect("valid normal");
    let scale = 1.0 / (spec.rank as f32).sqrt();
    let users: Vec<Vec<f32>> = (0..spec.n_users)
        .map(|_| (0..spec.rank).map(|_| normal.sample(&mut rng) * scale).collect())
        .collect();
    let items: Vec<Vec<f32>> = (0..spec.n_items)
        .map(|_| (0..spec.rank).map(|_| normal.sample(&mut rng)).collect())
        .collect();
    let bias: Vec<f32> = (0..spec.n_items).map(|_| normal.sample(&mut rng) * 0.5).collect();
    let mut ratings = Vec::new();
    let mut user_region = std::collections::BTreeMap::new();
    for u in 0..spec.n_users {
        user_region.insert(u, format!("region-{:02}", u % spec.n_regions.max(1)));
        for k in 0..spec.per_user.min(spec.n_items) {
            let i = rng.random_range(0..spec.n_items);
            let dot: f32 =
                users[u as usize].iter().zip(&items[i as usize]).map(|(a, b)| a * b).sum();
            let value = (3.0 + bias[i as usize] + dot + 0.3 * normal.sample(&mut rng))
                .round()
                .clamp(1.0, 5.0);
            ratings.push(RawRating { user: u, item: i, value, timestamp: i64::from(k) });
        }
    }
    RatingsDataset {
        name: "synthetic".into(),
        ratings,
        n_items: spec.n_items as usize,
        user_region,
        item_catalogue: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_per_seed() {
        let spec = SyntheticSpec { n_users: 30, n_items: 40, per_user: 10, n_regions: 3, rank: 3 };
        let a = generate(spec, 1);
        assert_eq!(a.ratings, generate(spec, 1).ratings);
        assert_ne!(a.ratings, generate(spec, 2).ratings);
        assert_eq!(a.ratings.len(), 300);
        assert!(a.ratings.iter().all(|r| (1.0..=5.0).contains(&r.value) && r.item < 40));
    }
}
