//! The category-affinity recommender: the ranking objective's model with every item's factors
//! fixed to the one-hot vector of its product category ([`super::CategoryAffinity`]), so that
//! the only learned parameters are the item biases, each item's share of buyers times a
//! scale. A customer's factors are solved exactly in the store as for any ranking model
//! (`ranking.rs`): their affinity to each category, from their own purchases and the public
//! model.
//!
//! Under customer-level DP this needs one release: every sampled customer contributes the
//! indicator vector of the items they bought, clipped to the round's norm, and the
//! coordinator's step writes the noised mean, scaled, into the biases. The factors come from
//! the public catalogue and cost nothing. On Complete Journey this scores higher at ε = 1 than
//! the learned-factor model at ε = 8 (BENCHMARKS.md, "Ranking").

use super::ranking::user_items;
use super::{CustomerSum, MfData, MfLocal, MfModel};

impl MfModel {
    fn affinity(&self) -> &super::CategoryAffinity {
        self.spec.category_affinity.as_ref().expect("a category-affinity model")
    }

    /// Sets every item's factors to its category's one-hot vector.
    pub(super) fn set_category_factors(&self, global: &mut [f32]) {
        let (n_items, d) = (self.spec.n_items, self.spec.dim);
        let categories = &self.affinity().categories;
        for (i, &c) in categories.iter().enumerate() {
            let row = &mut global[1 + n_items + i * d..1 + n_items + (i + 1) * d];
            row.iter_mut()
                .enumerate()
                .for_each(|(k, v)| *v = if k == c as usize { 1.0 } else { 0.0 });
        }
    }

    /// Fits the model to `data` exactly: each item's bias is the scale times the share of
    /// `data`'s customers (those with interactions) who bought it, the factors the categories'.
    /// Returns the customers counted (FedAvg's weight: a weighted mean of the stores' shares
    /// is the pooled share).
    pub(super) fn fit_affinity(&self, global: &mut [f32], data: &MfData) -> usize {
        let items = user_items(data);
        let active = items.iter().filter(|l| !l.is_empty()).count();
        let mut buyers = vec![0u32; self.spec.n_items];
        for own in &items {
            own.iter().for_each(|&(i, _)| buyers[i as usize] += 1);
        }
        let scale = f64::from(self.affinity().bias_scale) / active.max(1) as f64;
        for (b, &n) in global[1..=self.spec.n_items].iter_mut().zip(&buyers) {
            *b = (scale * f64::from(n)) as f32;
        }
        self.set_category_factors(global);
        active
    }

    /// Length of a customer-level upload: μ's slot and one count per item for the
    /// category-affinity model; else the model and the ranking statistics
    /// ([`MfModel::statistics_len`]).
    pub fn customer_upload_len(&self) -> usize {
        match &self.spec.category_affinity {
            Some(_) => 1 + self.spec.n_items,
            None => self.spec.n_global() + self.statistics_len(),
        }
    }

    /// One customer-level round of the category-affinity model: each Poisson-sampled customer
    /// contributes the indicator of the items they bought (1 per distinct item), scaled to
    /// L2 norm at most `clip_norm`; the sum is laid out as [`MfModel::customer_upload_len`].
    pub(super) fn affinity_customer_round<R: rand::Rng + ?Sized>(
        &self,
        local: &mut MfLocal,
        data: &MfData,
        sampling_rate: f64,
        clip_norm: f32,
        rng: &mut R,
    ) -> CustomerSum {
        let items = user_items(data);
        let users: Vec<u32> = (0..data.n_users() as u32).collect();
        let sample = crate::privacy::sampling::poisson(&users, sampling_rate, rng);
        let mut sum = vec![0.0f64; self.customer_upload_len()];
        let mut n_unclipped = 0;
        for &u in &sample.members {
            let own = &items[u as usize];
            let norm = (own.len() as f64).sqrt();
            if norm <= f64::from(clip_norm) {
                n_unclipped += 1;
            }
            let value = if norm > 0.0 { (f64::from(clip_norm) / norm).min(1.0) } else { 0.0 };
            own.iter().for_each(|&(i, _)| sum[1 + i as usize] += value);
        }
        // Customers' factors are solved from the served model, not kept from a round.
        local.user_factors = ndarray::Array2::zeros((data.n_users(), self.spec.dim));
        CustomerSum::new(sum, sample.members.len(), n_unclipped, 0.0)
    }

