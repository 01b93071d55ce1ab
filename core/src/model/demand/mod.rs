//! Weekly demand forecasting per (store, product group): a generalised linear model whose
//! coefficients are shared by every store (federated) and whose store and store-group levels
//! stay in the store, as user factors do in the recommender.
//!
//! For series `s` (store `k`, group `g`) and target week `t`, with `ℓ(y) = ln(1 + y)`:
//!
//! ```text
//! η = β₀ + b_g + a_k + a_s + Σ_j w_j ℓ(y_{t-j}) + Σ_j m_j [t-j before the data]
//!     + Σ_W v_W ℓ(mean of the last W weeks) + d · (last observed discount)
//!     + p_d · (display share of week t) + p_m · (mailer share of week t)
//!     + Σ_h (c_h sin(2πht/P) + c'_h cos(2πht/P))
//! ```
//!
//! plus, per group, its own seasonal terms `Σ_h (e_{g,h} sin(2πht/P) + e'_{g,h} cos(2πht/P))`,
//! with lags `j ∈ {1, 2, 4, 52}`, windows `W ∈ {4, 13, 52}` and `P` the mean year in weeks.
//! Missing lags (the first year of a series, or a data set of one year) are switched off by
//! their indicators `m_j`. `β₀, w, m, v, d, p, c, b, e` are global. Local to the store: the store level `a_k`, the series
//! level `a_s`, the store's offsets to `w, m, v, d, c` and the series' offsets to `e_g`, the
//! offsets under a prior that keeps small stores near the federated values
//! ([`DemandSpec::personal_regularization`]).
//!
//! Two losses, picked per task ([`DemandLoss`]): Poisson deviance (`ŷ = e^η`, the mean) and
//! squared error on `ℓ(y)` (`ŷ = e^η - 1`, nearer the median for intermittent series). Both are
//! L2-regularised with λ on every parameter but `β₀`. Measurements on Superstore decide the
//! default (BENCHMARKS.md, "Demand forecasting").
//!
//! Forecasts are recursive: horizon `h > 1` feeds the forecasts of the earlier horizons in as
//! lags. Evaluation is rolling-origin: every week from [`DemandSpec::first_test_week`] on is a
//! target, forecast from every origin 1 to `horizon` weeks before it, using only what was
//! known at the origin. Nothing in a series from the test weeks is ever trained on.
//!
//! Discount enters lagged (the last discount observed before the target week and no later than
//! the origin): in order lines a discount is observed only when something sold, so the same
//! week's discount would leak the target. Stores that record a promotion calendar set
//! [`DemandSpec::planned_discounts`], and then the target week's own discount is used.
//!
//! Promotions (the share of the group's products on in-store display, and in the mailer) come
//! from the store's promotion calendar, which is planned ahead: the target week's own shares
//! are features. A series without a calendar has none (zero).

mod lad;
#[cfg(test)]
mod tests;
mod trees;

pub use lad::{LAD_FEATURES, LadSpec};
pub use trees::TreeSpec;

use super::metrics::EvalSums;
use super::{Model, TrainStats};
use crate::plan::SpecError;
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// Lags of the target used as features, in weeks.
pub const LAGS: [usize; 4] = [1, 2, 4, 52];
/// Trailing windows whose mean is a feature, in weeks.
pub const WINDOWS: [usize; 3] = [4, 13, 52];
/// The mean Gregorian year in weeks: the period of the seasonal terms.
pub const YEAR_WEEKS: f64 = 365.2425 / 7.0;
/// Within one call of `train`, epoch `e` steps with `learning_rate / (1 + e / DECAY_EPOCHS)`:
/// constant steps leave subgradient SGD (the median loss) jittering around the optimum.
const DECAY_EPOCHS: f32 = 10.0;
/// Bound on a Poisson example's gradient with respect to η (see `sgd_step`).
pub const POISSON_GRADIENT_BOUND: f32 = 5.0;
/// Largest linear predictor used; keeps `e^η` finite while training diverges.
const MAX_ETA: f32 = 12.0;

/// Index of the week holding `day` (days since 1970-01-01), weeks starting on Monday; week 0
/// starts on Monday 1970-01-05.
pub fn week_of_day(day: i64) -> i64 {
    (day - 4).div_euclid(7)
}

/// The training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DemandLoss {
    /// Poisson deviance with a log link: forecasts the mean.
    Poisson,
    /// Squared error on `ln(1 + y)`: forecasts the back-transformed mean of the log.
    Log1pSquared,
    /// Absolute error on `ln(1 + y)`: forecasts the median (WAPE's and MAE's optimum).
    Log1pAbsolute,
}

