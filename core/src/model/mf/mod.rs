//! Matrix-factorisation recommender for explicit ratings (Koren, Bell and Volinsky 2009,
//! "biased MF"), federated as in federated collaborative filtering (Ammad-ud-din et al. 2019):
//! the global mean, item biases and item factors are global; user biases and user factors are
//! local and never leave the store.
//!
//! Prediction: `r̂(u, i) = μ + b_u + b_i + p_u · q_i`.
//! Per-rating loss: `½ e² + ½ λ (b_u² + b_i² + |p_u|² + |q_i|²)` with `e = r - r̂`,
//! minimised by stochastic gradient descent in random order.
//!
//! Global layout: `[μ, b_0 .. b_{n_items-1}, q_0 (dim values), .., q_{n_items-1}]`.

mod affinity;
mod customer;
mod ranking;

pub use customer::{CustomerSum, RatingsByUser};

use super::metrics::EvalSums;
use super::{Model, TrainStats};
use crate::plan::SpecError;
use ndarray::{Array2, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};
use rand::seq::SliceRandom;
use rand::{Rng, RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Negatives sampled per user for HR@10 and NDCG@10 (He et al. 2017, the NCF protocol).
pub const N_NEGATIVES: usize = 99;

/// Hyper-parameters of the recommender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MfSpec {
    /// Item ids are `0..n_items`.
    pub n_items: usize,
    /// Latent dimension.
    pub dim: usize,
    /// SGD step size.
    pub learning_rate: f32,
    /// L2 regularisation λ.
    pub regularization: f32,
    /// Standard deviation of the initial factors.
    pub init_std: f32,
    /// Lowest rating; predictions are clamped to it when scored.
    #[serde(default = "one")]
    pub rating_min: f32,
    /// Highest rating.
    #[serde(default = "five")]
    pub rating_max: f32,
    /// Initial global mean μ (a prior, not computed from data). Customer-level rounds keep μ at
    /// this value: each customer's own bias absorbs their offset (see `customer.rs`).
    #[serde(default)]
    pub init_mean: f32,
    /// Store-local item offsets: when set to λ, every store corrects its predictions with
    /// `o_i = Σ residual / (n_i + λ)` over its own training ratings of item `i` (residuals of
    /// the global-plus-personal model). The offsets are fitted where predictions are made and
    /// never leave the store, and no update depends on them, so they cost no privacy.
    #[serde(default)]
    pub local_item_offsets: Option<f32>,
    /// What the model is trained for: rating prediction (explicit ratings, the default) or
    /// ranking (implicit feedback, `mf/ranking.rs`).
    #[serde(default)]
    pub objective: Objective,
    /// The category-affinity recommender (ranking objective only; `mf/affinity.rs`): every
    /// item's factors are fixed by its groups in the catalogue (its product category, or several
    /// levels of groups), its bias is learned as its share of buyers, and each customer folds in
    /// exactly. `None`: learned factors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_affinity: Option<CategoryAffinity>,
}

/// Fixed item factors from the catalogue's groups ([`MfSpec::category_affinity`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryAffinity {
    /// Each item's group at every level of the catalogue, `levels` entries per item: item `i`'s
    /// are `categories[i · levels .. (i + 1) · levels]`, each in `0..dim`, every column used by
    /// some item. Item `i`'s factors are `1/√levels` in each of its groups' columns (with one
    /// level, the one-hot vector of its category). Public catalogue structure, never customer
    /// data.
    pub categories: Vec<u32>,
    /// Catalogue levels per item (for example category; category and product type; category
    /// and brand), at least 1.
    #[serde(default = "one_level")]
    pub levels: u32,
    /// An item's bias is this times the share of customers who bought it.
    pub bias_scale: f32,
}

fn one_level() -> u32 {
    1
}

/// The recommender's training objective.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Objective {
    /// Explicit ratings: squared error of `μ + b_u + b_i + p_u·q_i` (module docs).
    #[default]
    Rating,
    /// Implicit feedback trained for ranking: weighted matrix factorisation (`mf/ranking.rs`).
    Ranking {
        /// Confidence per unit of an interaction's value: `c = 1 + alpha · value`.
        alpha: f32,
        /// λ_Y: L2 regularisation of the item side, per user (the objective is a mean over
        /// users).
        item_regularization: f32,
    },
}

