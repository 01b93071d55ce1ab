//! The store's own privacy policy: what it agrees to take part in, whatever the coordinator
//! says, checked against the task at enrolment and against every assignment before it trains.
//!
//! `fedretail-client --policy FILE` reads it (TOML; `store-policy.toml` beside this crate is a
//! documented example); without one, [`StorePolicy::default`] applies: strict.

use fedretail_core::plan::{ModelSpec, TaskSpec};
use fedretail_core::privacy::{NoisePlacement, PrivacyUnit, TrainPrivacy};
use serde::Deserialize;

/// A store's privacy policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorePolicy {
    /// Whether to join tasks without differential privacy (default: no).
    #[serde(default)]
    pub allow_without_privacy: bool,
    /// The privacy units the store accepts.
    #[serde(default = "both_units")]
    pub units: Vec<PrivacyUnit>,
    /// The most ε the store spends on one task (its own ledger, composed by RDP).
    #[serde(default = "ten")]
    pub max_epsilon_per_task: f64,
    /// The most ε the store spends over any 365 days, across every task and coordinator.
    #[serde(default = "twenty")]
    pub max_epsilon_per_year: f64,
    /// The largest δ; also the δ of the yearly total.
    #[serde(default = "delta")]
    pub max_delta: f64,
    /// The smallest noise multiplier a task may use.
    #[serde(default = "half")]
    pub min_noise_multiplier: f64,
    /// The largest clipping norm.
    #[serde(default = "ten")]
    pub max_clip_norm: f64,
    /// The largest sampling rate q.
    #[serde(default = "one")]
    pub max_sampling_rate: f64,
    /// The smallest quorum (`plan.min_clients`) a task may have.
    #[serde(default = "two")]
    pub min_cohort: u32,
    /// The most global parameters a task's model may have (larger ones are refused before
    /// anything is allocated).
    #[serde(default = "params")]
    pub max_model_params: usize,
    /// The most local epochs a round may ask for.
    #[serde(default = "epochs")]
    pub max_local_epochs: u32,
    /// Join only tasks under secure aggregation, so the coordinator never sees this store's
    /// update (default: no).
    #[serde(default)]
    pub require_secure_aggregation: bool,
}

fn both_units() -> Vec<PrivacyUnit> {
    vec![PrivacyUnit::Client, PrivacyUnit::Customer]
}
fn ten() -> f64 {
    10.0
}
fn twenty() -> f64 {
    20.0
}
fn delta() -> f64 {
    1e-5
}
fn half() -> f64 {
    0.5
}
fn one() -> f64 {
    1.0
}
fn two() -> u32 {
    2
}
fn params() -> usize {
    50_000_000
}
fn epochs() -> u32 {
    100
}

impl Default for StorePolicy {
    /// Strict: privacy required, ε ≤ 10 per task and 20 a year, δ ≤ 10⁻⁵, z ≥ 0.5, C ≤ 10,
    /// quorums of at least 2 stores, models up to 50 million parameters, 100 local epochs.
    fn default() -> StorePolicy {
        toml::from_str("").expect("every field has a default")
    }
}

/// What the store refuses, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("store policy {rule}: {message}")]
pub struct Refusal {
    /// The rule's name in the policy file.
    pub rule: &'static str,
    /// What was asked against what the rule allows.
    pub message: String,
}

fn refuse<T>(rule: &'static str, message: String) -> Result<T, Refusal> {
    Err(Refusal { rule, message })
}

impl StorePolicy {
    /// The permissive policy the simulator uses: it evaluates plans on data it holds anyway.
    pub fn permissive() -> StorePolicy {
        StorePolicy {
            allow_without_privacy: true,
            units: both_units(),
            max_epsilon_per_task: f64::INFINITY,
            max_epsilon_per_year: f64::INFINITY,
            max_delta: 0.5,
            min_noise_multiplier: 0.0,
            max_clip_norm: f64::INFINITY,
            max_sampling_rate: 1.0,
            min_cohort: 1,
            max_model_params: usize::MAX,
            max_local_epochs: u32::MAX,
            require_secure_aggregation: false,
        }
    }