/// Hyper-parameters of the demand model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemandSpec {
    /// Product groups; a series' group is an index into this list.
    pub groups: Vec<String>,
    /// The first held-out week ([`week_of_day`]); earlier weeks are training targets.
    pub first_test_week: i64,
    /// Forecast horizons evaluated: 1 to this many weeks ahead.
    pub horizon: u32,
    /// Seasonal harmonics (sine and cosine pairs of the year).
    pub harmonics: u32,
    /// SGD step size.
    pub learning_rate: f32,
    /// L2 regularisation λ.
    pub regularization: f32,
    /// Loss.
    pub loss: DemandLoss,
    /// Whether stores record every week's discount ahead (a promotion calendar): then the
    /// target week's own discount is a feature. Without it (order lines, where a discount is
    /// seen only when something sold) the last discount observed before the target week and no
    /// later than the origin is used instead, so the target never leaks in.
    #[serde(default)]
    pub planned_discounts: bool,
    /// Prior weight Λ on a store's personal offsets (to the feature weights, and each series'
    /// to its group's seasonal coefficients), spread over the store's training examples: each
    /// example adds `λ + Λ / n_store` to their L2 coefficient, so the penalty in total is about
    /// `Λ/2 ‖u‖²` whatever the store's size. Small stores then keep close to the federated
    /// weights and large ones may depart from them.
    #[serde(default)]
    pub personal_regularization: f32,
    /// Units are whole (counts): median forecasts ([`DemandLoss::Log1pAbsolute`]) are rounded
    /// to the nearest whole unit, as the median of a count is one. Without it a median of zero
    /// estimated as 0.03 would be charged as error in every week without sales.
    #[serde(default)]
    pub whole_units: bool,
    /// Forecast relative to the recent level: `ℓ(mean of the last 4 weeks)` is added to `η` as
    /// a fixed offset, so every weight (all regularised towards zero) describes a departure
    /// from the 4-week moving average, and a model that learns nothing forecasts it. That
    /// level is the store's own, computed from its own sales in the store, so the model then
    /// has no further local part: store and series levels and personal offsets are neither
    /// trained nor used (on Complete Journey they overfit one year of weeks; BENCHMARKS.md).
    #[serde(default)]
    pub relative_to_recent: bool,
    /// Hidden units of a global one-layer tanh network added to `η` (0: none). Its inputs are
    /// the features relative to the recent level (see `DemandModel::network_input`) and the
    /// group's one-hot code, so it learns how lags, windows and promotions interact per group,
    /// which no linear term can (on Complete Journey a linear model only ties the moving
    /// average; BENCHMARKS.md). Its output weights start at zero: an untrained network adds
    /// nothing.
    #[serde(default)]
    pub hidden_units: u32,
    /// Gradient-boosted trees instead of the linear model and network ([`TreeSpec`], module
    /// `trees`): requires [`DemandSpec::relative_to_recent`] and the absolute loss on `ℓ(y)`.
    /// A round's upload is then a histogram of gradients, not a change of the model.
    #[serde(default)]
    pub trees: Option<TreeSpec>,
    /// Least absolute deviations fitted by reweighted least squares from the stores' summed
    /// statistics instead of the linear model and network ([`LadSpec`], module `lad`): built
    /// for store-level DP (one short upload per round, one or two rounds). Requires
    /// [`DemandSpec::relative_to_recent`] and the absolute loss on `ℓ(y)`; excludes trees.
    #[serde(default)]
    pub lad: Option<LadSpec>,
}

impl DemandSpec {
    /// Index of the first group effect in the global vector.
    fn group_offset(&self) -> usize {
        FIXED + 2 * self.harmonics as usize
    }

    /// Length of the global vector: the shared weights, then per group its effect and its own
    /// seasonal coefficients, then the network's weights.
    pub fn n_global(&self) -> usize {
        match (&self.trees, &self.lad) {
            (Some(t), _) => trees::Layout::new(t, self.groups.len()).n_global(),
            (None, Some(_)) => LAD_FEATURES,
            (None, None) => self.network_offset() + self.network_len(),
        }
    }

    /// Length of a store's upload: a histogram for trees ([`DemandModel::tree_histograms`]),
    /// statistics for LAD ([`DemandModel::lad_statistics`]), else the change of the global
    /// vector.
    pub fn upload_len(&self) -> usize {
        match (&self.trees, &self.lad) {
            (Some(t), _) => trees::Layout::new(t, self.groups.len()).histogram_len(),
            (None, Some(_)) => lad::LAD_UPLOAD,
            (None, None) => self.n_global(),
        }
    }

    /// Whether a store uploads statistics from which a server step computes the next model
    /// (trees, LAD), not a change of the model.
    pub fn uploads_statistics(&self) -> bool {
        self.trees.is_some() || self.lad.is_some()
    }

    /// Where the network's weights start: per hidden unit its input weights and bias, then the
    /// output weights.
    fn network_offset(&self) -> usize {
        self.group_offset() + self.groups.len() * self.group_width()
    }

    /// Inputs of the network: [`NETWORK_FEATURES`] and the group's one-hot code.
    fn network_inputs(&self) -> usize {
        NETWORK_FEATURES + self.groups.len()
    }

    fn network_len(&self) -> usize {
        self.hidden_units as usize * (self.network_inputs() + 2)
    }

    /// Global values per group: the effect `b_g` and `2 × harmonics` seasonal coefficients.
    fn group_width(&self) -> usize {
        1 + 2 * self.harmonics as usize
    }

    /// Where group `g`'s block starts in the global vector.
    fn group_at(&self, g: u32) -> usize {
        self.group_offset() + g as usize * self.group_width()
    }

    /// Trees and LAD (`what`, configured in `field`) forecast relative to the recent level
    /// with the absolute loss.
    fn relative_with_absolute_loss(
        &self,
        field: &'static str,
        what: &str,
    ) -> Result<(), SpecError> {
        if self.relative_to_recent && self.loss == DemandLoss::Log1pAbsolute {
            return Ok(());
        }
        Err(SpecError {
            field,
            message: format!(
                "{what} forecast relative to the recent level with the absolute loss: set \
                 relative_to_recent and loss log1p_absolute"
            ),
        })
    }