    /// The coordinator's step for the category-affinity model: from `mean`, the (noised) sum
    /// of the customers' indicators divided by their expected count, each item's bias becomes
    /// the scale times its (noised) share of buyers, and the factors the categories'. Returns
    /// the change from `global`. A pure function of public values.
    pub(super) fn affinity_server_step(&self, global: &[f32], mean: &[f32]) -> Vec<f32> {
        assert_eq!(mean.len(), self.customer_upload_len(), "upload has the wrong length");
        let mut next = global.to_vec();
        let scale = self.affinity().bias_scale;
        for (b, &m) in next[1..=self.spec.n_items].iter_mut().zip(&mean[1..]) {
            *b = scale * m;
        }
        self.set_category_factors(&mut next);
        next.iter().zip(global).map(|(n, g)| n - g).collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::model::Model;
    use crate::model::mf::{CategoryAffinity, MfData, MfModel, Objective, Rating};
    use rand::SeedableRng;

    /// Four items in two categories, bias scale 2.
    fn model() -> MfModel {
        let mut spec = crate::model::mf::ranking::tests::spec(4, 2);
        spec.category_affinity =
            Some(CategoryAffinity { categories: vec![0, 1, 0, 1], bias_scale: 2.0 });
        MfModel::new(spec)
    }

    /// Customer 0 bought items 0 and 1 (twice), customer 1 item 2, customer 2 nothing.
    fn data() -> MfData {
        let r = |user, item| Rating { user, item, value: 1.0, timestamp: 0 };
        MfData {
            train: vec![r(0, 0), r(0, 1), r(0, 1), r(1, 2)],
            test: Vec::new(),
            user_seeds: vec![1, 2, 3],
        }
    }

    #[test]
    fn the_factors_are_the_categories_and_the_biases_the_buyer_shares() {
        let model = model();
        model.spec().validate().unwrap();
        let mut global = model.init_global(&mut rand::rngs::ChaCha8Rng::seed_from_u64(1));
        assert_eq!(&global[5..], &[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
        assert_eq!(model.fit_affinity(&mut global, &data()), 2, "two customers bought");
        // Shares 1/2, 1/2, 1/2, 0 (a repeat purchase counts once), times 2.
        assert_eq!(&global[1..5], &[1.0, 1.0, 1.0, 0.0]);
        assert_eq!(&global[5..], &[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn a_customer_round_sums_clipped_indicators_and_the_step_writes_the_shares() {
        let model = model();
        let mut local = model.init_local(&data(), None);
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(3);
        // Everyone sampled; clip 1: customer 0's two items at 1/√2 each, customer 1's one at 1.
        let sum = model.affinity_customer_round(&mut local, &data(), 1.0, 1.0, &mut rng);
        assert_eq!(sum.n_sampled(), 3);
        assert_eq!(sum.n_unclipped(), 2, "customers 1 and 2 were within the norm");
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let expected = [0.0, h, h, 1.0, 0.0];
        assert_eq!(sum.sum().len(), model.customer_upload_len());
        for (a, b) in sum.sum().iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{:?}", sum.sum());
        }
        // The coordinator divides by the expected count (3) and steps from any model to the
        // scaled shares, with the categories' factors.
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(4);
        let global = model.init_global(&mut rng);
        let mut drifted = global.clone();
        drifted[6] = 0.5;
        let mean: Vec<f32> = sum.sum().iter().map(|&v| (v / 3.0) as f32).collect();
        let delta = model.affinity_server_step(&drifted, &mean);
        let next: Vec<f32> = drifted.iter().zip(&delta).map(|(g, d)| g + d).collect();
        for (i, &e) in expected[1..].iter().enumerate() {
            assert!((next[1 + i] - 2.0 * e as f32 / 3.0).abs() < 1e-6, "{next:?}");
        }
        assert_eq!(&next[5..], &global[5..], "the factors are the categories' again");
    }

    #[test]
    fn factors_must_cover_the_categories() {
        let mut spec = model().spec().clone();
        spec.dim = 3;
        assert!(spec.validate().unwrap_err().message.contains("no item"));
        spec.dim = 2;
        spec.category_affinity.as_mut().unwrap().categories[0] = 2;
        assert!(spec.validate().unwrap_err().message.contains("not below dim"));
        spec.category_affinity.as_mut().unwrap().categories = vec![0, 1];
        assert!(spec.validate().unwrap_err().message.contains("categories for 4 items"));
        spec.category_affinity = model().spec().category_affinity.clone();
        spec.objective = Objective::Rating;
        assert!(spec.validate().unwrap_err().message.contains("ranking"));
    }
}
