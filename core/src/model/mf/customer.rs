//! Customer-level contributions for the recommender (privacy unit `customer`).
//!
//! Each round a store Poisson-samples its customers with rate q ([`crate::privacy::sampling`]).
//! Every sampled customer trains alone, from the round's global model and their own user
//! parameters, on their own ratings; the change of the *global* parameters is that customer's
//! contribution, clipped to L2 norm C; the store sends only the sum of the clipped
//! contributions. One customer therefore changes the round's sum by at most C, whatever the
//! store does with the others: the sensitivity the Gaussian mechanism and the accountant
//! assume.
//!
//! μ is not part of a contribution and stays at the task's `init_mean`: every customer's
//! training would push it the same way, spending much of each clipping budget on one
//! coordinate, while the customer's own bias (local) absorbs their offset for free.
//!
//! A contribution touches the rows of the items that customer rated, so it is computed
//! on a small copy of those rows: the cost is that of one pass over the customer's ratings,
//! not of the model's size.
//!
//! Customers who are not sampled still refresh their own user parameters against the round's
//! global model (item side frozen). That uses only their own data and the public model, and
//! those parameters never leave the store, so it costs no privacy; it keeps the personal half
//! of the model current for every customer.

use super::{MfData, MfLocal, MfModel, sgd_step};
use crate::privacy::sampling::poisson;
use ndarray::{Array1, Array2, Axis};
use rand::Rng;
use rand::seq::SliceRandom;

/// What a store sends for one customer-level round, before any noise.
#[derive(Debug, Clone, PartialEq)]
///
/// Only [`MfModel::customer_round`] builds one, so every value holds a sum of contributions each
/// clipped to the round's norm.
pub struct CustomerSum {
    sum: Vec<f64>,
    n_sampled: usize,
    n_unclipped: usize,
    mean_loss: f64,
    /// Each sampled customer's clipped contribution on its own, sparse (coordinate, value):
    /// what the distributed discrete Gaussian rounds one by one. Empty for the ranking
    /// objective, whose contributions also carry statistics.
    parts: Vec<Vec<(u32, f64)>>,
}

impl CustomerSum {
    /// Assembled by the model's own customer rounds only (each term clipped).
    pub(super) fn new(
        sum: Vec<f64>,
        n_sampled: usize,
        n_unclipped: usize,
        mean_loss: f64,
    ) -> CustomerSum {
        CustomerSum { sum, n_sampled, n_unclipped, mean_loss, parts: Vec::new() }
    }

    /// Each sampled customer's clipped contribution, sparse (empty for the ranking objective).
    pub fn parts(&self) -> &[Vec<(u32, f64)>] {
        &self.parts
    }

    /// Takes the contributions out.
    pub fn take_parts(&mut self) -> Vec<Vec<(u32, f64)>> {
        std::mem::take(&mut self.parts)
    }

    /// Σ over sampled customers of their clipped contribution (length [`crate::plan::TaskSpec::upload_len`]:
    /// `n_global`, then the ranking objective's statistics).
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }

    /// Takes the sum out.
    pub fn into_sum(self) -> Vec<f64> {
        self.sum
    }

    /// Customers sampled this round. It depends on the data: it stays in the store.
    pub fn n_sampled(&self) -> usize {
        self.n_sampled
    }

    /// Sampled customers whose contribution's norm was at most the clipping norm before
    /// clipping: the bits adaptive clipping counts (Andrew et al. 2021).
    pub fn n_unclipped(&self) -> usize {
        self.n_unclipped
    }

    /// Mean training loss over the sampled customers' ratings in their last local epoch (stays
    /// in the store).
    pub fn mean_loss(&self) -> f64 {
        self.mean_loss
    }
}

/// Ratings indices of each local user, built once per store.
#[derive(Debug, Clone, PartialEq)]
pub struct RatingsByUser {
    by_user: Vec<Vec<u32>>,
}

impl RatingsByUser {
    /// Groups `data.train` by user.
    pub fn new(data: &MfData) -> RatingsByUser {
        let mut by_user = vec![Vec::new(); data.n_users()];
        for (k, r) in data.train.iter().enumerate() {
            by_user[r.user as usize].push(k as u32);
        }
        RatingsByUser { by_user }
    }
}