    /// Checks ranges.
    ///
    /// # Errors
    ///
    /// [`SpecError`] naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field, message: String| Err(SpecError { field, message });
        if self.groups.is_empty() || self.groups.len() > 1_000_000 {
            return err(
                "model.groups",
                format!("must hold 1 to 1e6 groups, got {}", self.groups.len()),
            );
        }
        let mut sorted: Vec<&String> = self.groups.iter().collect();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return err("model.groups", format!("group {:?} is listed twice", w[0]));
        }
        if !(1..=52).contains(&self.horizon) {
            return err("model.horizon", format!("must be in 1..=52, got {}", self.horizon));
        }
        if self.hidden_units > 256 {
            return err(
                "model.hidden_units",
                format!("must be at most 256, got {}", self.hidden_units),
            );
        }
        if let Some(t) = &self.trees {
            t.validate()?;
            self.relative_with_absolute_loss("model.trees", "trees")?;
            if self.groups.len() > 256 {
                return err(
                    "model.trees",
                    format!("at most 256 groups with trees, got {}", self.groups.len()),
                );
            }
        }
        if let Some(lad) = &self.lad {
            lad.validate()?;
            self.relative_with_absolute_loss("model.lad", "LAD")?;
            if self.trees.is_some() {
                return err("model.lad", "a model has trees or LAD, not both".into());
            }
        }
        if self.harmonics > 26 {
            return err("model.harmonics", format!("must be at most 26, got {}", self.harmonics));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return err(
                "model.learning_rate",
                format!("must be in (0, 1), got {}", self.learning_rate),
            );
        }
        if !(self.personal_regularization >= 0.0 && self.personal_regularization.is_finite()) {
            return err(
                "model.personal_regularization",
                format!("must be >= 0, got {}", self.personal_regularization),
            );
        }
        if !(self.regularization >= 0.0 && self.regularization.is_finite()) {
            return err(
                "model.regularization",
                format!("must be >= 0, got {}", self.regularization),
            );
        }
        Ok(())
    }
}

/// Global slots before the seasonal terms: intercept, lag weights, missing-lag indicators,
/// window means, discount, display and mailer shares.
const FIXED: usize = 1 + 2 * LAGS.len() + WINDOWS.len() + 3;
const LAG_AT: usize = 1;
const MISSING_AT: usize = LAG_AT + LAGS.len();
const WINDOW_AT: usize = MISSING_AT + LAGS.len();
const DISCOUNT_AT: usize = WINDOW_AT + WINDOWS.len();
const DISPLAY_AT: usize = DISCOUNT_AT + 1;
const MAILER_AT: usize = DISCOUNT_AT + 2;
/// Network inputs besides the group code: the recent level `ℓ(4-week mean)` / 4, each lag and
/// longer window minus that level (0 where missing), the missing-lag indicators, discount,
/// display and mailer shares.
const NETWORK_FEATURES: usize = 1 + LAGS.len() + (WINDOWS.len() - 1) + LAGS.len() + 3;

/// One store's weekly sales of one product group.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Local store index, `< DemandData::n_stores`.
    pub store: u32,
    /// Product group, an index into [`DemandSpec::groups`].
    pub group: u32,
    /// Index of the first observed week (a store that opened later than the data's first
    /// week): earlier values are padding, never targets, lags or origins.
    pub start: usize,
    /// Units sold per week, from [`DemandData::first_week`].
    pub units: Vec<f32>,
    /// The week's mean discount (fraction of the list price) over its sales; NaN in weeks
    /// without sales (not observed).
    pub discount: Vec<f32>,
    /// Promotion calendar: per week, the share in `[0, 1]` of the group's products on in-store
    /// display. Empty when the store records no calendar.
    pub display: Vec<f32>,
    /// Per week, the share of the group's products featured in the mailer; empty without a
    /// calendar.
    pub mailer: Vec<f32>,
}

/// A store's (or, for the central reference, several stores') weekly series on one calendar.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DemandData {
    /// Week index ([`week_of_day`]) of every series' first value.
    pub first_week: i64,
    /// Stores the series belong to (1 in a client).
    pub n_stores: usize,
    /// The series, all of the same length.
    pub series: Vec<Series>,
}

impl DemandData {
    /// Weeks per series.
    pub fn n_weeks(&self) -> usize {
        self.series.first().map_or(0, |s| s.units.len())
    }

    /// Weeks in which any series sold something.
    pub fn weeks_with_sales(&self) -> usize {
        (0..self.n_weeks()).filter(|&t| self.series.iter().any(|s| s.units[t] > 0.0)).count()
    }
}

/// The local part: store and series levels. Never sent anywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct DemandLocal {
    /// One level per store.
    pub store_level: Vec<f32>,
    /// One level per series.
    pub series_level: Vec<f32>,
    /// Per series, offsets to its group's seasonal coefficients (`2 × harmonics` values each,
    /// with the personal prior): a store's own seasonal amplitude per product group.
    pub series_season: Vec<f32>,
    /// Per store, offsets added to the global feature weights (every weight but the
    /// intercept): the store's own response to lags, discount and season. `n_stores` rows of
    /// [`DemandModel::n_weights`] values.
    pub store_weights: Vec<f32>,
}

/// The demand model's hyper-parameters; parameters are passed to each method.
#[derive(Debug, Clone, PartialEq)]
pub struct DemandModel {
    spec: DemandSpec,
}