impl Objective {
    /// Whether the model is trained for ranking.
    pub fn is_ranking(&self) -> bool {
        matches!(self, Objective::Ranking { .. })
    }
}

fn one() -> f32 {
    1.0
}
fn five() -> f32 {
    5.0
}

impl MfSpec {
    /// Length of the global vector: `1 + n_items * (1 + dim)`.
    pub fn n_global(&self) -> usize {
        1 + self.n_items * (1 + self.dim)
    }

    /// Checks ranges.
    ///
    /// # Errors
    ///
    /// [`SpecError`] naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field, message: String| Err(SpecError { field, message });
        if self.n_items == 0 || self.n_items > 100_000_000 {
            return err("model.n_items", format!("must be in 1..=1e8, got {}", self.n_items));
        }
        if self.dim == 0 || self.dim > 1024 {
            return err("model.dim", format!("must be in 1..=1024, got {}", self.dim));
        }
        if self.n_global() > 1 << 30 {
            return err(
                "model.dim",
                format!("n_items * (1 + dim) = {} exceeds 2^30", self.n_global()),
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return err(
                "model.learning_rate",
                format!("must be in (0, 1), got {}", self.learning_rate),
            );
        }
        if !(self.regularization >= 0.0 && self.regularization.is_finite()) {
            return err(
                "model.regularization",
                format!("must be >= 0, got {}", self.regularization),
            );
        }
        if let Some(lambda) = self.local_item_offsets
            && !(lambda > 0.0 && lambda.is_finite())
        {
            return err("model.local_item_offsets", format!("must be positive, got {lambda}"));
        }
        if !self.init_mean.is_finite() {
            return err("model.init_mean", format!("must be finite, got {}", self.init_mean));
        }
        if !(self.init_std >= 0.0 && self.init_std.is_finite()) {
            return err("model.init_std", format!("must be >= 0, got {}", self.init_std));
        }
        if let Objective::Ranking { alpha, item_regularization } = self.objective {
            if !(alpha >= 0.0 && alpha.is_finite()) {
                return err("model.objective.alpha", format!("must be >= 0, got {alpha}"));
            }
            if !(item_regularization >= 0.0 && item_regularization.is_finite()) {
                return err(
                    "model.objective.item_regularization",
                    format!("must be >= 0, got {item_regularization}"),
                );
            }
            // A dense solve per customer costs dim³; the catalogue's sparse factors are solved
            // by conjugate gradients (mf/affinity.rs) at O(dim · items · levels) at worst.
            let max_dim = if self.category_affinity.is_some() { 4096 } else { 256 };
            if self.dim > max_dim {
                return err(
                    "model.dim",
                    format!("must be at most {max_dim} for this ranking model, got {}", self.dim),
                );
            }
            if self.local_item_offsets.is_some() {
                return err(
                    "model.local_item_offsets",
                    "rating residuals; the ranking objective has none".into(),
                );
            }
        }
        if let Some(affinity) = &self.category_affinity {
            let field = "model.category_affinity";
            if !self.objective.is_ranking() {
                return err(field, "needs the ranking objective".into());
            }
            if !(1..=8).contains(&affinity.levels) {
                return err(
                    field,
                    format!("needs 1 to 8 catalogue levels, got {}", affinity.levels),
                );
            }
            if affinity.categories.len() != self.n_items * affinity.levels as usize {
                return err(
                    field,
                    format!(
                        "has {} categories for {} items at {} levels",
                        affinity.categories.len(),
                        self.n_items,
                        affinity.levels
                    ),
                );
            }
            let mut used = vec![false; self.dim];
            for &c in &affinity.categories {
                match used.get_mut(c as usize) {
                    Some(u) => *u = true,
                    None => {
                        return err(field, format!("category {c} is not below dim {}", self.dim));
                    }
                }
            }
            if let Some(c) = used.iter().position(|&u| !u) {
                return err(
                    field,
                    format!("dim must be the number of categories; {c} has no item"),
                );
            }
            if !(affinity.bias_scale > 0.0 && affinity.bias_scale.is_finite()) {
                return err(
                    field,
                    format!("bias_scale must be positive, got {}", affinity.bias_scale),
                );
            }
        }
        if self.rating_min.partial_cmp(&self.rating_max) != Some(std::cmp::Ordering::Less) {
            return err(
                "model.rating_min",
                format!(
                    "must be below rating_max, got {} and {}",
                    self.rating_min, self.rating_max
                ),
            );
        }
        Ok(())
    }
}