impl MfModel {
    /// One customer-level round in a store: samples customers with probability
    /// `sampling_rate`, trains each for `epochs` local epochs from `global`, and sums their
    /// global-parameter changes clipped to `clip_norm` (module docs). User parameters in
    /// `local` are updated for every customer and never appear in the result.
    ///
    /// # Panics
    ///
    /// If `global` has the wrong length, `clip_norm` is not positive, or `sampling_rate` is
    /// outside [0, 1].
    #[allow(clippy::too_many_arguments)] // reason: one round's inputs, each used once
    pub fn customer_round<R: Rng + ?Sized>(
        &self,
        global: &[f32],
        local: &mut MfLocal,
        data: &MfData,
        by_user: &RatingsByUser,
        sampling_rate: f64,
        epochs: u32,
        clip_norm: f32,
        rng: &mut R,
    ) -> CustomerSum {
        assert_eq!(global.len(), self.spec.n_global(), "global vector has the wrong length");
        assert!(clip_norm.is_finite() && clip_norm > 0.0, "clip_norm must be positive");
        if self.spec.category_affinity.is_some() {
            return self.affinity_customer_round(local, data, sampling_rate, clip_norm, rng);
        }
        if self.spec.objective.is_ranking() {
            return self.ranking_customer_round(global, local, data, sampling_rate, clip_norm, rng);
        }
        let (n_items, dim) = (self.spec.n_items, self.spec.dim);
        let (lr, reg) = (self.spec.learning_rate, self.spec.regularization);
        let users: Vec<u32> = (0..data.n_users() as u32).collect();
        let sample = poisson(&users, sampling_rate, rng);
        let mut sampled = vec![false; data.n_users()];
        for &u in &sample.members {
            sampled[u as usize] = true;
        }
        let mut out = CustomerSum {
            sum: vec![0.0; global.len()],
            n_sampled: sample.members.len(),
            n_unclipped: 0,
            mean_loss: 0.0,
            parts: Vec::new(),
        };
        let factors = self.item_factors(global);
        let (mut loss, mut n_loss) = (0.0, 0usize);
        // Per customer: their items' rows, copied; slot k holds the k-th distinct item.
        let mut items: Vec<u32> = Vec::new();
        let mut order: Vec<u32> = Vec::new();
        for (u, ratings) in by_user.by_user.iter().enumerate() {
            if ratings.is_empty() {
                continue;
            }
            items.clear();
            items.extend(ratings.iter().map(|&k| data.train[k as usize].item));
            items.sort_unstable();
            items.dedup();
            let mut bias: Array1<f32> = items.iter().map(|&i| global[1 + i as usize]).collect();
            let mut rows = Array2::<f32>::zeros((items.len(), dim));
            for (mut row, &i) in rows.axis_iter_mut(Axis(0)).zip(&items) {
                row.assign(&factors.row(i as usize));
            }
            let is_sampled = sampled[u];
            order.clear();
            order.extend_from_slice(ratings);
            for epoch in 0..epochs {
                order.shuffle(rng);
                let last = epoch + 1 == epochs;
                for &k in &order {
                    let r = data.train[k as usize];
                    let slot = items.binary_search(&r.item).expect("the customer's own item");
                    if is_sampled {
                        // μ is held fixed: a step on a scratch copy.
                        let mut mu = global[0];
                        let l = sgd_step(
                            &mut mu,
                            &mut local.user_bias[u],
                            &mut bias[slot],
                            local.user_factors.row_mut(u),
                            rows.row_mut(slot),
                            r.value,
                            lr,
                            reg,
                        );
                        if last {
                            loss += l;
                            n_loss += 1;
                        }
                    } else {
                        // Not sampled: only the customer's own parameters move.
                        let q = rows.row(slot);
                        let mut p = local.user_factors.row_mut(u);
                        let bu = &mut local.user_bias[u];
                        let e = r.value - (global[0] + *bu + bias[slot] + p.dot(&q));
                        *bu += lr * (e - reg * *bu);
                        p.zip_mut_with(&q, |pk, &qk| *pk += lr * (e * qk - reg * *pk));
                    }
                }
            }
            if !is_sampled {
                continue;
            }
            // The contribution: change of the items' biases and of their factor rows, measured
            // against the global model the copies started from.
            let d_bias = bias - &Array1::from_iter(items.iter().map(|&i| global[1 + i as usize]));
            let mut d_rows = rows;
            for (mut row, &i) in d_rows.axis_iter_mut(Axis(0)).zip(&items) {
                row -= &factors.row(i as usize);
            }
            let sq = |a: f32| f64::from(a) * f64::from(a);
            let norm = (d_bias.iter().map(|&v| sq(v)).sum::<f64>()
                + d_rows.iter().map(|&v| sq(v)).sum::<f64>())
            .sqrt();
            if !norm.is_finite() {
                // A diverged model: this customer contributes nothing rather than NaN.
                continue;
            }
            let scale = if norm > 0.0 { (f64::from(clip_norm) / norm).min(1.0) } else { 0.0 };
            if norm <= f64::from(clip_norm) {
                out.n_unclipped += 1;
            }
            let mut part = Vec::with_capacity(items.len() * (1 + dim));
            for (slot, &i) in items.iter().enumerate() {
                let i = i as usize;
                let b = scale * f64::from(d_bias[slot]);
                out.sum[1 + i] += b;
                part.push(((1 + i) as u32, b));
                let row = 1 + n_items + i * dim;
                for (k, (s, &d)) in
                    out.sum[row..row + dim].iter_mut().zip(d_rows.row(slot)).enumerate()
                {
                    *s += scale * f64::from(d);
                    part.push(((row + k) as u32, scale * f64::from(d)));
                }
            }
            out.parts.push(part);
        }
        out.mean_loss = if n_loss == 0 { 0.0 } else { loss / n_loss as f64 };
        out
    }
}