/// A naive forecaster for the baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naive {
    /// The same week a year (52 weeks) earlier.
    Seasonal,
    /// The mean of the last this many weeks before the origin.
    MovingAverage(usize),
    /// Not a forecaster but a bound: each series' (lower) median over its own test weeks,
    /// forecast for every one of them. It sees the test weeks, so no method is expected to
    /// match it; where it is zero for every series of a store, no constant forecast per
    /// series beats forecasting nothing (WAPE 1) on that store.
    HindsightMedian,
}

/// Where a feature vector's history comes from: actual values up to the origin, then forecasts.
struct History<'a> {
    series: &'a Series,
    /// Last week whose actual value is known.
    origin: usize,
    /// Forecasts of weeks `origin + 1 ..`.
    forecasts: &'a [f32],
}

impl History<'_> {
    fn y(&self, week: usize) -> f32 {
        if week <= self.origin {
            self.series.units[week]
        } else {
            self.forecasts[week - self.origin - 1]
        }
    }
}

impl DemandModel {
    /// A model with these hyper-parameters. Call [`DemandSpec::validate`] first on untrusted
    /// specs.
    pub fn new(spec: DemandSpec) -> DemandModel {
        DemandModel { spec }
    }

    /// The hyper-parameters.
    pub fn spec(&self) -> &DemandSpec {
        &self.spec
    }

    /// Index of the first test week in `data`'s series (clamped to the data).
    pub fn test_start(&self, data: &DemandData) -> usize {
        (self.spec.first_test_week - data.first_week).clamp(0, data.n_weeks() as i64) as usize
    }

    /// Checks that groups and stores fall in range and series agree in length.
    ///
    /// # Errors
    ///
    /// A message naming the first problem.
    pub fn check_data(&self, data: &DemandData) -> Result<(), String> {
        let n = data.n_weeks();
        for s in &data.series {
            if s.group as usize >= self.spec.groups.len() {
                return Err(format!(
                    "group index {} is not below the task's {} groups",
                    s.group,
                    self.spec.groups.len()
                ));
            }
            if s.store as usize >= data.n_stores {
                return Err(format!("store index {} is not below {}", s.store, data.n_stores));
            }
            if s.units.len() != n || s.discount.len() != n {
                return Err("series differ in length".into());
            }
            if s.start >= n.max(1) {
                return Err(format!("series start {} is not below its {n} weeks", s.start));
            }
            if s.units.iter().any(|u| !(u.is_finite() && *u >= 0.0)) {
                return Err("units must be finite and non-negative".into());
            }
            for (name, shares) in [("display", &s.display), ("mailer", &s.mailer)] {
                if !shares.is_empty() && shares.len() != n {
                    return Err(format!("a series' {name} shares differ in length from its units"));
                }
                if shares.iter().any(|v| !(0.0..=1.0).contains(v)) {
                    return Err(format!("{name} shares must lie in [0, 1]"));
                }
            }
        }
        Ok(())
    }

    /// The global features of target week `t` (everything but the group effect), into `x`
    /// (length [`DemandSpec::group_offset`]); `x[0] = 1` is the intercept.
    fn features(&self, h: &History<'_>, first_week: i64, t: usize, x: &mut [f32]) {
        let l = |y: f32| y.max(0.0).ln_1p();
        let first = h.series.start;
        x[0] = 1.0;
        for (j, &lag) in LAGS.iter().enumerate() {
            let (value, missing) =
                if t >= first + lag { (l(h.y(t - lag)), 0.0) } else { (0.0, 1.0) };
            x[LAG_AT + j] = value;
            x[MISSING_AT + j] = missing;
        }
        for (j, &w) in WINDOWS.iter().enumerate() {
            let from = t.saturating_sub(w).max(first);
            x[WINDOW_AT + j] = if t <= first {
                0.0
            } else {
                l((from..t).map(|u| h.y(u)).sum::<f32>() / (t - from) as f32)
            };
        }
        // Planned: the target week's discount when recorded. Otherwise the last discount
        // observed before t and no later than the origin.
        let last = if self.spec.planned_discounts { t + 1 } else { t.min(h.origin + 1) };
        x[DISCOUNT_AT] = h.series.discount[first.min(last)..last]
            .iter()
            .rev()
            .find(|d| !d.is_nan())
            .copied()
            .unwrap_or(0.0);
        let planned = |shares: &[f32]| shares.get(t).copied().unwrap_or(0.0);
        x[DISPLAY_AT] = planned(&h.series.display);
        x[MAILER_AT] = planned(&h.series.mailer);
        let week = (first_week + t as i64) as f64;
        for k in 0..self.spec.harmonics as usize {
            let angle = std::f64::consts::TAU * (k + 1) as f64 * week / YEAR_WEEKS;
            x[FIXED + 2 * k] = angle.sin() as f32;
            x[FIXED + 2 * k + 1] = angle.cos() as f32;
        }
    }

    /// Per store, the L2 coefficient of its personal weights per training example
    /// ([`DemandSpec::personal_regularization`]).
    fn personal_regularization(&self, data: &DemandData) -> Vec<f32> {
        let start = self.test_start(data);
        let mut n = vec![0f32; data.n_stores];
        data.series
            .iter()
            .for_each(|s| n[s.store as usize] += start.saturating_sub(s.start + 1) as f32);
        n.iter()
            .map(|&n| self.spec.regularization + self.spec.personal_regularization / n.max(1.0))
            .collect()
    }

