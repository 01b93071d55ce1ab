//! Privacy mechanisms: clipping, and the Rényi-DP accountant that turns a ledger of rounds into
//! an (ε, δ) guarantee.

pub mod accountant;
mod clip;
pub mod noise;
pub mod sampling;

pub use clip::{ClippedUpdate, clip};

use serde::{Deserialize, Serialize};

/// Whom a task's guarantee protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyUnit {
    /// Each store or device (DP-FedAvg, McMahan et al. 2018): a client's whole update is clipped.
    Client,
}

/// Where the Gaussian noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoisePlacement {
    /// At the coordinator, once per round, to the sum of clipped updates.
    Central,
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