/// One rating. `user` is the store's dense local index; `item` is global.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rating {
    /// Local user index, `< MfData::n_users()`.
    pub user: u32,
    /// Global item id, `< MfSpec::n_items`.
    pub item: u32,
    /// The rating.
    pub value: f32,
    /// Seconds since the epoch, or 0 when unknown; the newest held-out rating is the ranking target.
    pub timestamp: i64,
}

/// A store's ratings, split into training and held-out parts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MfData {
    /// Per local user, a stable seed derived from the user's id (see [`user_seed`]): it fixes the
    /// user's initial factors and ranking negatives, whichever store or baseline holds the user.
    pub user_seeds: Vec<u64>,
    /// Training ratings.
    pub train: Vec<Rating>,
    /// Held-out ratings.
    pub test: Vec<Rating>,
}

impl MfData {
    /// Number of local users.
    pub fn n_users(&self) -> usize {
        self.user_seeds.len()
    }
}

/// A stable 64-bit seed for a user id (FNV-1a), the same in every process and platform.
pub fn user_seed(user_id: &str) -> u64 {
    user_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The local part: user biases and factors. Never sent anywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct MfLocal {
    /// One bias per local user.
    pub user_bias: Vec<f32>,
    /// `n_users × dim` user factors.
    pub user_factors: Array2<f32>,
}

/// The recommender's hyper-parameters; parameters are passed to each method.
#[derive(Debug, Clone, PartialEq)]
pub struct MfModel {
    spec: MfSpec,
}

/// Mutable views into the global vector.
struct GlobalMut<'a> {
    mu: &'a mut f32,
    item_bias: &'a mut [f32],
    item_factors: ArrayViewMut2<'a, f32>,
}

impl MfModel {
    /// A model with these hyper-parameters. Call [`MfSpec::validate`] first on untrusted specs.
    pub fn new(spec: MfSpec) -> MfModel {
        MfModel { spec }
    }

    /// The hyper-parameters.
    pub fn spec(&self) -> &MfSpec {
        &self.spec
    }

    fn split_mut<'a>(&self, global: &'a mut [f32]) -> GlobalMut<'a> {
        assert_eq!(global.len(), self.spec.n_global(), "global vector has the wrong length");
        let (mu, rest) = global.split_first_mut().expect("n_global >= 1");
        let (item_bias, factors) = rest.split_at_mut(self.spec.n_items);
        let item_factors = ArrayViewMut2::from_shape((self.spec.n_items, self.spec.dim), factors)
            .expect("length checked above");
        GlobalMut { mu, item_bias, item_factors }
    }

    fn item_factors<'a>(&self, global: &'a [f32]) -> ArrayView2<'a, f32> {
        ArrayView2::from_shape((self.spec.n_items, self.spec.dim), &global[1 + self.spec.n_items..])
            .expect("global vector has the wrong length")
    }

    /// Unclamped prediction for `(user, item)`.
    pub fn predict(&self, global: &[f32], local: &MfLocal, user: u32, item: u32) -> f32 {
        let (u, i) = (user as usize, item as usize);
        let factors = self.item_factors(global);
        let q = factors.row(i);
        global[0] + local.user_bias[u] + global[1 + i] + local.user_factors.row(u).dot(&q)
    }

    /// The store-local item offsets for `data` ([`MfSpec::local_item_offsets`]), or `None` when
    /// the task has none.
    pub fn local_item_offsets(
        &self,
        global: &[f32],
        local: &MfLocal,
        data: &MfData,
    ) -> Option<Vec<f32>> {
        let lambda = f64::from(self.spec.local_item_offsets?);
        let mut sums = vec![(0f64, 0f64); self.spec.n_items];
        for r in &data.train {
            let s = &mut sums[r.item as usize];
            s.0 += f64::from(r.value - self.predict(global, local, r.user, r.item));
            s.1 += 1.0;
        }
        Some(sums.into_iter().map(|(residual, n)| (residual / (n + lambda)) as f32).collect())
    }

    /// Checks that every rating's user and item fall in range.
    ///
    /// # Errors
    ///
    /// A message naming the first out-of-range rating.
    pub fn check_data(&self, data: &MfData) -> Result<(), String> {
        for r in data.train.iter().chain(&data.test) {
            if r.item as usize >= self.spec.n_items {
                return Err(format!(
                    "item id {} is not below the task's n_items {}",
                    r.item, self.spec.n_items
                ));
            }
            if r.user as usize >= data.n_users() {
                return Err(format!("user index {} is not below {} users", r.user, data.n_users()));
            }
        }
        Ok(())
    }
}