    fn series_season<'a>(&self, local: &'a DemandLocal, si: usize) -> &'a [f32] {
        let k = 2 * self.spec.harmonics as usize;
        &local.series_season[si * k..(si + 1) * k]
    }

    /// Feature weights a store personalises (all but the intercept).
    pub fn n_weights(&self) -> usize {
        self.spec.group_offset() - 1
    }

    fn store_weights<'a>(&self, local: &'a DemandLocal, store: u32) -> &'a [f32] {
        let w = self.n_weights();
        &local.store_weights[store as usize * w..(store as usize + 1) * w]
    }

    /// The linear predictor for series `si` given its features.
    fn eta(
        &self,
        global: &[f32],
        local: &DemandLocal,
        data: &DemandData,
        si: usize,
        x: &[f32],
    ) -> f32 {
        let s = &data.series[si];
        // Trees read their own layout of the global vector: nothing below applies.
        if let Some(layout) = self.layout() {
            return (x[WINDOW_AT] + self.tree_output(&layout, global, x, s.group)).min(MAX_ETA);
        }
        // LAD forecasts directly (`lad::evaluate_lad`); this is its one-step forecast.
        if self.spec.lad.is_some() {
            return (x[WINDOW_AT] + lad::lad_output(global, x)).min(MAX_ETA);
        }
        let dot: f32 = x.iter().zip(global).map(|(a, b)| a * b).sum();
        let block = &global[self.spec.group_at(s.group)..][..self.spec.group_width()];
        let season: f32 =
            x[FIXED..self.spec.group_offset()].iter().zip(&block[1..]).map(|(a, b)| a * b).sum();
        let network = if self.spec.hidden_units > 0 {
            let mut z = vec![0.0; self.spec.network_inputs()];
            let mut hidden = vec![0.0; self.spec.hidden_units as usize];
            self.network(global, x, s.group, &mut z, &mut hidden)
        } else {
            0.0
        };
        let shared = network + dot + block[0] + season;
        // Relative to the recent level, the store's own level is that level: no local part.
        if self.spec.relative_to_recent {
            return (x[WINDOW_AT] + shared).min(MAX_ETA);
        }
        let own = self.store_weights(local, s.store);
        let eta = shared
            + x[1..].iter().zip(own).map(|(a, b)| a * b).sum::<f32>()
            + local.store_level[s.store as usize]
            + local.series_level[si]
            + x[FIXED..self.spec.group_offset()]
                .iter()
                .zip(self.series_season(local, si))
                .map(|(a, b)| a * b)
                .sum::<f32>();
        eta.min(MAX_ETA)
    }

    /// The network's inputs for features `x` of a series in `group`, into `z`.
    fn network_input(&self, x: &[f32], group: u32, z: &mut [f32]) {
        let level = x[WINDOW_AT];
        z.fill(0.0);
        z[0] = level / 4.0;
        for j in 0..LAGS.len() {
            let missing = x[MISSING_AT + j];
            z[1 + j] = if missing > 0.0 { 0.0 } else { x[LAG_AT + j] - level };
            z[1 + LAGS.len() + j] = missing;
        }
        let mut k = 1 + 2 * LAGS.len();
        for j in 1..WINDOWS.len() {
            z[k] = x[WINDOW_AT + j] - level;
            k += 1;
        }
        z[k] = x[DISCOUNT_AT];
        z[k + 1] = x[DISPLAY_AT];
        z[k + 2] = x[MAILER_AT];
        z[NETWORK_FEATURES + group as usize] = 1.0;
    }

    /// The network's output for features `x` of a series in `group`; `z` receives its inputs
    /// and `hidden` its hidden activations (for the gradient).
    fn network(
        &self,
        global: &[f32],
        x: &[f32],
        group: u32,
        z: &mut [f32],
        hidden: &mut [f32],
    ) -> f32 {
        self.network_input(x, group, z);
        let (n_in, h) = (self.spec.network_inputs(), self.spec.hidden_units as usize);
        let net = &global[self.spec.network_offset()..];
        let (weights, out) = net.split_at(h * (n_in + 1));
        for (k, a) in hidden.iter_mut().enumerate() {
            let row = &weights[k * (n_in + 1)..(k + 1) * (n_in + 1)];
            let pre: f32 =
                row[..n_in].iter().zip(z.iter()).map(|(w, v)| w * v).sum::<f32>() + row[n_in];
            *a = pre.tanh();
        }
        hidden.iter().zip(out).map(|(a, v)| a * v).sum()
    }

    /// One SGD step of the network's weights for an example with loss gradient `grad` (with
    /// respect to `η`).
    fn network_step(&self, global: &mut [f32], x: &[f32], group: u32, grad: f32, lr: f32) {
        let (n_in, h) = (self.spec.network_inputs(), self.spec.hidden_units as usize);
        let mut z = vec![0.0; n_in];
        let mut hidden = vec![0.0; h];
        self.network(global, x, group, &mut z, &mut hidden);
        let reg = self.spec.regularization;
        let net = &mut global[self.spec.network_offset()..];
        let (weights, out) = net.split_at_mut(h * (n_in + 1));
        for k in 0..h {
            // d η / d pre_k = v_k (1 - a_k²), with v_k before its own step.
            let back = grad * out[k] * (1.0 - hidden[k] * hidden[k]);
            out[k] -= lr * (grad * hidden[k] + reg * out[k]);
            let row = &mut weights[k * (n_in + 1)..(k + 1) * (n_in + 1)];
            for (w, v) in row[..n_in].iter_mut().zip(&z) {
                *w -= lr * (back * v + reg * *w);
            }
            row[n_in] -= lr * (back + reg * row[n_in]);
        }
    }

    /// The forecast (units) from a linear predictor.
    pub fn forecast(&self, eta: f32) -> f32 {
        match self.spec.loss {
            DemandLoss::Poisson => eta.exp(),
            DemandLoss::Log1pAbsolute if self.spec.whole_units => eta.exp_m1().max(0.0).round(),
            DemandLoss::Log1pSquared | DemandLoss::Log1pAbsolute => eta.exp_m1().max(0.0),
        }
    }

    /// The features of series `si` at training week `t` (every earlier week known).
    fn training_features(&self, data: &DemandData, si: usize, t: usize) -> Vec<f32> {
        let mut x = vec![0.0; self.spec.group_offset()];
        let hist = History { series: &data.series[si], origin: t - 1, forecasts: &[] };
        self.features(&hist, data.first_week, t, &mut x);
        x
    }

    /// Loss of series `si` at training week `t` (with the L2 terms of the parameters it
    /// touches), for finite-difference checks of [`DemandModel::gradient`].
    pub fn example_loss(
        &self,
        global: &[f32],
        local: &DemandLocal,
        data: &DemandData,
        si: usize,
        t: usize,
    ) -> f64 {
        let x = self.training_features(data, si, t);
        let eta = f64::from(self.eta(global, local, data, si, &x));
        let y = f64::from(data.series[si].units[t]);
        let fit = match self.spec.loss {
            DemandLoss::Poisson => eta.exp() - y * eta,
            DemandLoss::Log1pSquared => 0.5 * (eta - y.ln_1p()).powi(2),
            DemandLoss::Log1pAbsolute => (eta - y.ln_1p()).abs(),
        };
        let s = &data.series[si];
        let reg = f64::from(self.spec.regularization);
        let sq = |v: f32| f64::from(v).powi(2);
        let personal = f64::from(self.personal_regularization(data)[s.store as usize]);
        // Relative to the recent level the local part is unused (see `eta`).
        let local_terms = if self.spec.relative_to_recent { 0.0 } else { 1.0 };
        let levels = sq(local.store_level[s.store as usize]) + sq(local.series_level[si]);
        let weights: f64 = global[1..self.spec.group_offset()]
            .iter()
            .chain(&global[self.spec.network_offset()..])
            .map(|&w| sq(w))
            .sum();
        fit + 0.5
            * reg
            * (weights
                + global[self.spec.group_at(s.group)..][..self.spec.group_width()]
                    .iter()
                    .map(|&v| sq(v))
                    .sum::<f64>())
            + 0.5 * local_terms * reg * levels
            + 0.5
                * local_terms
                * personal
                * self
                    .series_season(local, si)
                    .iter()
                    .chain(self.store_weights(local, s.store))
                    .map(|&w| sq(w))
                    .sum::<f64>()
    }

    /// One SGD step on series `si` at week `t`, with `x` its features. Returns the fit part of
    /// the loss before the step.
    #[allow(clippy::too_many_arguments)] // reason: one example and its context
    fn sgd_step(
        &self,
        global: &mut [f32],
        local: &mut DemandLocal,
        data: &DemandData,
        si: usize,
        t: usize,
        x: &[f32],
        personal_reg: f32,
        decay: f32,
    ) -> f64 {
        let (lr, reg) = (self.spec.learning_rate * decay, self.spec.regularization);
        let eta = self.eta(global, local, data, si, x);
        let y = data.series[si].units[t];
        let (grad, fit) = match self.spec.loss {
            // The raw gradient e^η - y is unbounded; one large count would throw the weights
            // far off. Clipping it per example keeps SGD stable (the loss is unchanged where
            // |e^η - y| <= POISSON_GRADIENT_BOUND).
            DemandLoss::Poisson => (
                (eta.exp() - y).clamp(-POISSON_GRADIENT_BOUND, POISSON_GRADIENT_BOUND),
                f64::from(eta.exp() - y * eta),
            ),
            DemandLoss::Log1pSquared => {
                let e = eta - y.ln_1p();
                (e, 0.5 * f64::from(e * e))
            }
            DemandLoss::Log1pAbsolute => {
                let e = eta - y.ln_1p();
                (e.signum() * f32::from(e != 0.0), f64::from(e.abs()))
            }
        };
        let s = &data.series[si];
        if self.spec.hidden_units > 0 {
            self.network_step(global, x, s.group, grad, lr);
        }
        global[0] -= lr * grad;
        for (w, xi) in global[1..x.len()].iter_mut().zip(&x[1..]) {
            *w -= lr * (grad * xi + reg * *w);
        }
        let width = self.spec.group_width();
        let block = &mut global[self.spec.group_at(s.group)..][..width];
        block[0] -= lr * (grad + reg * block[0]);
        for (c, xi) in block[1..].iter_mut().zip(&x[FIXED..]) {
            *c -= lr * (grad * xi + reg * *c);
        }
        if self.spec.relative_to_recent {
            return fit;
        }
        let a = &mut local.store_level[s.store as usize];
        *a -= lr * (grad + reg * *a);
        let a = &mut local.series_level[si];
        *a -= lr * (grad + reg * *a);
        let k = 2 * self.spec.harmonics as usize;
        for (u, xi) in local.series_season[si * k..(si + 1) * k].iter_mut().zip(&x[FIXED..]) {
            *u -= lr * (grad * xi + personal_reg * *u);
        }
        let w = self.n_weights();
        let own = &mut local.store_weights[s.store as usize * w..(s.store as usize + 1) * w];
        for (u, xi) in own.iter_mut().zip(&x[1..]) {
            *u -= lr * (grad * xi + personal_reg * *u);
        }
        fit
    }

    /// The gradient of [`DemandModel::example_loss`] with respect to the global and the local
    /// parameters, obtained as the change of one SGD step with unit learning rate (so it tests
    /// the step).
    pub fn gradient(
        &self,
        global: &[f32],
        local: &DemandLocal,
        data: &DemandData,
        si: usize,
        t: usize,
    ) -> (Vec<f32>, DemandLocal) {
        let unit = DemandModel { spec: DemandSpec { learning_rate: 1.0, ..self.spec.clone() } };
        let (mut g, mut l) = (global.to_vec(), local.clone());
        let x = self.training_features(data, si, t);
        let personal = self.personal_regularization(data)[data.series[si].store as usize];
        unit.sgd_step(&mut g, &mut l, data, si, t, &x, personal, 1.0);
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| a - b).collect();
        (
            diff(global, &g),
            DemandLocal {
                store_level: diff(&local.store_level, &l.store_level),
                series_level: diff(&local.series_level, &l.series_level),
                series_season: diff(&local.series_season, &l.series_season),
                store_weights: diff(&local.store_weights, &l.store_weights),
            },
        )
    }

    /// Runs the rolling-origin evaluation with `forecast(series index, origin, out)` filling
    /// the forecasts of weeks `origin + 1 ..= origin + out.len()`.
    fn rolling_origin(
        &self,
        data: &DemandData,
        mut forecast: impl FnMut(usize, usize, &mut [f32]),
    ) -> EvalSums {
        let (start, n) = (self.test_start(data), data.n_weeks());
        let horizon = self.spec.horizon as usize;
        let mut sums = EvalSums::default();
        let mut out = vec![0.0; horizon];
        for (si, s) in data.series.iter().enumerate() {
            // Origins whose forecasts reach a test week: start - horizon ..= n - 2.
            for origin in start.saturating_sub(horizon).max(s.start)..n.saturating_sub(1) {
                let steps = horizon.min(n - 1 - origin);
                forecast(si, origin, &mut out[..steps]);
                for (h, &f) in out[..steps].iter().enumerate() {
                    let week = origin + 1 + h;
                    if week >= start {
                        sums.add_forecast(f, s.units[week]);
                    }
                }
            }
        }
        sums
    }

    /// Rolling-origin evaluation of a naive forecaster (the baselines).
    pub fn evaluate_naive(&self, data: &DemandData, naive: Naive) -> EvalSums {
        let start = self.test_start(data);
        let medians: Vec<f32> = match naive {
            Naive::HindsightMedian => data
                .series
                .iter()
                .map(|s| {
                    let mut test: Vec<f32> = s.units[start.max(s.start)..].to_vec();
                    test.sort_by(f32::total_cmp);
                    test.get(test.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
                })
                .collect(),
            _ => Vec::new(),
        };
        self.rolling_origin(data, |si, origin, out| {
            let (y, first) = (&data.series[si].units, data.series[si].start);
            for (h, f) in out.iter_mut().enumerate() {
                let week = origin + 1 + h;
                *f = match naive {
                    // Without a year of history: the last observed week.
                    Naive::Seasonal if week >= first + 52 => y[week - 52],
                    Naive::Seasonal => y[origin],
                    Naive::MovingAverage(w) => {
                        let from = (origin + 1).saturating_sub(w).max(first);
                        y[from..=origin].iter().sum::<f32>() / (origin + 1 - from) as f32
                    }
                    Naive::HindsightMedian => medians[si],
                };
            }
        })
    }

    /// What a store sends in a round of a task whose server step computes the model
    /// ([`DemandSpec::uploads_statistics`]): [`DemandModel::tree_histograms`] or
    /// [`DemandModel::lad_statistics`] at the fetched model `global`, and the number of
    /// examples.
    ///
    /// # Panics
    ///
    /// If the model has neither trees nor LAD, or `global` has the wrong length.
    pub fn store_statistics(&self, global: &[f32], data: &DemandData) -> (Vec<f32>, usize) {
        if self.spec.lad.is_some() {
            return self.lad_statistics(global, data);
        }
        self.tree_histograms(global, data)
    }

    /// The server step of such a task: [`DemandModel::tree_server_step`] or
    /// [`DemandModel::lad_server_step`], the change of `global` from the round's averaged
    /// uploads `mean`.
    ///
    /// # Panics
    ///
    /// If the model has neither trees nor LAD, or a length is wrong.
    pub fn server_step(&self, global: &[f32], mean: &[f32]) -> Vec<f32> {
        if self.spec.lad.is_some() {
            return self.lad_server_step(global, mean);
        }
        self.tree_server_step(global, mean)
    }

    /// Trains for `epochs` epochs as if `epochs_before` had already run: epoch `e` (counted
    /// from the start of training) steps with `learning_rate / (1 + e / 10)`. A store in a
    /// federated task passes the epochs of the rounds before (the model version times the
    /// local epochs), so every store decays in step.
    pub fn train_from(
        &self,
        global: &mut [f32],
        local: &mut DemandLocal,
        data: &DemandData,
        epochs: u32,
        epochs_before: u64,
        rng: &mut dyn Rng,
    ) -> TrainStats {
        let start = self.test_start(data);
        let width = self.spec.group_offset();
        // Features depend on the data only (lags are actual values): compute them once.
        let mut examples: Vec<(u32, u32)> = Vec::new();
        let mut features = Vec::new();
        let mut x = vec![0.0; width];
        for (si, s) in data.series.iter().enumerate() {
            for t in s.start + 1..start {
                let hist = History { series: s, origin: t - 1, forecasts: &[] };
                self.features(&hist, data.first_week, t, &mut x);
                examples.push((si as u32, t as u32));
                features.extend_from_slice(&x);
            }
        }
        let personal = self.personal_regularization(data);
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut loss = 0.0;
        for epoch in 0..epochs {
            order.shuffle(rng);
            loss = 0.0;
            let decay = 1.0 / (1.0 + (epochs_before + u64::from(epoch)) as f32 / DECAY_EPOCHS);
            for &k in &order {
                let (si, t) = examples[k];
                let x = &features[k * width..(k + 1) * width];
                let personal = personal[data.series[si as usize].store as usize];
                loss +=
                    self.sgd_step(global, local, data, si as usize, t as usize, x, personal, decay);
            }
        }
        let n = examples.len();
        TrainStats { n_examples: n, mean_loss: if n == 0 { 0.0 } else { loss / n as f64 } }
    }
}

