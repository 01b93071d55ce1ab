//! The coordinator's privacy policy (`[policy]` in its config): which tasks it runs at all.
//!
//! A task outside the policy is refused at creation with `FAILED_PRECONDITION`, naming the rule.
//! The ε ceiling also bounds every privacy domain's total: each round's charge is checked
//! against it in the same store transaction that writes it.

use fedretail_core::plan::TaskSpec;
use serde::Deserialize;

/// The policy as configured. Without a `[policy]` section the strict defaults apply.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Whether tasks without differential privacy may run (default: no).
    #[serde(default)]
    pub allow_without_privacy: bool,
    /// The most ε a task may target, and the most a privacy domain may spend in total.
    #[serde(default = "default_max_epsilon")]
    pub max_epsilon: f64,
    /// The largest δ a task may use; also the δ at which domain totals are composed.
    #[serde(default = "default_max_delta")]
    pub max_delta: f64,
    /// The smallest quorum (`plan.min_clients`) a task may have.
    #[serde(default = "default_min_cohort")]
    pub min_cohort: u32,
    /// The most global parameters a task's model may have.
    #[serde(default = "default_max_model_params")]
    pub max_model_params: usize,
    /// The most tasks that may be running or paused at once.
    #[serde(default = "default_max_live_tasks")]
    pub max_live_tasks: usize,
}

fn default_max_epsilon() -> f64 {
    10.0
}
fn default_max_delta() -> f64 {
    1e-5
}
fn default_min_cohort() -> u32 {
    2
}
fn default_max_model_params() -> usize {
    50_000_000
}
fn default_max_live_tasks() -> usize {
    16
}

impl Default for Policy {
    /// The strict policy: privacy required, ε ≤ 10, δ ≤ 10⁻⁵, quorums of at least 2 stores,
    /// models up to 50 million parameters, 16 live tasks.
    fn default() -> Policy {
        Policy {
            allow_without_privacy: false,
            max_epsilon: default_max_epsilon(),
            max_delta: default_max_delta(),
            min_cohort: default_min_cohort(),
            max_model_params: default_max_model_params(),
            max_live_tasks: default_max_live_tasks(),
        }
    }
}

/// A task the policy refuses: the rule and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("policy rule {rule}: {message}")]
pub struct PolicyViolation {
    /// The rule's name in `[policy]`.
    pub rule: &'static str,
    /// What the task asked for against what the rule allows.
    pub message: String,
}

impl Policy {
    /// Allows everything a valid task can ask for: the simulator's, which evaluates plans on
    /// data it holds anyway, and tests'.
    pub fn permissive() -> Policy {
        Policy {
            allow_without_privacy: true,
            max_epsilon: f64::INFINITY,
            max_delta: 0.5,
            min_cohort: 1,
            max_model_params: usize::MAX,
            max_live_tasks: usize::MAX,
        }
    }

    /// Checks the values themselves.
    ///
    /// # Errors
    ///
    /// A message naming the value.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_epsilon.is_nan() || self.max_epsilon <= 0.0 {
            return Err(format!("policy.max_epsilon must be positive, got {}", self.max_epsilon));
        }
        if !(self.max_delta > 0.0 && self.max_delta < 1.0) {
            return Err(format!("policy.max_delta must be in (0, 1), got {}", self.max_delta));
        }
        if self.min_cohort == 0 || self.max_model_params == 0 || self.max_live_tasks == 0 {
            return Err(
                "policy.min_cohort, max_model_params and max_live_tasks must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// Checks a task against every rule; `live` is the number of running or paused tasks.
    ///
    /// # Errors
    ///
    /// The first rule the task breaks.
    pub fn check(&self, spec: &TaskSpec, live: usize) -> Result<(), PolicyViolation> {
        let refuse = |rule, message: String| Err(PolicyViolation { rule, message });
        if live >= self.max_live_tasks {
            return refuse(
                "max_live_tasks",
                format!(
                    "{live} tasks are running or paused; the coordinator allows {}",
                    self.max_live_tasks
                ),
            );
        }
        let n_params = spec.model.n_params();
        if n_params > self.max_model_params {
            return refuse(
                "max_model_params",
                format!(
                    "the model has {n_params} parameters; at most {} are allowed",
                    self.max_model_params
                ),
            );
        }
        if spec.plan.min_clients < self.min_cohort {
            return refuse(
                "min_cohort",
                format!(
                    "the task's quorum (plan.min_clients) is {}; at least {} stores must take part in a round",
                    spec.plan.min_clients, self.min_cohort
                ),
            );
        }
        let Some(privacy) = &spec.privacy else {
            if self.allow_without_privacy {
                return Ok(());
            }
            return refuse(
                "allow_without_privacy",
                "the task has no privacy spec, and this coordinator runs only differentially private tasks".into(),
            );
        };
        if privacy.target_epsilon > self.max_epsilon {
            return refuse(
                "max_epsilon",
                format!(
                    "the task targets epsilon {}; the coordinator allows at most {}",
                    privacy.target_epsilon, self.max_epsilon
                ),
            );
        }
        if privacy.delta > self.max_delta {
            return refuse(
                "max_delta",
                format!(
                    "the task uses delta {}; the coordinator allows at most {}",
                    privacy.delta, self.max_delta
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedretail_core::optim::ServerOptimizer;
    use fedretail_core::plan::{ModelSpec, TrainingPlan};
    use fedretail_core::privacy::accountant::AccountantKind;
    use fedretail_core::privacy::{NoisePlacement, PrivacySpec, PrivacyUnit};

    fn task(privacy: bool) -> TaskSpec {
        TaskSpec {
            name: "t".into(),
            model: ModelSpec::Bench { n_params: 100 },
            plan: TrainingPlan {
                rounds: 10,
                cohort_size: 3,
                min_clients: 3,
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
                weight_by_examples: false,
                secure_aggregation: Default::default(),
            },
            privacy: privacy.then(|| PrivacySpec {
                unit: PrivacyUnit::Client,
                noise_placement: NoisePlacement::Central,
                target_epsilon: 4.0,
                delta: 1e-6,
                sampling_rate: 1.0,
                noise_multiplier: None,
                population: None,
                adaptive_clipping: None,
                accountant: AccountantKind::Rdp,
                domain: "stores".into(),
                evaluation_epsilon: fedretail_core::privacy::default_evaluation_epsilon(),
                evaluation_noise_multiplier: None,
                max_stores_per_customer: 1,
            }),
        }
    }

    #[test]
    fn each_rule_refuses_and_names_itself() {
        let policy = Policy::default();
        policy.check(&task(true), 0).unwrap();
        let rule = |spec: &TaskSpec, live| policy.check(spec, live).unwrap_err().rule;
        assert_eq!(rule(&task(false), 0), "allow_without_privacy");
        let mut t = task(true);
        t.privacy.as_mut().unwrap().target_epsilon = 11.0;
        assert_eq!(rule(&t, 0), "max_epsilon");
        let mut t = task(true);
        t.privacy.as_mut().unwrap().delta = 1e-4;
        assert_eq!(rule(&t, 0), "max_delta");
        let mut t = task(true);
        t.plan.min_clients = 1;
        assert_eq!(rule(&t, 0), "min_cohort");
        let mut t = task(true);
        t.model = ModelSpec::Bench { n_params: 60_000_000 };
        assert_eq!(rule(&t, 0), "max_model_params");
        assert_eq!(rule(&task(true), 16), "max_live_tasks");
        Policy::permissive().check(&task(false), 1000).unwrap();
    }
}
