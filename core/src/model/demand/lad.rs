//! Federated least absolute deviations for demand ([`LadSpec`]): a linear model of the
//! departure from the recent level, fitted by iteratively reweighted least squares (IRLS) from
//! the stores' summed sufficient statistics. Built for store-level differential privacy: a
//! store's whole contribution to a round is one short vector, and one or two rounds fit the
//! model, where the network needs tens of noisy rounds (BENCHMARKS.md, "Demand on Complete
//! Journey").
//!
//! The model forecasts `η = ℓ(4-week mean) + θ · φ`, the same offset as
//! [`DemandSpec::relative_to_recent`](super::DemandSpec::relative_to_recent), so a model that
//! learns nothing forecasts the moving average. `φ` has [`LAD_FEATURES`] bounded entries: 1,
//! each lag and the 13- and 52-week means relative to the 4-week level `ℓ(4-week mean)` (0 where
//! a lag is missing), the target week's display and mailer shares, and the level / 5, each
//! clipped to ±3 (the level to `[0, 2]`).
//!
//! In a round each store sends, for the model `θ` it fetched, the means over its training
//! examples of `w φ φᵀ` (the upper triangle, row by row) and of `w φ r`, where `r` is the
//! target `ℓ(y) − ℓ(4-week mean)` clipped to ±3 and `w = 1 / max(|r − θ·φ|, floor)` the IRLS
//! weight of least absolute deviations, scaled to mean 1 in the store
//! ([`DemandModel::lad_statistics`]). Only these means leave the store, so the round is a
//! plain federated sum: secure aggregation and the Gaussian mechanism apply unchanged (the
//! vector is clipped like any update). The coordinator projects the averaged matrix onto the
//! positive semi-definite ones (noise can make it indefinite), solves `(A + λ I) θ' = b` and
//! moves the model to `θ'` ([`DemandModel::lad_server_step`]): every store counts the same,
//! whatever its size.

use super::{DISPLAY_AT, DemandData, DemandModel, History, LAG_AT, LAGS, MAILER_AT, MISSING_AT};
use super::{EvalSums, MAX_ETA, Series, WINDOW_AT, WINDOWS};
use crate::model::linalg::{cholesky_solve, project_psd};
use crate::plan::SpecError;
use serde::{Deserialize, Serialize};

/// Hyper-parameters of the LAD model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LadSpec {
    /// Ridge λ added to the averaged matrix before the solve: it shrinks `θ` towards 0 (the
    /// moving average) and bounds what noise can do to the solution.
    pub ridge: f32,
    /// Smallest residual in an IRLS weight: residuals below it count as this (so a perfect fit
    /// does not get an infinite weight).
    pub weight_floor: f32,
}

impl Default for LadSpec {
    /// λ 0.2 and floor 0.05 (BENCHMARKS.md, "Demand on Complete Journey": `demand_dp_lad.py`).
    fn default() -> LadSpec {
        LadSpec { ridge: 0.2, weight_floor: 0.05 }
    }
}

impl LadSpec {
    /// Checks ranges.
    ///
    /// # Errors
    ///
    /// [`SpecError`] naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field, message: String| Err(SpecError { field, message });
        if !(self.ridge > 0.0 && self.ridge <= 1e6) {
            return err("model.lad.ridge", format!("must be in (0, 1e6], got {}", self.ridge));
        }
        if !(self.weight_floor > 0.0 && self.weight_floor <= 10.0) {
            return err(
                "model.lad.weight_floor",
                format!("must be in (0, 10], got {}", self.weight_floor),
            );
        }
        Ok(())
    }
}

/// Entries of `φ`: the intercept, every lag, the longer windows, display, mailer and level.
pub const LAD_FEATURES: usize = 1 + LAGS.len() + (WINDOWS.len() - 1) + 3;
/// Values of the matrix part of an upload: the upper triangle of `φ φᵀ`.
const TRIANGLE: usize = LAD_FEATURES * (LAD_FEATURES + 1) / 2;
/// Length of an upload: the triangle, then `φ r`.
pub(super) const LAD_UPLOAD: usize = TRIANGLE + LAD_FEATURES;
/// Bound on every relative feature and on the target.
const BOUND: f32 = 3.0;
/// Weeks of history a training origin needs: the 4-week mean and lag 4 are then observed.
const HISTORY: usize = 4;

