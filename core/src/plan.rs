//! A task's specification: which model, and how rounds run. Plain validated data.
//!
//! This is a persisted and configuration format (TOML in the coordinator's config, JSON in its
//! store), so it derives serde. `TaskSpec::validate` is the one place that checks it.

use crate::model::demand::DemandSpec;
use crate::model::mf::MfSpec;
use crate::optim::ServerOptimizer;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

/// A task spec that does not make sense.
#[derive(Debug, Error, PartialEq)]
#[error("invalid task spec: {field}: {message}")]
pub struct SpecError {
    /// The offending field, dotted (`plan.min_clients`).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError { field, message: message.into() }
}

/// Which model a task trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// The matrix-factorisation recommender ([`crate::model::mf`]).
    MatrixFactorization(MfSpec),
    /// An opaque parameter vector that clients do not train: for transport benchmarks.
    Bench {
        /// Parameter count.
        n_params: usize,
    },
    /// Weekly demand forecasting ([`crate::model::demand`]).
    Demand(DemandSpec),
}

impl ModelSpec {
    /// Number of global (federated) parameters.
    pub fn n_params(&self) -> usize {
        match self {
            ModelSpec::MatrixFactorization(mf) => mf.n_global(),
            ModelSpec::Bench { n_params } => *n_params,
            ModelSpec::Demand(d) => d.n_global(),
        }
    }
}

/// How a task's rounds run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingPlan {
    /// Rounds to commit before the task finishes.
    pub rounds: u64,
    /// Clients sampled per round, uniformly without replacement from the connected ones.
    pub cohort_size: u32,
    /// Quorum: a round fails unless this many clients ack the plan and upload.
    pub min_clients: u32,
    /// Local epochs per round.
    #[serde(default = "one")]
    pub local_epochs: u32,
    /// L2 norm every update is clipped to, by the client, and checked by the coordinator.
    pub clip_norm: f32,
    /// How the averaged delta is applied.
    pub server_optimizer: ServerOptimizer,
    /// Evaluate every this many rounds, and always after the last; 0 means only after the last.
    #[serde(default)]
    pub eval_every: u32,
    /// Fraction of connected clients asked to evaluate, in (0, 1].
    #[serde(default = "one_f32")]
    pub eval_fraction: f32,
    /// How long Selecting waits for `cohort_size` clients before settling for `min_clients`.
    #[serde(default = "ten_secs")]
    pub select_timeout_secs: f64,
    /// Deadline for the cohort to fetch the plan.
    #[serde(default = "sixty_secs")]
    pub configure_timeout_secs: f64,
    /// Deadline for uploads.
    #[serde(default = "sixty_secs")]
    pub collect_timeout_secs: f64,
    /// Deadline for evaluation reports.
    #[serde(default = "sixty_secs")]
    pub evaluate_timeout_secs: f64,
    /// Seed of the coordinator's model initialisation and cohort sampling.
    #[serde(default)]
    pub seed: u64,
    /// Weight updates by the clients' example counts (FedAvg) or equally.
    #[serde(default = "yes")]
    pub weight_by_examples: bool,
    /// Whether the coordinator sees each store's update (`off`) or only the cohort's sum
    /// (`secagg+`: [`crate::secagg`]).
    #[serde(default)]
    pub secure_aggregation: SecureAggregation,
}

/// How a round's updates are summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecureAggregation {
    /// Each store's update reaches the coordinator, which sums them.
    #[default]
    #[serde(rename = "off")]
    Off,
    /// SecAgg+ (Bell et al. 2020): stores upload masked integers; the coordinator learns only
    /// their sum.
    #[serde(rename = "secagg+")]
    SecAggPlus,
}

impl SecureAggregation {
    /// Whether updates are masked.
    pub fn is_on(self) -> bool {
        self == SecureAggregation::SecAggPlus
    }
}

fn one() -> u32 {
    1
}
fn one_f32() -> f32 {
    1.0
}
fn ten_secs() -> f64 {
    10.0
}
fn sixty_secs() -> f64 {
    60.0
}
fn yes() -> bool {
    true
}