impl Model for DemandModel {
    type Data = DemandData;
    type Local = DemandLocal;

    fn n_global(&self) -> usize {
        self.spec.n_global()
    }

    /// All zeros but the network's input weights (normal, standard deviation `1/√inputs`, from
    /// `rng`): a forecast of one unit (Poisson) or none (log), or of the recent level
    /// ([`DemandSpec::relative_to_recent`]), as the network's output weights start at zero.
    fn init_global(&self, rng: &mut dyn Rng) -> Vec<f32> {
        let mut global = vec![0.0; self.n_global()];
        // Trees start with none grown, LAD at the moving average.
        if self.spec.uploads_statistics() {
            return global;
        }
        let n_in = self.spec.network_inputs();
        let normal = rand_distr::Normal::new(0.0, 1.0 / (n_in as f32).sqrt())
            .expect("a positive standard deviation");
        let h = self.spec.hidden_units as usize;
        let weights = &mut global[self.spec.network_offset()..][..h * (n_in + 1)];
        for (k, w) in weights.iter_mut().enumerate() {
            if k % (n_in + 1) != n_in {
                *w = rand_distr::Distribution::sample(&normal, rng);
            }
        }
        global
    }

    fn init_local(&self, data: &DemandData, previous: Option<DemandLocal>) -> DemandLocal {
        if let Some(prev) = previous
            && prev.store_level.len() == data.n_stores
            && prev.series_level.len() == data.series.len()
            && prev.series_season.len() == data.series.len() * 2 * self.spec.harmonics as usize
            && prev.store_weights.len() == data.n_stores * self.n_weights()
        {
            return prev;
        }
        DemandLocal {
            store_level: vec![0.0; data.n_stores],
            series_level: vec![0.0; data.series.len()],
            series_season: vec![0.0; data.series.len() * 2 * self.spec.harmonics as usize],
            store_weights: vec![0.0; data.n_stores * self.n_weights()],
        }
    }

