//! The category-affinity recommender: the ranking objective's model with every item's factors
//! fixed by its groups in the public catalogue ([`super::CategoryAffinity`]: its product
//! category, or several levels such as category, category and type, category and brand), so
//! that the only learned parameters are the item biases, each item's share of buyers times a
//! scale. A customer's factors are solved exactly in the store as for any ranking model
//! (`ranking.rs`), here by conjugate gradients over the sparse factors: their affinity to each
//! group, from their own purchases and the public model.
//!
//! Under customer-level DP this needs one release: every sampled customer contributes the
//! indicator vector of the items they bought, clipped to the round's norm, and the
//! coordinator's step writes the noised mean, scaled, into the biases. The factors come from
//! the public catalogue and cost nothing. On Complete Journey this keeps 64 % of the federated
//! gain over popularity at ε = 8 (BENCHMARKS.md, "Ranking").

use super::ranking::user_items;
use super::{CustomerSum, MfData, MfLocal, MfModel};
use ndarray::Array2;

impl MfModel {
    fn affinity(&self) -> &super::CategoryAffinity {
        self.spec.category_affinity.as_ref().expect("a category-affinity model")
    }

    /// Sets every item's factors from its catalogue groups: `1/√levels` in each group's column,
    /// 0 elsewhere (one level: its category's one-hot vector).
    pub(super) fn set_category_factors(&self, global: &mut [f32]) {
        let (n_items, d) = (self.spec.n_items, self.spec.dim);
        let affinity = self.affinity();
        let levels = affinity.levels as usize;
        let weight = 1.0 / (levels as f32).sqrt();
        for (i, groups) in affinity.categories.chunks(levels).enumerate() {
            let row = &mut global[1 + n_items + i * d..1 + n_items + (i + 1) * d];
            row.fill(0.0);
            groups.iter().for_each(|&c| row[c as usize] += weight);
        }
    }

    /// Every user's factors solved against the item side of `global`, as
    /// [`MfModel::solve_users`] does, for item factors that are mostly zero (the catalogue's:
    /// a few groups per item among hundreds of columns). The normal equations
    /// `(YᵀY + λI + Σ_own (c − 1) y yᵀ) x = Σ_own (c (1 − b) + b) y − Yᵀb` are solved by conjugate
    /// gradients with a diagonal preconditioner, each product with `YᵀY` through the sparse rows
    /// of `Y`: `O(nonzeros)` per iteration where a dense solve costs `O(dim³)` per user.
    pub(super) fn solve_sparse_items(
        &self,
        global: &[f32],
        by_user: &[Vec<(u32, f32)>],
        alpha: f32,
    ) -> Array2<f32> {
        let (n_items, d) = (self.spec.n_items, self.spec.dim);
        let bias = &global[1..=n_items];
        // The nonzero entries of each item's factors, read from the model itself.
        let rows: Vec<Vec<(usize, f64)>> = self
            .item_factors(global)
            .rows()
            .into_iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .filter(|&(_, &v)| v != 0.0)
                    .map(|(k, &v)| (k, f64::from(v)))
                    .collect()
            })
            .collect();
        let lambda = f64::from(self.spec.regularization);
        // Yᵀb and the diagonal of YᵀY + λI, shared by every user.
        let (mut ytb, mut diag) = (vec![0.0f64; d], vec![lambda; d]);
        for (row, &b) in rows.iter().zip(bias) {
            for &(k, v) in row {
                ytb[k] += v * f64::from(b);
                diag[k] += v * v;
            }
        }
        let mut x = Array2::<f32>::zeros((by_user.len(), d));
        let mut yv = vec![0.0f64; n_items];
        for (u, items) in by_user.iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let own: Vec<(usize, f64)> = items
                .iter()
                .map(|&(i, value)| (i as usize, f64::from(alpha) * f64::from(value)))
                .collect();
            let mut rhs: Vec<f64> = ytb.iter().map(|v| -v).collect();
            let mut precondition = diag.clone();
            for &(i, extra) in &own {
                let b = f64::from(bias[i]);
                let t = (1.0 + extra) * (1.0 - b) + b;
                for &(k, v) in &rows[i] {
                    rhs[k] += t * v;
                    precondition[k] += extra * v * v;
                }
            }
            // out = (YᵀY + λI + Σ_own (c − 1) y yᵀ) v, with Y v in `yv`.
            let apply = |v: &[f64], out: &mut [f64]| {
                for (o, &vk) in out.iter_mut().zip(v) {
                    *o = lambda * vk;
                }
                for (row, y) in rows.iter().zip(yv.iter_mut()) {
                    *y = row.iter().map(|&(k, w)| w * v[k]).sum();
                }
                for (row, &y) in rows.iter().zip(yv.iter()) {
                    row.iter().for_each(|&(k, w)| out[k] += w * y);
                }
                for &(i, extra) in &own {
                    rows[i].iter().for_each(|&(k, w)| out[k] += extra * w * yv[i]);
                }
            };
            let solution = conjugate_gradient(&rhs, &precondition, apply);
            for (k, v) in solution.into_iter().enumerate() {
                x[[u, k]] = v as f32;
            }
        }
        x
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