impl TrainingPlan {
    /// A plan of `rounds` rounds of `cohort_size` clients with quorum `min_clients` and clipping
    /// norm `clip_norm`; everything else at its default (FedAvg with learning rate 1, one local
    /// epoch, evaluation after the last round, example weights, no secure aggregation).
    pub fn new(rounds: u64, cohort_size: u32, min_clients: u32, clip_norm: f32) -> TrainingPlan {
        TrainingPlan {
            rounds,
            cohort_size,
            min_clients,
            local_epochs: 1,
            clip_norm,
            server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
            eval_every: 0,
            eval_fraction: 1.0,
            select_timeout_secs: ten_secs(),
            configure_timeout_secs: sixty_secs(),
            collect_timeout_secs: sixty_secs(),
            evaluate_timeout_secs: sixty_secs(),
            seed: 0,
            weight_by_examples: true,
            secure_aggregation: SecureAggregation::Off,
        }
    }

    /// [`TrainingPlan::select_timeout_secs`] as a duration.
    pub fn select_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.select_timeout_secs)
    }
    /// [`TrainingPlan::configure_timeout_secs`] as a duration.
    pub fn configure_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.configure_timeout_secs)
    }
    /// [`TrainingPlan::collect_timeout_secs`] as a duration.
    pub fn collect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.collect_timeout_secs)
    }
    /// [`TrainingPlan::evaluate_timeout_secs`] as a duration.
    pub fn evaluate_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.evaluate_timeout_secs)
    }

    /// Whether the round with 1-based index `n` (of `rounds`) evaluates.
    pub fn evaluates_round(&self, n: u64) -> bool {
        n == self.rounds || (self.eval_every > 0 && n.is_multiple_of(u64::from(self.eval_every)))
    }
}

/// A training task: a named model and plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique name clients enrol with.
    pub name: String,
    /// The model.
    pub model: ModelSpec,
    /// The plan.
    pub plan: TrainingPlan,
    /// Differential privacy, if the task has it.
    #[serde(default)]
    pub privacy: Option<crate::privacy::PrivacySpec>,
}

impl TaskSpec {
    /// The ranking recommender under customer-level privacy: its uploads carry statistics
    /// beside the model's coordinates ([`crate::model::mf::MfModel::ranking_server_step`]).
    fn ranking_statistics(&self) -> Option<crate::model::mf::MfModel> {
        match (&self.model, &self.privacy) {
            (ModelSpec::MatrixFactorization(mf), Some(p))
                if p.unit == crate::privacy::PrivacyUnit::Customer
                    && matches!(mf.objective, crate::model::mf::Objective::Ranking { .. }) =>
            {
                Some(crate::model::mf::MfModel::new(mf.clone()))
            }
            _ => None,
        }
    }

    /// Demand trees or LAD: their uploads are statistics (histograms, sufficient statistics),
    /// and a server step computes the model from them
    /// ([`crate::model::demand::DemandModel::server_step`]).
    fn demand_statistics(&self) -> Option<crate::model::demand::DemandModel> {
        match &self.model {
            ModelSpec::Demand(d) if d.uploads_statistics() => {
                Some(crate::model::demand::DemandModel::new(d.clone()))
            }
            _ => None,
        }
    }

    /// Length of a store's upload: the model's parameters, then any statistics the model's
    /// server step reads (the ranking recommender's under customer-level privacy); for demand
    /// trees a histogram, for demand LAD its statistics.
    pub fn upload_len(&self) -> usize {
        match self.demand_statistics() {
            Some(demand) => demand.spec().upload_len(),
            None => {
                self.ranking_statistics().map_or(self.model.n_params(), |m| m.customer_upload_len())
            }
        }
    }