    /// Parses a policy file.
    ///
    /// # Errors
    ///
    /// The parser's message with line and column, or a value out of range.
    pub fn from_toml(text: &str) -> Result<StorePolicy, String> {
        let policy: StorePolicy = toml::from_str(text).map_err(|e| e.to_string())?;
        if policy.max_delta <= 0.0 || policy.max_delta >= 1.0 || policy.max_delta.is_nan() {
            return Err(format!("max_delta must be in (0, 1), got {}", policy.max_delta));
        }
        if policy.units.is_empty() {
            return Err("units must name at least one unit".into());
        }
        Ok(policy)
    }

    /// Checks a task at enrolment, before anything is allocated for its model.
    ///
    /// # Errors
    ///
    /// The first rule the task breaks.
    pub fn check_task(&self, spec: &TaskSpec) -> Result<(), Refusal> {
        let n = spec.model.n_params();
        if n > self.max_model_params {
            return refuse(
                "max_model_params",
                format!(
                    "the model has {n} parameters; this store allows {}",
                    self.max_model_params
                ),
            );
        }
        if let Err(e) = spec.validate() {
            return refuse("valid_task", e.to_string());
        }
        if self.require_secure_aggregation && !spec.plan.secure_aggregation.is_on() {
            return refuse(
                "require_secure_aggregation",
                "the task sends each store's update to the coordinator; this store requires \
                 secure aggregation"
                    .into(),
            );
        }
        if spec.plan.min_clients < self.min_cohort {
            return refuse(
                "min_cohort",
                format!(
                    "rounds may have {} stores; this store needs at least {}",
                    spec.plan.min_clients, self.min_cohort
                ),
            );
        }
        if spec.plan.local_epochs > self.max_local_epochs {
            return refuse(
                "max_local_epochs",
                format!(
                    "{} local epochs; at most {}",
                    spec.plan.local_epochs, self.max_local_epochs
                ),
            );
        }
        let Some(p) = &spec.privacy else {
            if self.allow_without_privacy || matches!(spec.model, ModelSpec::Bench { .. }) {
                return Ok(());
            }
            return refuse(
                "allow_without_privacy",
                "the task has no differential privacy; this store takes part only in private tasks"
                    .into(),
            );
        };
        if !self.units.contains(&p.unit) {
            return refuse(
                "units",
                format!("the task protects {:?}; this store accepts {:?}", p.unit, self.units),
            );
        }
        if p.delta > self.max_delta {
            return refuse("max_delta", format!("delta {}; at most {}", p.delta, self.max_delta));
        }
        if p.target_epsilon > self.max_epsilon_per_task {
            return refuse(
                "max_epsilon_per_task",
                format!(
                    "the task targets epsilon {}; this store spends at most {} on a task",
                    p.target_epsilon, self.max_epsilon_per_task
                ),
            );
        }
        let z = p.noise_multiplier.unwrap_or(0.0);
        if z.is_nan() || z < self.min_noise_multiplier {
            return refuse(
                "min_noise_multiplier",
                format!("noise multiplier {z}; at least {}", self.min_noise_multiplier),
            );
        }
        if p.sampling_rate > self.max_sampling_rate {
            return refuse(
                "max_sampling_rate",
                format!("sampling rate {}; at most {}", p.sampling_rate, self.max_sampling_rate),
            );
        }
        if f64::from(spec.plan.clip_norm) > self.max_clip_norm {
            return refuse(
                "max_clip_norm",
                format!("clipping norm {}; at most {}", spec.plan.clip_norm, self.max_clip_norm),
            );
        }
        Ok(())
    }

