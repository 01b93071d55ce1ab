//! Privacy mechanisms: clipping, and the Rényi-DP accountant that turns a ledger of rounds into
//! an (ε, δ) guarantee.

pub mod accountant;
mod clip;
mod contribution;
pub mod evaluation;
pub mod noise;
pub mod release;
pub mod sampling;

pub use clip::{ClippedUpdate, clip};
pub use contribution::Contribution;

use serde::{Deserialize, Serialize};

/// Whom a task's guarantee protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyUnit {
    /// Each store or device (DP-FedAvg, McMahan et al. 2018): a client's whole update is clipped.
    Client,
    /// Each customer inside a store: the store sums one clipped contribution per sampled
    /// customer ([`crate::model::mf::CustomerSum`]).
    Customer,
}

/// Where the Gaussian noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoisePlacement {
    /// At the coordinator, once per round, to the sum of clipped updates. The coordinator is
    /// trusted with the un-noised updates.
    Central,
    /// Each client adds a share: noise of standard deviation `z·C / sqrt(min_clients)`, so any
    /// round that reaches its quorum carries at least the full `z·C` in its sum. Dropouts above
    /// the quorum only add noise; a round below it fails and releases nothing.
    Distributed,
    /// Each client adds the full `z·C` to its own contribution (for comparison: the sum carries
    /// n times the variance it needs).
    Local,
}

impl NoisePlacement {
    /// Standard deviation of the noise one client adds to its contribution, given the round's
    /// `z·C` and the quorum; 0 when the coordinator adds the noise.
    pub fn client_share(self, round_std: f64, min_clients: u32) -> f64 {
        match self {
            NoisePlacement::Central => 0.0,
            NoisePlacement::Distributed => round_std / f64::from(min_clients.max(1)).sqrt(),
            NoisePlacement::Local => round_std,
        }
    }
}

/// What differential privacy asks of one client in one round (`TrainPrivacy` on the wire).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainPrivacy {
    /// Customer unit: sum one clipped contribution per Poisson-sampled customer; otherwise clip
    /// the whole update.
    pub per_customer: bool,
    /// Customer unit: the customers' sampling rate.
    pub sampling_rate: f64,
    /// Standard deviation of the noise the client adds to its update (0: the coordinator adds
    /// it).
    pub noise_std: f64,
    /// Adaptive clipping: report the count of unclipped contributions.
    pub report_unclipped: bool,
    /// Noise the client adds to that count.
    pub count_noise_std: f64,
}

/// Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive
/// clipping"): after each round the clipping norm moves geometrically towards the
/// `target_quantile` of the contributions' norms, estimated from noised counts of unclipped
/// contributions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipping {
    /// γ: the fraction of contributions that should stay unclipped (0.5 = median).
    pub target_quantile: f64,
    /// η_C: `C ← C · exp(-η_C (b̄ - γ))`.
    pub learning_rate: f64,
    /// σ_b: standard deviation of the noise on the round's count of unclipped contributions.
    /// The count's sensitivity is 1, so the round's guarantee is that of the Gaussian mechanism
    /// with `z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2)` (Andrew et al., Theorem 1): the task's calibrated z
    /// is split, and the update noise uses `z_Δ` ([`AdaptiveClipping::update_noise_multiplier`]).
    pub count_noise_std: f64,
}

impl AdaptiveClipping {
    /// `z_Δ` such that updates noised with `z_Δ` and counts with `σ_b` together spend exactly
    /// what `z` alone would; `None` when σ_b is too small for any `z_Δ` (`2σ_b ≤ z`).
    pub fn update_noise_multiplier(&self, z: f64) -> Option<f64> {
        let rest = z.powi(-2) - (2.0 * self.count_noise_std).powi(-2);
        (rest > 0.0).then(|| rest.powf(-0.5))
    }

    /// The next clipping norm from this round's noised unclipped fraction `b̄`. A fraction
    /// that is not a number (a client's bad report) keeps the norm: `f64::clamp` would pass
    /// NaN on and every client would then fail to clip (issue 10, H7).
    pub fn next_clip_norm(&self, clip_norm: f32, unclipped_fraction: f64) -> f32 {
        if !unclipped_fraction.is_finite() {
            return clip_norm;
        }
        let next = f64::from(clip_norm)
            * (-self.learning_rate * (unclipped_fraction - self.target_quantile)).exp();
        if next.is_nan() { clip_norm } else { next.clamp(1e-6, 1e6) as f32 }
    }
}