    /// [`DemandModel::train_from`] from the first epoch; with trees, every level not yet grown
    /// is grown from `data` alone (`epochs` is unused); with LAD, `epochs` IRLS steps.
    fn train(
        &self,
        global: &mut [f32],
        local: &mut DemandLocal,
        data: &DemandData,
        epochs: u32,
        rng: &mut dyn Rng,
    ) -> TrainStats {
        if self.spec.trees.is_some() {
            let (n_examples, mean_loss) = self.train_trees(global, data);
            return TrainStats { n_examples, mean_loss };
        }
        if self.spec.lad.is_some() {
            let (n_examples, mean_loss) = self.train_lad(global, data, epochs);
            return TrainStats { n_examples, mean_loss };
        }
        self.train_from(global, local, data, epochs, 0, rng)
    }

    /// Rolling-origin WAPE and MAE sums over the test weeks (module docs); `seed` is unused.
    fn evaluate(
        &self,
        global: &[f32],
        local: &DemandLocal,
        data: &DemandData,
        _seed: u64,
    ) -> EvalSums {
        if self.spec.lad.is_some() {
            return self.evaluate_lad(global, data);
        }
        let mut x = vec![0.0; self.spec.group_offset()];
        let mut buffer = Vec::new();
        self.rolling_origin(data, |si, origin, out| {
            buffer.clear();
            for h in 0..out.len() {
                let hist = History { series: &data.series[si], origin, forecasts: &buffer };
                self.features(&hist, data.first_week, origin + 1 + h, &mut x);
                let f = self.forecast(self.eta(global, local, data, si, &x));
                buffer.push(f);
            }
            out.copy_from_slice(&buffer);
        })
    }
}