    /// The change of the model from `mean`, the (noised) sum of the uploads divided by the
    /// round's divisor (length [`TaskSpec::upload_len`]), at model `global`: `mean` itself for
    /// most tasks; for the ranking recommender under customer-level privacy, the pure server
    /// step that forms the unobserved items' term from the statistics; for demand trees, the
    /// step that grows the next level from the summed histograms; for demand LAD, the solve of
    /// the reweighted system.
    ///
    /// # Panics
    ///
    /// If a length is wrong.
    pub fn model_delta(&self, global: &[f32], mean: Vec<f32>) -> Vec<f32> {
        if let Some(demand) = self.demand_statistics() {
            return demand.server_step(global, &mean);
        }
        match self.ranking_statistics() {
            Some(model) => model.ranking_server_step(global, &mean),
            None => {
                assert_eq!(mean.len(), global.len(), "upload has the wrong length");
                mean
            }
        }
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`SpecError`] naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(bad("name", "must be 1 to 128 characters"));
        }
        match &self.model {
            ModelSpec::MatrixFactorization(mf) => mf.validate()?,
            ModelSpec::Demand(d) => d.validate()?,
            ModelSpec::Bench { n_params } => {
                if *n_params == 0 || *n_params > 1 << 30 {
                    return Err(bad(
                        "model.n_params",
                        format!("must be in 1..=2^30, got {n_params}"),
                    ));
                }
            }
        }
        let p = &self.plan;
        if p.rounds == 0 {
            return Err(bad("plan.rounds", "must be at least 1"));
        }
        if p.min_clients == 0 {
            return Err(bad("plan.min_clients", "must be at least 1"));
        }
        if p.cohort_size < p.min_clients {
            return Err(bad(
                "plan.cohort_size",
                format!("{} is below min_clients {}", p.cohort_size, p.min_clients),
            ));
        }
        if p.local_epochs == 0 {
            return Err(bad("plan.local_epochs", "must be at least 1"));
        }
        if !(p.clip_norm > 0.0 && p.clip_norm.is_finite()) {
            return Err(bad(
                "plan.clip_norm",
                format!("must be positive and finite, got {}", p.clip_norm),
            ));
        }
        p.server_optimizer.validate().map_err(|m| bad("plan.server_optimizer", m))?;
        if self.demand_statistics().is_some() {
            // The server step writes the next model; the optimiser must apply it as it is, and
            // a histogram (or a store's statistics) sums over examples already.
            if p.server_optimizer != (ServerOptimizer::FedAvg { learning_rate: 1.0 }) {
                return Err(bad(
                    "plan.server_optimizer",
                    "trees and LAD need FedAvg with learning rate 1",
                ));
            }
            if p.weight_by_examples {
                return Err(bad(
                    "plan.weight_by_examples",
                    "trees and LAD sum statistics: set weight_by_examples = false",
                ));
            }
        }
        if !(p.eval_fraction > 0.0 && p.eval_fraction <= 1.0) {
            return Err(bad(
                "plan.eval_fraction",
                format!("must be in (0, 1], got {}", p.eval_fraction),
            ));
        }
        if let Some(privacy) = &self.privacy {
            if !(privacy.target_epsilon > 0.0 && privacy.target_epsilon.is_finite()) {
                return Err(bad(
                    "privacy.target_epsilon",
                    format!("must be positive, got {}", privacy.target_epsilon),
                ));
            }
            if !(privacy.delta > 0.0 && privacy.delta < 1.0) {
                return Err(bad(
                    "privacy.delta",
                    format!("must be in (0, 1), got {}", privacy.delta),
                ));
            }
            if !(privacy.sampling_rate > 0.0 && privacy.sampling_rate <= 1.0) {
                return Err(bad(
                    "privacy.sampling_rate",
                    format!("must be in (0, 1], got {}", privacy.sampling_rate),
                ));
            }
            if privacy.unit == crate::privacy::PrivacyUnit::Customer {
                if !matches!(self.model, ModelSpec::MatrixFactorization(_)) {
                    return Err(bad(
                        "privacy.unit",
                        "customer-level privacy needs a model with customers (the recommender)",
                    ));
                }

                if privacy.population.is_none_or(|n| n == 0) {
                    return Err(bad(
                        "privacy.population",
                        "customer-level privacy needs the number of customers across stores",
                    ));
                }
            }
            if let Some(a) = &privacy.adaptive_clipping {
                if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                    return Err(bad(
                        "privacy.adaptive_clipping.target_quantile",
                        format!("must be in (0, 1), got {}", a.target_quantile),
                    ));
                }
                if !(a.learning_rate > 0.0 && a.learning_rate.is_finite()) {
                    return Err(bad(
                        "privacy.adaptive_clipping.learning_rate",
                        format!("must be positive, got {}", a.learning_rate),
                    ));
                }
                if !(a.count_noise_std > 0.0 && a.count_noise_std.is_finite()) {
                    return Err(bad(
                        "privacy.adaptive_clipping.count_noise_std",
                        format!("must be positive, got {}", a.count_noise_std),
                    ));
                }
                if let Some(z) = privacy.noise_multiplier
                    && a.update_noise_multiplier(z).is_none()
                {
                    return Err(bad(
                        "privacy.adaptive_clipping.count_noise_std",
                        format!(
                            "2 x {} must exceed the noise multiplier {z}: the count would spend the whole budget",
                            a.count_noise_std
                        ),
                    ));
                }
            }
            if let Some(z) = privacy.noise_multiplier
                && !(z > 0.0 && z.is_finite())
            {
                return Err(bad("privacy.noise_multiplier", format!("must be positive, got {z}")));
            }
            if privacy.max_stores_per_customer == 0 || privacy.max_stores_per_customer > 10_000 {
                return Err(bad(
                    "privacy.max_stores_per_customer",
                    format!("must be in 1..=10000, got {}", privacy.max_stores_per_customer),
                ));
            }
            if !(privacy.evaluation_epsilon > 0.0 && privacy.evaluation_epsilon.is_finite()) {
                return Err(bad(
                    "privacy.evaluation_epsilon",
                    format!("must be positive, got {}", privacy.evaluation_epsilon),
                ));
            }
            if let Some(z) = privacy.evaluation_noise_multiplier
                && !(z > 0.0 && z.is_finite())
            {
                return Err(bad(
                    "privacy.evaluation_noise_multiplier",
                    format!("must be positive, got {z}"),
                ));
            }
            if p.weight_by_examples {
                return Err(bad(
                    "plan.weight_by_examples",
                    "must be false under differential privacy: example counts would weight the sum by private data",
                ));
            }
            use crate::privacy::NoisePlacement;
            match privacy.noise_placement {
                NoisePlacement::Distributed if !p.secure_aggregation.is_on() => {
                    return Err(bad(
                        "privacy.noise_placement",
                        "distributed noise needs plan.secure_aggregation = \"secagg+\": without it \
                         the coordinator sees each store's update with only its share of the noise",
                    ));
                }
                NoisePlacement::Local if p.secure_aggregation.is_on() => {
                    return Err(bad(
                        "privacy.noise_placement",
                        "local noise under secure aggregation adds noise nobody sees; use distributed",
                    ));
                }
                _ => {}
            }
            if p.secure_aggregation.is_on() && privacy.adaptive_clipping.is_some() {
                return Err(bad(
                    "privacy.adaptive_clipping",
                    "is not available under secure aggregation yet (the unclipped counts would \
                     need their own secure sum)",
                ));
            }
        }
        if p.secure_aggregation.is_on() {
            if p.weight_by_examples {
                return Err(bad(
                    "plan.weight_by_examples",
                    "must be false under secure aggregation: the coordinator sees only the sum",
                ));
            }
            if p.min_clients < 3 {
                return Err(bad(
                    "plan.min_clients",
                    "must be at least 3 under secure aggregation: with two, each store could \
                     subtract its own update from the sum",
                ));
            }
            if self.upload_len() > 1 << 26 {
                return Err(bad("model", "has more than 2^26 coordinates for secure aggregation"));
            }
        }
        for (field, secs) in [
            ("plan.select_timeout_secs", p.select_timeout_secs),
            ("plan.configure_timeout_secs", p.configure_timeout_secs),
            ("plan.collect_timeout_secs", p.collect_timeout_secs),
            ("plan.evaluate_timeout_secs", p.evaluate_timeout_secs),
        ] {
            if !(secs > 0.0 && secs <= 86_400.0) {
                return Err(bad(field, format!("must be in (0, 86400] seconds, got {secs}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> TaskSpec {
        TaskSpec {
            name: "t".into(),
            model: ModelSpec::Bench { n_params: 4 },
            privacy: None,
            plan: TrainingPlan {
                rounds: 3,
                cohort_size: 3,
                min_clients: 2,
                local_epochs: 1,
                clip_norm: 1.0,
                server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
                eval_every: 0,
                eval_fraction: 1.0,
                select_timeout_secs: 1.0,
                configure_timeout_secs: 1.0,
                collect_timeout_secs: 1.0,
                evaluate_timeout_secs: 1.0,
                seed: 0,
                weight_by_examples: true,
                secure_aggregation: Default::default(),
            },
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(spec().validate(), Ok(()));
        let mut s = spec();
        s.plan.min_clients = 4;
        assert_eq!(s.validate().unwrap_err().field, "plan.cohort_size");
        let mut s = spec();
        s.plan.clip_norm = f32::NAN;
        assert_eq!(s.validate().unwrap_err().field, "plan.clip_norm");
        let mut s = spec();
        s.plan.collect_timeout_secs = -1.0;
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "invalid task spec: plan.collect_timeout_secs: must be in (0, 86400] seconds, got -1"
        );
    }

    /// Issue 12: distributed noise only under secure aggregation (H2, H3), and what secure
    /// aggregation cannot do (weights by example counts, fewer than three stores, adaptive
    /// clipping, local noise) is refused at creation.
    #[test]
    fn secure_aggregation_rules_are_checked_at_creation() {
        use crate::privacy::{AdaptiveClipping, NoisePlacement, PrivacySpec};
        let private = |placement| {
            let mut s = spec();
            s.plan.weight_by_examples = false;
            s.plan.cohort_size = 5;
            s.plan.min_clients = 3;
            s.privacy = Some(PrivacySpec {
                noise_placement: placement,
                ..PrivacySpec::client_level(8.0, 1e-5, 1.0)
            });
            s
        };
        let field = |s: &TaskSpec| s.validate().unwrap_err().field;
        assert_eq!(field(&private(NoisePlacement::Distributed)), "privacy.noise_placement");
        let mut s = private(NoisePlacement::Distributed);
        s.plan.secure_aggregation = SecureAggregation::SecAggPlus;
        assert_eq!(s.validate(), Ok(()));
        s.privacy.as_mut().unwrap().noise_placement = NoisePlacement::Local;
        assert_eq!(field(&s), "privacy.noise_placement");
        s.privacy.as_mut().unwrap().noise_placement = NoisePlacement::Central;
        assert_eq!(s.validate(), Ok(()));
        s.privacy.as_mut().unwrap().adaptive_clipping = Some(AdaptiveClipping {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_std: 10.0,
        });
        assert_eq!(field(&s), "privacy.adaptive_clipping");
        let mut plain = spec();
        plain.plan.secure_aggregation = SecureAggregation::SecAggPlus;
        assert_eq!(field(&plain), "plan.weight_by_examples");
        plain.plan.weight_by_examples = false;
        assert_eq!(field(&plain), "plan.min_clients");
        plain.plan.min_clients = 3;
        assert_eq!(plain.validate(), Ok(()));
    }

    #[test]
    fn evaluation_schedule_includes_the_last_round() {
        let mut p = spec().plan;
        p.rounds = 10;
        p.eval_every = 4;
        let evals: Vec<u64> = (1..=10).filter(|&n| p.evaluates_round(n)).collect();
        assert_eq!(evals, vec![4, 8, 10]);
    }
}