    /// Checks one training assignment against the enrolled task: the coordinator may not
    /// quietly switch privacy off, lower the noise, raise the clipping norm or the sampling
    /// rate, or change the model's size (H6, M4).
    ///
    /// # Errors
    ///
    /// The first rule the assignment breaks.
    pub fn check_assignment(
        &self,
        spec: &TaskSpec,
        n_params: usize,
        local_epochs: u32,
        clip_norm: f32,
        privacy: Option<&TrainPrivacy>,
    ) -> Result<(), Refusal> {
        if n_params != spec.model.n_params() {
            return refuse(
                "model_shape",
                format!(
                    "the assignment has {n_params} parameters; the task's model has {}",
                    spec.model.n_params()
                ),
            );
        }
        if local_epochs == 0 || local_epochs > self.max_local_epochs {
            return refuse(
                "max_local_epochs",
                format!("{local_epochs} local epochs; 1 to {}", self.max_local_epochs),
            );
        }
        if !(clip_norm.is_finite() && clip_norm > 0.0) || f64::from(clip_norm) > self.max_clip_norm
        {
            return refuse(
                "max_clip_norm",
                format!("clipping norm {clip_norm}; (0, {}]", self.max_clip_norm),
            );
        }
        let Some(p) = &spec.privacy else {
            return match privacy {
                None => Ok(()),
                Some(_) => refuse(
                    "consistent_privacy",
                    "privacy parameters for a task without privacy".into(),
                ),
            };
        };
        let Some(t) = privacy else {
            return refuse(
                "consistent_privacy",
                "the assignment of a private task carries no privacy parameters".into(),
            );
        };
        let adaptive = p.adaptive_clipping.is_some();
        if !adaptive && (f64::from(clip_norm) - f64::from(spec.plan.clip_norm)).abs() > 1e-6 {
            return refuse(
                "consistent_privacy",
                format!("clipping norm {clip_norm}; the task's is {}", spec.plan.clip_norm),
            );
        }
        if t.per_customer != (p.unit == PrivacyUnit::Customer) {
            return refuse(
                "consistent_privacy",
                "the assignment's unit differs from the task's".into(),
            );
        }
        if t.per_customer && (t.sampling_rate - p.sampling_rate).abs() > 1e-12 {
            return refuse(
                "consistent_privacy",
                format!(
                    "customer sampling rate {}; the task's is {}",
                    t.sampling_rate, p.sampling_rate
                ),
            );
        }
        let z = p.noise_multiplier.unwrap_or(0.0);
        // Under secure aggregation the store's noise is the round's discrete Gaussian, checked
        // with its parameters (fedretail_core::secagg::round::RoundParams::check).
        let share = match p.noise_placement {
            _ if spec.plan.secure_aggregation.is_on() => 0.0,
            NoisePlacement::Central => 0.0,
            placement => placement.client_share(z * f64::from(clip_norm), spec.plan.min_clients),
        };
        // Adaptive clipping splits the budget; the update's share is then larger, never smaller.
        let enough = t.noise_std.is_finite() && t.noise_std >= share * (1.0 - 1e-6);
        let count_ok = t.count_noise_std.is_finite() && t.count_noise_std >= 0.0;
        if !(enough && count_ok) {
            return refuse(
                "min_noise_multiplier",
                format!(
                    "noise standard deviation {}; the task needs at least {share}",
                    t.noise_std
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_is_the_default() {
        let text = include_str!("../store-policy.toml");
        assert_eq!(StorePolicy::from_toml(text).unwrap(), StorePolicy::default());
        assert!(StorePolicy::from_toml("colour = 1").unwrap_err().contains("unknown field"));
        assert!(StorePolicy::from_toml("units = []").is_err());
    }
}

#[cfg(test)]
mod rules {
    use super::*;
    use fedretail_core::optim::ServerOptimizer;
    use fedretail_core::plan::TrainingPlan;
    use fedretail_core::privacy::PrivacySpec;

    fn p(t: &mut TaskSpec) -> &mut PrivacySpec {
        t.privacy.as_mut().unwrap()
    }

    fn task() -> TaskSpec {
        TaskSpec {
            name: "t".into(),
            model: ModelSpec::Bench { n_params: 100 },
            plan: TrainingPlan {
                rounds: 10,
                cohort_size: 3,
                min_clients: 3,
                local_epochs: 2,
                clip_norm: 1.0,
                server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
                eval_every: 0,
                eval_fraction: 1.0,
                select_timeout_secs: 1.0,
                configure_timeout_secs: 1.0,
                collect_timeout_secs: 1.0,
                evaluate_timeout_secs: 1.0,
                seed: 0,
                weight_by_examples: false,
                secure_aggregation: Default::default(),
            },
            privacy: Some(PrivacySpec {
                noise_multiplier: Some(1.0),
                domain: "d".into(),
                evaluation_noise_multiplier: Some(5.0),
                ..PrivacySpec::client_level(4.0, 1e-6, 0.5)
            }),
        }
    }

    /// Issue 10 (H6): every rule of the store's policy refuses on its own, naming itself.
    #[test]
    fn each_rule_refuses_and_names_itself() {
        let policy = StorePolicy::default();
        policy.check_task(&task()).unwrap();
        let rule = |edit: &dyn Fn(&mut TaskSpec), policy: &StorePolicy| {
            let mut t = task();
            edit(&mut t);
            policy.check_task(&t).unwrap_err().rule
        };
        assert_eq!(
            rule(&|t| t.model = ModelSpec::Bench { n_params: 60_000_000 }, &policy),
            "max_model_params"
        );
        assert_eq!(rule(&|t| t.plan.min_clients = 1, &policy), "min_cohort");
        assert_eq!(rule(&|t| t.plan.local_epochs = 101, &policy), "max_local_epochs");
        // (Benchmark tasks carry no data and may run without privacy; a recommender may not.)
        let mf = ModelSpec::MatrixFactorization(fedretail_core::model::mf::MfSpec {
            n_items: 10,
            dim: 2,
            learning_rate: 0.01,
            regularization: 0.0,
            init_std: 0.1,
            rating_min: 1.0,
            rating_max: 5.0,
            init_mean: 3.0,
            local_item_offsets: None,
            objective: fedretail_core::model::mf::Objective::Rating,
            category_affinity: None,
        });
        assert_eq!(
            rule(
                &|t| {
                    t.privacy = None;
                    t.model = mf.clone();
                },
                &policy
            ),
            "allow_without_privacy"
        );
        let clients_only =
            StorePolicy { units: vec![PrivacyUnit::Customer], ..StorePolicy::default() };
        assert_eq!(rule(&|_| {}, &clients_only), "units");
        let secure_only =
            StorePolicy { require_secure_aggregation: true, ..StorePolicy::default() };
        assert_eq!(rule(&|_| {}, &secure_only), "require_secure_aggregation");
        let mut masked = task();
        masked.plan.secure_aggregation = fedretail_core::plan::SecureAggregation::SecAggPlus;
        masked.plan.min_clients = 3;
        masked.plan.cohort_size = masked.plan.cohort_size.max(3);
        secure_only.check_task(&masked).unwrap();
        assert_eq!(rule(&|t| p(t).delta = 1e-4, &policy), "max_delta");
        assert_eq!(rule(&|t| p(t).target_epsilon = 11.0, &policy), "max_epsilon_per_task");
        assert_eq!(rule(&|t| p(t).noise_multiplier = Some(0.4), &policy), "min_noise_multiplier");
        let tight_q = StorePolicy { max_sampling_rate: 0.1, ..StorePolicy::default() };
        assert_eq!(rule(&|_| {}, &tight_q), "max_sampling_rate");
        assert_eq!(rule(&|t| t.plan.clip_norm = 11.0, &policy), "max_clip_norm");
        // Each round: the clipping norm and the local epochs are checked again.
        let t = task();
        let privacy = TrainPrivacy {
            per_customer: false,
            sampling_rate: 0.5,
            noise_std: 0.0,
            report_unclipped: false,
            count_noise_std: 0.0,
        };
        policy.check_assignment(&t, 100, 2, 1.0, Some(&privacy)).unwrap();
        assert_eq!(
            policy.check_assignment(&t, 100, 2, 2.0, Some(&privacy)).unwrap_err().rule,
            "consistent_privacy"
        );
        assert_eq!(
            policy.check_assignment(&t, 100, 0, 1.0, Some(&privacy)).unwrap_err().rule,
            "max_local_epochs"
        );
        assert_eq!(
            policy.check_assignment(&t, 100, 2, f32::NAN, Some(&privacy)).unwrap_err().rule,
            "max_clip_norm"
        );
    }
}