/// `φ` of an example with the model's features `x` (see `DemandModel::features`).
fn phi(x: &[f32]) -> [f32; LAD_FEATURES] {
    let level = x[WINDOW_AT];
    let relative = |v: f32| (v - level).clamp(-BOUND, BOUND);
    let mut p = [0.0; LAD_FEATURES];
    p[0] = 1.0;
    for j in 0..LAGS.len() {
        p[1 + j] = if x[MISSING_AT + j] > 0.0 { 0.0 } else { relative(x[LAG_AT + j]) };
    }
    for j in 1..WINDOWS.len() {
        p[LAGS.len() + j] = relative(x[WINDOW_AT + j]);
    }
    let k = LAGS.len() + WINDOWS.len();
    p[k] = x[DISPLAY_AT];
    p[k + 1] = x[MAILER_AT];
    p[k + 2] = (level / 5.0).clamp(0.0, 2.0);
    p
}

/// `θ · φ(x)`: what the model adds to the recent level. A non-finite coordinate of a crafted
/// model gives a non-finite sum, which the forecast's bound turns into a finite one.
pub(super) fn lad_output(global: &[f32], x: &[f32]) -> f32 {
    phi(x).iter().zip(global).map(|(a, b)| a * b).sum()
}

/// The statistics of examples `phi` (rows) with targets `r` at model `theta`: the means of
/// `w φ φᵀ` (upper triangle) and `w φ r`, with the IRLS weights scaled to mean 1. Zeros
/// without examples.
fn statistics(phi: &[[f32; LAD_FEATURES]], r: &[f32], theta: &[f32], floor: f32) -> Vec<f64> {
    let mut out = vec![0.0f64; LAD_UPLOAD];
    if r.is_empty() {
        return out;
    }
    let weights: Vec<f64> = phi
        .iter()
        .zip(r)
        .map(|(p, &r)| {
            let fit: f32 = p.iter().zip(theta).map(|(a, b)| a * b).sum();
            // max() ignores NaN: a crafted non-finite model weighs every example by 1 / floor.
            1.0 / f64::from((r - fit).abs().max(floor))
        })
        .collect();
    let mean_weight = weights.iter().sum::<f64>() / weights.len() as f64;
    for ((p, &r), w) in phi.iter().zip(r).zip(&weights) {
        let w = w / mean_weight;
        let mut k = 0;
        for i in 0..LAD_FEATURES {
            let wi = w * f64::from(p[i]);
            for &pj in &p[i..] {
                out[k] += wi * f64::from(pj);
                k += 1;
            }
            out[TRIANGLE + i] += wi * f64::from(r);
        }
    }
    let n = r.len() as f64;
    out.iter_mut().for_each(|v| *v /= n);
    out
}

/// The next model from averaged statistics `mean`: `(A₊ + λ I)⁻¹ b`, with `A₊` the positive
/// semi-definite projection of the symmetric matrix whose upper triangle `mean` holds. `None`
/// when it has no finite solution (a non-finite upload).
fn solve(mean: &[f64], ridge: f64) -> Option<Vec<f64>> {
    let d = LAD_FEATURES;
    let mut a = vec![0.0; d * d];
    let mut k = 0;
    for i in 0..d {
        for j in i..d {
            a[i * d + j] = mean[k];
            a[j * d + i] = mean[k];
            k += 1;
        }
    }
    project_psd(&mut a, d);
    (0..d).for_each(|i| a[i * d + i] += ridge);
    let mut b = mean[TRIANGLE..].to_vec();
    (cholesky_solve(&mut a, &mut b, d) && b.iter().all(|v| v.is_finite())).then_some(b)
}

impl DemandModel {
    /// The features `x` (see `DemandModel::features`) of a direct forecast of week `t` from
    /// `origin`: everything as known at the origin (the features of week `origin + 1`), but the
    /// target week's planned display and mailer shares.
    fn direct_features(&self, s: &Series, first_week: i64, origin: usize, t: usize, x: &mut [f32]) {
        let hist = History { series: s, origin, forecasts: &[] };
        self.features(&hist, first_week, origin + 1, x);
        let planned = |shares: &[f32]| shares.get(t).copied().unwrap_or(0.0);
        x[DISPLAY_AT] = planned(&s.display);
        x[MAILER_AT] = planned(&s.mailer);
    }