/// Solves `A x = rhs` for a symmetric positive definite `A` given as `apply(v, out)`
/// (`out = A v`), preconditioned by `A`'s diagonal: at most `rhs.len()` iterations (exact in
/// exact arithmetic), stopping once the residual's norm is below `10⁻⁹` of the right-hand
/// side's.
fn conjugate_gradient(
    rhs: &[f64],
    diagonal: &[f64],
    mut apply: impl FnMut(&[f64], &mut [f64]),
) -> Vec<f64> {
    let n = rhs.len();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let tolerance = 1e-18 * dot(rhs, rhs);
    let mut x = vec![0.0; n];
    let mut r = rhs.to_vec();
    let mut z: Vec<f64> = r.iter().zip(diagonal).map(|(r, d)| r / d).collect();
    let mut p = z.clone();
    let mut ap = vec![0.0; n];
    let mut rz = dot(&r, &z);
    for _ in 0..n {
        if dot(&r, &r) <= tolerance {
            break;
        }
        apply(&p, &mut ap);
        let step = rz / dot(&p, &ap);
        for k in 0..n {
            x[k] += step * p[k];
            r[k] -= step * ap[k];
        }
        z.iter_mut().zip(&r).zip(diagonal).for_each(|((z, r), d)| *z = r / d);
        let next = dot(&r, &z);
        let beta = next / rz;
        rz = next;
        p.iter_mut().zip(&z).for_each(|(p, z)| *p = z + beta * *p);
    }
    x
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
            Some(CategoryAffinity { categories: vec![0, 1, 0, 1], levels: 1, bias_scale: 2.0 });
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

    /// Two catalogue levels: categories 0 and 1, and below them groups 2, 3 and 4 (item 0 and
    /// item 1 share group 2).
    fn two_level_model() -> MfModel {
        let mut spec = crate::model::mf::ranking::tests::spec(4, 5);
        let categories = vec![0, 2, 1, 2, 0, 3, 1, 4];
        spec.category_affinity = Some(CategoryAffinity { categories, levels: 2, bias_scale: 2.0 });
        MfModel::new(spec)
    }

    #[test]
    fn every_level_of_the_catalogue_sets_a_factor() {
        let model = two_level_model();
        model.spec().validate().unwrap();
        let global = model.init_global(&mut rand::rngs::ChaCha8Rng::seed_from_u64(1));
        let h = std::f32::consts::FRAC_1_SQRT_2;
        #[rustfmt::skip]
        let expected = [
            h, 0.0, h, 0.0, 0.0,
            0.0, h, h, 0.0, 0.0,
            h, 0.0, 0.0, h, 0.0,
            0.0, h, 0.0, 0.0, h,
        ];
        assert_eq!(&global[5..], &expected);
    }

    #[test]
    fn the_sparse_solve_matches_the_dense_one() {
        // The same item side solved densely (no catalogue: the generic Cholesky path) and
        // through the catalogue's sparse rows, for customers with repeat purchases.
        let model = two_level_model();
        let mut global = model.init_global(&mut rand::rngs::ChaCha8Rng::seed_from_u64(1));
        global[1..5].copy_from_slice(&[0.4, 0.1, 0.3, 0.05]);
        let mut dense_spec = model.spec().clone();
        dense_spec.category_affinity = None;
        let dense = MfModel::new(dense_spec).solve_users(&global, &data());
        let sparse = model.solve_users(&global, &data());
        assert!(dense.iter().any(|&v| v.abs() > 0.05), "{dense:?}");
        for (a, b) in sparse.iter().zip(&dense) {
            assert!((a - b).abs() < 1e-5, "{sparse:?} against {dense:?}");
        }
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
        assert!(spec.validate().unwrap_err().message.contains("categories for 4 items at 1"));
        spec.category_affinity.as_mut().unwrap().levels = 0;
        assert!(spec.validate().unwrap_err().message.contains("1 to 8 catalogue levels"));
        spec.category_affinity = model().spec().category_affinity.clone();
        spec.objective = Objective::Rating;
        assert!(spec.validate().unwrap_err().message.contains("ranking"));
    }
}
