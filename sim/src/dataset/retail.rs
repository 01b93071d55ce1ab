//! Generated weekly retail sales: many stores of skewed sizes, product groups with their own
//! levels and yearly seasons, promotions that lift demand, persistent local shocks and
//! intermittent demand. Deterministic per seed, and per store (each store has its own
//! generator), so it scales to thousands of stores for tests and benchmarks.
//!
//! For store `k`, group `g`, week `t`:
//! `λ = mean_units · size_k · level_g · exp(seasonality · sin(2πt/P + φ_g) + promo_lift · d_t + z_t)`
//! with `size_k` log-normal (σ = `size_skew`, mean 1), `z_t` an AR(1) shock (0.8, σ 0.2) and
//! `d_t` the discount of a running promotion. Units are Poisson(λ), set to zero with
//! probability `intermittency`. Every week's discount is recorded (the promotion calendar is
//! known), as a store's export would hold it. A share of the stores opened during the span
//! and has a shorter history: the stores that forecast worst on their own.

use fedretail_client::data::sales::StoreSales;
use fedretail_core::model::demand::YEAR_WEEKS;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal, Normal, Poisson};
use std::collections::BTreeMap;

/// Parameters of the generator.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RetailSpec {
    /// Stores.
    pub n_stores: usize,
    /// Product groups.
    pub n_groups: usize,
    /// Weeks of history.
    pub n_weeks: usize,
    /// Amplitude of the yearly season on the log scale.
    pub seasonality: f64,
    /// Probability that a promotion starts in a given week (per store and group).
    pub promo_rate: f64,
    /// Log-lift per unit of discount.
    pub promo_lift: f64,
    /// Probability that a week's demand is zero whatever its mean.
    pub intermittency: f64,
    /// σ of the log-normal store size (0: equal stores).
    pub size_skew: f64,
    /// Mean weekly units of a group in a store of size 1.
    pub mean_units: f64,
    /// Share of stores that opened during the data span (the others have all `n_weeks`).
    pub new_store_share: f64,
    /// Shortest history of a new store, in weeks; histories are uniform from this to
    /// `n_weeks`.
    pub min_history_weeks: usize,
}

impl Default for RetailSpec {
    fn default() -> RetailSpec {
        RetailSpec {
            n_stores: 1000,
            n_groups: 12,
            n_weeks: 156,
            seasonality: 0.4,
            promo_rate: 0.04,
            promo_lift: 2.0,
            intermittency: 0.15,
            size_skew: 1.0,
            mean_units: 3.0,
            new_store_share: 0.5,
            min_history_weeks: 40,
        }
    }
}

/// Week index of the first generated week (the week of Monday 2014-01-06).
pub const FIRST_WEEK: i64 = 2296;

/// The product groups' names.
pub fn group_names(spec: &RetailSpec) -> Vec<String> {
    (0..spec.n_groups).map(|g| format!("group-{g:02}")).collect()
}

/// Generates every store's weekly sales, named `store-0000` onwards.
pub fn generate(spec: &RetailSpec, seed: u64) -> Vec<(String, StoreSales)> {
    let mut shared = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let levels: Vec<(f64, f64)> = (0..spec.n_groups)
        .map(|_| {
            let level = shared.random_range(-0.7f64..0.7).exp();
            (level, shared.random_range(0.0..std::f64::consts::TAU))
        })
        .collect();
    let names = group_names(spec);
    let sigma = spec.size_skew.max(0.0);
    let size = LogNormal::new(-sigma * sigma / 2.0, sigma.max(1e-9)).expect("valid log-normal");
    let shock = Normal::new(0.0, 0.2).expect("valid normal");
    (0..spec.n_stores)
        .map(|k| {
            let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(
                seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            let store_size = if sigma == 0.0 { 1.0 } else { size.sample(&mut rng) };
            let min_history = spec.min_history_weeks.clamp(1, spec.n_weeks);
            let history = if rng.random_bool(spec.new_store_share.clamp(0.0, 1.0)) {
                rng.random_range(min_history..=spec.n_weeks)
            } else {
                spec.n_weeks
            };
            let first_week = FIRST_WEEK + (spec.n_weeks - history) as i64;
            let mut groups = BTreeMap::new();
            for (g, &(level, phase)) in levels.iter().enumerate() {
                let (mut units, mut discount) =
                    (Vec::with_capacity(history), Vec::with_capacity(history));
                let (mut z, mut promo_left, mut promo_depth) = (0.0f64, 0u32, 0.0f64);
                for t in 0..history {
                    if promo_left == 0 && rng.random_bool(spec.promo_rate.clamp(0.0, 1.0)) {
                        promo_left = rng.random_range(2..=4);
                        promo_depth = rng.random_range(0.1..0.4);
                    }
                    let d = if promo_left > 0 {
                        promo_left -= 1;
                        promo_depth
                    } else {
                        0.0
                    };
                    z = 0.8 * z + shock.sample(&mut rng);
                    let week = (first_week + t as i64) as f64;
                    let season = (std::f64::consts::TAU * week / YEAR_WEEKS + phase).sin();
                    let lambda = spec.mean_units
                        * store_size
                        * level
                        * (spec.seasonality * season + spec.promo_lift * d + z).exp();
                    let y = if rng.random_bool(spec.intermittency.clamp(0.0, 1.0)) || lambda <= 0.0
                    {
                        0.0
                    } else {
                        Poisson::new(lambda).map_or(0.0, |p| p.sample(&mut rng))
                    };
                    units.push(y as f32);
                    discount.push(d as f32);
                }
                groups.insert(names[g].clone(), (units, discount));
            }
            let sales =
                StoreSales { first_week, n_weeks: history, groups, promotions: Default::default() };
            (format!("store-{k:04}"), sales)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_seed_and_skewed() {
        let spec = RetailSpec { n_stores: 50, n_weeks: 60, ..RetailSpec::default() };
        let a = generate(&spec, 7);
        assert_eq!(a, generate(&spec, 7));
        assert_ne!(a, generate(&spec, 8));
        assert_eq!(a.len(), 50);
        let totals: Vec<f32> = a
            .iter()
            .map(|(_, s)| s.groups.values().map(|(u, _)| u.iter().sum::<f32>()).sum())
            .collect();
        let (min, max) =
            totals.iter().fold((f32::MAX, 0f32), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        assert!(max > 5.0 * min, "store sizes are skewed: {min} .. {max}");
        let zeros = a[0].1.groups.values().flat_map(|(u, _)| u).filter(|&&u| u == 0.0).count();
        assert!(zeros > 0, "demand is intermittent");
        assert!(a[0].1.groups.values().any(|(_, d)| d.iter().any(|&d| d > 0.0)), "promotions run");
        let short = a.iter().filter(|(_, s)| s.n_weeks < 60).count();
        assert!(short > 0 && short < 50, "some stores opened later: {short}");
        assert!(a.iter().all(|(_, s)| s.first_week + s.n_weeks as i64 == FIRST_WEEK + 60));
    }

    #[test]
    fn scales_to_a_thousand_stores() {
        let spec = RetailSpec { n_weeks: 104, ..RetailSpec::default() };
        let stores = generate(&spec, 1);
        assert_eq!(stores.len(), 1000);
        assert!(stores.iter().all(|(_, s)| s.groups.len() == spec.n_groups));
    }
}