    /// Every training example's `φ` and target relative to the level, clipped: every target
    /// week before the test from every origin 1 to `horizon` weeks before it with four weeks
    /// of history (the forecasts are direct, one model for every horizon).
    fn lad_examples(&self, data: &DemandData) -> (Vec<[f32; LAD_FEATURES]>, Vec<f32>) {
        let start = self.test_start(data);
        let mut x = vec![0.0; self.spec.group_offset()];
        let (mut phis, mut targets) = (Vec::new(), Vec::new());
        for s in &data.series {
            for origin in s.start + HISTORY - 1..start.saturating_sub(1) {
                for t in origin + 1..=(origin + self.spec.horizon as usize).min(start - 1) {
                    self.direct_features(s, data.first_week, origin, t, &mut x);
                    phis.push(phi(&x));
                    let r = s.units[t].max(0.0).ln_1p() - x[WINDOW_AT];
                    targets.push(r.clamp(-BOUND, BOUND));
                }
            }
        }
        (phis, targets)
    }

    /// Rolling-origin evaluation of the LAD model `global` (the module's `evaluate`): direct
    /// forecasts of every horizon from what is known at the origin.
    pub(super) fn evaluate_lad(&self, global: &[f32], data: &DemandData) -> EvalSums {
        let mut x = vec![0.0; self.spec.group_offset()];
        self.rolling_origin(data, |si, origin, out| {
            let s = &data.series[si];
            for (h, f) in out.iter_mut().enumerate() {
                self.direct_features(s, data.first_week, origin, origin + 1 + h, &mut x);
                *f = self.forecast((x[WINDOW_AT] + lad_output(global, &x)).min(MAX_ETA));
            }
        })
    }

    fn lad(&self) -> &super::LadSpec {
        self.spec.lad.as_ref().expect("a LAD model")
    }

    /// What a store sends in a round of a LAD task (module docs): the IRLS statistics at the
    /// model `global` (length [`crate::plan::TaskSpec::upload_len`]), and the number of
    /// examples.
    ///
    /// # Panics
    ///
    /// If the model is not LAD, or `global` has the wrong length.
    pub fn lad_statistics(&self, global: &[f32], data: &DemandData) -> (Vec<f32>, usize) {
        assert_eq!(global.len(), LAD_FEATURES, "model has the wrong length");
        let (phis, targets) = self.lad_examples(data);
        let stats = statistics(&phis, &targets, global, self.lad().weight_floor);
        (stats.into_iter().map(|v| v as f32).collect(), targets.len())
    }

    /// The pure server step of a LAD task: from the model `global` and `mean`, the stores'
    /// (noised) statistics averaged over the round, the change to the solution of the
    /// reweighted ridge system (module docs). Zero if `mean` has no finite solution.
    ///
    /// # Panics
    ///
    /// If the model is not LAD, or a length is wrong.
    pub fn lad_server_step(&self, global: &[f32], mean: &[f32]) -> Vec<f32> {
        assert_eq!(global.len(), LAD_FEATURES, "model has the wrong length");
        assert_eq!(mean.len(), LAD_UPLOAD, "upload has the wrong length");
        let mean: Vec<f64> = mean.iter().map(|&v| f64::from(v)).collect();
        match solve(&mean, f64::from(self.lad().ridge)) {
            Some(next) => next.iter().zip(global).map(|(n, g)| *n as f32 - g).collect(),
            None => vec![0.0; global.len()],
        }
    }