/// The per-rating loss (module docs), for finite-difference checks of [`sgd_step`].
#[allow(clippy::too_many_arguments)] // reason: mirrors the formula's terms one to one
pub fn rating_loss(mu: f32, bu: f32, bi: f32, p: &[f32], q: &[f32], r: f32, reg: f32) -> f64 {
    let dot: f32 = p.iter().zip(q).map(|(a, b)| a * b).sum();
    let e = f64::from(r - (mu + bu + bi + dot));
    let sq = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>();
    0.5 * e * e
        + 0.5 * f64::from(reg) * (f64::from(bu).powi(2) + f64::from(bi).powi(2) + sq(p) + sq(q))
}

/// One SGD step on one rating: every parameter moves by `-lr` times its partial derivative of
/// [`rating_loss`] (μ is not regularised). Returns `½ e²` before the step.
#[allow(clippy::too_many_arguments)] // reason: the parameters of one rating's loss
pub fn sgd_step(
    mu: &mut f32,
    bu: &mut f32,
    bi: &mut f32,
    mut p: ArrayViewMut1<'_, f32>,
    mut q: ArrayViewMut1<'_, f32>,
    r: f32,
    lr: f32,
    reg: f32,
) -> f64 {
    let e = r - (*mu + *bu + *bi + p.dot(&q));
    *mu += lr * e;
    *bu += lr * (e - reg * *bu);
    *bi += lr * (e - reg * *bi);
    ndarray::Zip::from(&mut p).and(&mut q).for_each(|pk, qk| {
        let (p0, q0) = (*pk, *qk);
        *pk += lr * (e * q0 - reg * p0);
        *qk += lr * (e * p0 - reg * q0);
    });
    0.5 * f64::from(e) * f64::from(e)
}

impl Model for MfModel {
    type Data = MfData;
    type Local = MfLocal;

    fn n_global(&self) -> usize {
        self.spec.n_global()
    }

    fn init_global(&self, rng: &mut dyn Rng) -> Vec<f32> {
        let normal =
            Normal::new(0.0, self.spec.init_std).expect("init_std validated finite and >= 0");
        let mut global = vec![0.0; self.n_global()];
        let g = self.split_mut(&mut global);
        *g.mu = self.spec.init_mean;
        for q in g.item_factors {
            *q = normal.sample(rng);
        }
        if self.spec.category_affinity.is_some() {
            self.set_category_factors(&mut global);
        }
        global
    }

    fn init_local(&self, data: &MfData, previous: Option<MfLocal>) -> MfLocal {
        if let Some(prev) = previous
            && prev.user_bias.len() == data.n_users()
            && prev.user_factors.dim() == (data.n_users(), self.spec.dim)
        {
            return prev;
        }
        let normal =
            Normal::new(0.0, self.spec.init_std).expect("init_std validated finite and >= 0");
        let mut user_factors = Array2::zeros((data.n_users(), self.spec.dim));
        for (mut row, &seed) in user_factors.axis_iter_mut(Axis(0)).zip(&data.user_seeds) {
            let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
            row.iter_mut().for_each(|x| *x = normal.sample(&mut rng));
        }
        MfLocal { user_bias: vec![0.0; data.n_users()], user_factors }
    }