/// A task's differential-privacy settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// The protected unit.
    pub unit: PrivacyUnit,
    /// Where noise is added.
    pub noise_placement: NoisePlacement,
    /// ε the whole task may spend.
    pub target_epsilon: f64,
    /// δ of the guarantee.
    pub delta: f64,
    /// Poisson sampling rate q of clients per round.
    pub sampling_rate: f64,
    /// z, calibrated from the target when the task is created (the smallest z for which
    /// `plan.rounds` rounds stay within `target_epsilon`); `None` until then.
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// Customer unit: the number of customers across all stores, a public figure the operator
    /// states. The round's sum is divided by `q × population`, the expected number of sampled
    /// customers; a data-dependent divisor would leak. A wrong figure only rescales the step.
    #[serde(default)]
    pub population: Option<u64>,
    /// Adaptive clipping; without it the plan's clipping norm is fixed.
    #[serde(default)]
    pub adaptive_clipping: Option<AdaptiveClipping>,
    /// The accountant that calibrates z, enforces the budget and reports ε (default RDP).
    #[serde(default)]
    pub accountant: accountant::AccountantKind,
    /// The privacy domain the task draws on: the data (stores, customers) its guarantee is
    /// about. Every task of a domain charges one ledger, and the coordinator's ceiling bounds
    /// the domain's total, so a new task name is not a new budget.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// The budget of the evaluation metrics, separate from `target_epsilon` (which the model
    /// carries): evaluation sums leave the stores bounded and noised, and every evaluating
    /// round is charged ([`evaluation`]). The privacy report states both and their composition.
    #[serde(default = "default_evaluation_epsilon")]
    pub evaluation_epsilon: f64,
    /// z of the evaluation's Gaussian mechanism, calibrated at creation for the plan's
    /// evaluating rounds; `None` until then.
    #[serde(default)]
    pub evaluation_noise_multiplier: Option<f64>,
    /// Customer unit: the most stores one customer may shop in (loyalty cards across stores).
    /// Each store clips its customers on its own, so a customer in k stores moves a round's
    /// sum by up to k·C: the noise is scaled by k so that the guarantee is per customer, not
    /// per (customer, store) pair (security review M3). Default 1.
    #[serde(default = "one_store")]
    pub max_stores_per_customer: u32,
}

impl PrivacySpec {
    /// Client-level privacy with central noise, the RDP accountant, the default domain and
    /// evaluation budget, and nothing calibrated yet: the base that callers edit.
    pub fn client_level(target_epsilon: f64, delta: f64, sampling_rate: f64) -> PrivacySpec {
        PrivacySpec {
            unit: PrivacyUnit::Client,
            noise_placement: NoisePlacement::Central,
            target_epsilon,
            delta,
            sampling_rate,
            noise_multiplier: None,
            population: None,
            adaptive_clipping: None,
            accountant: accountant::AccountantKind::Rdp,
            domain: default_domain(),
            evaluation_epsilon: default_evaluation_epsilon(),
            evaluation_noise_multiplier: None,
            max_stores_per_customer: 1,
        }
    }
}

fn one_store() -> u32 {
    1
}

/// The evaluation budget of tasks that state none.
pub fn default_evaluation_epsilon() -> f64 {
    1.0
}

/// What a ledger entry paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeKind {
    /// A training round's noised sum.
    Train,
    /// A round's noised evaluation reports.
    Evaluate,
}

impl ChargeKind {
    /// Stable name, as persisted.
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeKind::Train => "train",
            ChargeKind::Evaluate => "evaluate",
        }
    }
}

/// The domain of tasks that name none.
pub fn default_domain() -> String {
    "default".into()
}

/// One round's charge in the ledger: what the accountant needs, and what the report shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LedgerEntry {
    /// The round charged.
    pub round: crate::ids::RoundId,
    /// q.
    pub sampling_rate: f64,
    /// z.
    pub noise_multiplier: f64,
    /// C.
    pub clip_norm: f32,
    /// The unit.
    pub unit: PrivacyUnit,
    /// What the charge paid for.
    pub kind: ChargeKind,
}

impl LedgerEntry {
    /// The entry as an accountant charge of one round.
    pub fn charge(&self) -> accountant::Charge {
        accountant::Charge {
            sampling_rate: self.sampling_rate,
            noise_multiplier: self.noise_multiplier,
            rounds: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10 (H7): a NaN or infinite unclipped fraction (one client's report) never makes
    /// the clipping norm NaN, zero or huge.
    #[test]
    fn adaptive_clipping_ignores_fractions_that_are_not_numbers() {
        let rule =
            AdaptiveClipping { target_quantile: 0.5, learning_rate: 0.2, count_noise_std: 1.0 };
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(rule.next_clip_norm(0.25, bad), 0.25, "{bad}");
        }
        let moved = rule.next_clip_norm(0.25, 0.9);
        assert!(moved < 0.25 && moved.is_finite());
    }
}