    /// `iterations` IRLS steps on `data` alone (the central and local-only references): the
    /// rounds of a federated task with one store. Returns the examples and their mean absolute
    /// error on the clipped target after the last step.
    pub(super) fn train_lad(
        &self,
        global: &mut [f32],
        data: &DemandData,
        iterations: u32,
    ) -> (usize, f64) {
        let (phis, targets) = self.lad_examples(data);
        let floor = self.lad().weight_floor;
        for _ in 0..iterations {
            let mean = statistics(&phis, &targets, global, floor);
            match solve(&mean, f64::from(self.lad().ridge)) {
                Some(next) => global.iter_mut().zip(next).for_each(|(g, n)| *g = n as f32),
                None => break,
            }
        }
        let error: f64 = phis
            .iter()
            .zip(&targets)
            .map(|(p, r)| {
                f64::from((p.iter().zip(&*global).map(|(a, b)| a * b).sum::<f32>() - r).abs())
            })
            .sum();
        (targets.len(), error / targets.len().max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// Rows of bounded features, and targets from a known `θ` with Laplace noise and 10 %
    /// gross outliers.
    fn examples(n: usize, seed: u64) -> (Vec<[f32; LAD_FEATURES]>, Vec<f32>, Vec<f32>) {
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
        let theta: Vec<f32> = (0..LAD_FEATURES).map(|i| 0.3 - 0.07 * i as f32).collect();
        let mut phis = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..n {
            let mut p = [0.0f32; LAD_FEATURES];
            p[0] = 1.0;
            p[1..].iter_mut().for_each(|v| *v = rng.random_range(-1.0f32..1.0));
            let u: f32 = rng.random_range(-0.5f32..0.5);
            let laplace = -0.1 * u.signum() * (1.0 - 2.0 * u.abs()).max(1e-6).ln();
            let outlier = if rng.random_range(0.0f32..1.0) < 0.1 { 2.5 } else { 0.0 };
            let fit: f32 = p.iter().zip(&theta).map(|(a, b)| a * b).sum();
            targets.push((fit + laplace + outlier).clamp(-BOUND, BOUND));
            phis.push(p);
        }
        (phis, targets, theta)
    }

    fn distance(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt()
    }

    /// IRLS from averaged statistics of three stores finds the median regression: near the
    /// true coefficients despite one-sided outliers, where least squares (every weight alike)
    /// is pulled off.
    #[test]
    fn federated_irls_recovers_the_median_regression_despite_outliers() {
        let stores: Vec<_> = (0..3).map(|k| examples(800 + 300 * k, k as u64)).collect();
        let theta_true = stores[0].2.clone();
        let ridge = 1e-4;
        let mut theta = vec![0.0f32; LAD_FEATURES];
        for _ in 0..15 {
            let mut mean = vec![0.0f64; LAD_UPLOAD];
            for (phis, targets, _) in &stores {
                let s = statistics(phis, targets, &theta, 0.01);
                mean.iter_mut().zip(&s).for_each(|(m, v)| *m += v / 3.0);
            }
            theta = solve(&mean, ridge).unwrap().iter().map(|&v| v as f32).collect();
        }
        // Least squares on the same data: unit weights.
        let mut mean = vec![0.0f64; LAD_UPLOAD];
        for (phis, targets, _) in &stores {
            let s = statistics(phis, targets, &[f32::NAN; LAD_FEATURES], 0.01);
            mean.iter_mut().zip(&s).for_each(|(m, v)| *m += v / 3.0);
        }
        let squares: Vec<f32> = solve(&mean, ridge).unwrap().iter().map(|&v| v as f32).collect();
        let (lad, ls) = (distance(&theta, &theta_true), distance(&squares, &theta_true));
        assert!(lad < 0.05, "LAD is {lad} from the truth: {theta:?}");
        assert!(ls > 4.0 * lad, "least squares {ls} should be pulled off by the outliers");
    }

    /// A non-finite or indefinite upload does not panic the coordinator: no finite solution
    /// leaves the model as it is, an indefinite one is projected and solved.
    #[test]
    fn a_crafted_upload_leaves_a_finite_model() {
        let mut mean = vec![0.0f64; LAD_UPLOAD];
        mean[0] = -5.0; // a negative diagonal entry
        mean[TRIANGLE] = 1.0;
        let theta = solve(&mean, 0.2).expect("the projection makes it solvable");
        assert!(theta.iter().all(|v| v.is_finite()), "{theta:?}");
        assert_eq!(theta[0], 5.0, "b / λ where the projected matrix is 0");
        mean[3] = f64::NAN;
        assert!(solve(&mean, 0.2).is_none());
        mean[3] = f64::INFINITY;
        assert!(solve(&mean, 0.2).is_none());
    }

    /// Every weight scaled to mean 1 in the store: the intercept's entry of the matrix is 1
    /// whatever the store's size or residuals.
    #[test]
    fn weights_have_mean_one_in_a_store() {
        let (phis, targets, theta) = examples(57, 9);
        let s = statistics(&phis, &targets, &theta, 0.05);
        assert!((s[0] - 1.0).abs() < 1e-12, "{}", s[0]);
        assert!(statistics(&[], &[], &theta, 0.05).iter().all(|&v| v == 0.0));
    }
}