    fn train(
        &self,
        global: &mut [f32],
        local: &mut MfLocal,
        data: &MfData,
        epochs: u32,
        rng: &mut dyn Rng,
    ) -> TrainStats {
        if self.spec.category_affinity.is_some() {
            // Exact in one step: the store's buyer shares (epochs change nothing).
            let n_users = self.fit_affinity(global, data);
            return TrainStats { n_examples: n_users, mean_loss: 0.0 };
        }
        if self.spec.objective.is_ranking() {
            let (mean_loss, n_users) = self.train_ranking(global, local, data, epochs);
            return TrainStats { n_examples: n_users, mean_loss };
        }
        let (lr, reg) = (self.spec.learning_rate, self.spec.regularization);
        let mut g = self.split_mut(global);
        let mut order: Vec<u32> = (0..data.train.len() as u32).collect();
        let mut loss = 0.0;
        for _ in 0..epochs {
            order.shuffle(rng);
            loss = 0.0;
            for &k in &order {
                let r = data.train[k as usize];
                let (u, i) = (r.user as usize, r.item as usize);
                loss += sgd_step(
                    g.mu,
                    &mut local.user_bias[u],
                    &mut g.item_bias[i],
                    local.user_factors.row_mut(u),
                    g.item_factors.row_mut(i),
                    r.value,
                    lr,
                    reg,
                );
            }
        }
        let n = data.train.len();
        TrainStats { n_examples: n, mean_loss: if n == 0 { 0.0 } else { loss / n as f64 } }
    }

    fn evaluate(&self, global: &[f32], local: &MfLocal, data: &MfData, seed: u64) -> EvalSums {
        let mut sums = EvalSums::default();
        for user in self.evaluate_by_user(global, local, data, seed) {
            sums.merge(&user);
        }
        sums
    }
}

impl MfModel {
    /// [`Model::evaluate`] per user (indexed like `data.user_seeds`): what private evaluation
    /// bounds one customer at a time ([`crate::privacy::evaluation`]).
    pub fn evaluate_by_user(
        &self,
        global: &[f32],
        local: &MfLocal,
        data: &MfData,
        seed: u64,
    ) -> Vec<EvalSums> {
        let ranking = self.spec.objective.is_ranking();
        let offsets = if ranking { None } else { self.local_item_offsets(global, local, data) };
        let folded = ranking.then(|| self.ranking_scores(global, data));
        let predict = |user, item: u32| match &folded {
            Some(score) => score(user, item),
            None => {
                self.predict(global, local, user, item)
                    + offsets.as_ref().map_or(0.0, |o| o[item as usize])
            }
        };
        let mut sums = vec![EvalSums::default(); data.n_users()];
        if !ranking {
            for r in &data.test {
                let p = predict(r.user, r.item).clamp(self.spec.rating_min, self.spec.rating_max);
                sums[r.user as usize].add_rating(p, r.value);
            }
        }
        // Leave-one-out ranking: each user's newest held-out item against N_NEGATIVES items the
        // user never rated, sampled with a seed fixed by the user, so every method ranks the
        // same candidates.
        let n_users = data.n_users();
        let mut rated: Vec<Vec<u32>> = vec![Vec::new(); n_users];
        let mut target: Vec<Option<Rating>> = vec![None; n_users];
        for r in data.train.iter().chain(&data.test) {
            rated[r.user as usize].push(r.item);
        }
        for r in &data.test {
            let t = &mut target[r.user as usize];
            if t.is_none_or(|t| r.timestamp >= t.timestamp) {
                *t = Some(*r);
            }
        }
        let mut negatives = Vec::with_capacity(N_NEGATIVES);
        for (u, t) in target.iter().enumerate() {
            let Some(t) = t else { continue };
            let seen = &mut rated[u];
            seen.sort_unstable();
            seen.dedup();
            if self.spec.n_items < seen.len() + N_NEGATIVES {
                continue;
            }
            let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed ^ data.user_seeds[u]);
            negatives.clear();
            while negatives.len() < N_NEGATIVES {
                let item = rng.random_range(0..self.spec.n_items as u32);
                if seen.binary_search(&item).is_err() && !negatives.contains(&item) {
                    negatives.push(item);
                }
            }
            // A negative that ties with the target counts against it: never in its favour.
            let pos = predict(t.user, t.item);
            let rank = negatives.iter().filter(|&&i| predict(t.user, i) >= pos).count();
            sums[u].add_rank(rank);
        }
        sums
    }
}

#[cfg(test)]
mod tests;
