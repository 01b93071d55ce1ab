//! The client side of a task: enrol, wait for work, train or evaluate, upload, repeat.
//!
//! What leaves the store: the enrolment (task and store name), clipped updates of the *global*
//! parameters with their example count and mean loss, and evaluation *sums*. User ids, ratings
//! and user parameters never do; every item sent is in the audit log before it is sent.
//!
//! Under differential privacy the update is a [`Contribution`]: the whole update clipped
//! (client unit) or the sum of per-customer clipped contributions of Poisson-sampled customers
//! (customer unit), noised here when the task places noise at the clients. The example count,
//! loss and pre-clipping norm are then not sent at all (they depend on the data and carry no
//! noise); only the noised count of unclipped contributions is, when adaptive clipping asks.

use crate::audit_log::{AuditLog, Entry};
use crate::data::StoreRatings;
use crate::data::sales::StoreSales;
use crate::personal;
use crate::transport::{
    Assignment, Enrollment, EvalPlan, TrainPlan, Transport, TransportError, UpdateSummary,
};
use fedretail_core::model::Model;
use fedretail_core::model::demand::{DemandData, DemandLocal, DemandModel};
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::model::mf::{MfLocal, MfModel, RatingsByUser, user_seed};
use fedretail_core::plan::ModelSpec;
use fedretail_core::privacy::{Contribution, clip, noise};
use rand::{RngExt, SeedableRng};

mod secure;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How a participant is set up.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// The task to join.
    pub task: String,
    /// This store's name (sent at enrolment, shown in the coordinator's logs).
    pub store_name: String,
    /// Where personal parameters and the audit log live; `None` keeps them in memory only.
    pub state_dir: Option<PathBuf>,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Simulation only: draw customer sampling and privacy noise from the round's seed instead
    /// of the OS random source, so runs repeat. Anyone who knows the seed can predict both, so
    /// no deployed client sets this (the binary has no option for it).
    pub seeded_privacy: bool,
    /// What the store agrees to take part in (the binary's `--policy`, strict by default).
    pub policy: crate::policy::StorePolicy,
    /// Simulation only: the probability that the store vanishes from a secure-aggregation
    /// round at a random step (before sharing its keys, after sharing them, or after
    /// uploading), as a store that loses its connection would. 0 in deployments.
    pub dropout: f64,
}

/// The participant's data.
#[derive(Debug, Clone)]
pub enum LocalData {
    /// A store's ratings, for the recommender.
    Ratings(StoreRatings),
    /// A store's weekly sales, for demand forecasting.
    Sales(StoreSales),
    /// A store's purchases, read once and seen as either: interactions for a recommender task,
    /// weekly sales for a demand task.
    Purchases {
        /// The interactions.
        ratings: StoreRatings,
        /// The weekly sales.
        sales: StoreSales,
    },
    /// No data: only benchmark tasks (opaque parameter vectors) can be joined.
    None,
}

/// The participant cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// The data does not fit the task's model.
    #[error("the store's data does not fit task {task:?}: {message}")]
    Incompatible {
        /// The task.
        task: String,
        /// Why.
        message: String,
    },
    /// The coordinator refused enrolment for good.
    #[error("enrolment refused: {0}")]
    Enroll(TransportError),
    /// The audit log could not be written, so nothing more may be sent.
    #[error("audit log {path}: {source}")]
    Audit {
        /// The log.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Personal parameters could not be read or written.
    #[error(transparent)]
    Personal(#[from] personal::PersonalError),
    /// The store's privacy ledger could not be read or written, so nothing may be sent.
    #[error("privacy ledger: {0}")]
    Ledger(std::io::Error),
    /// The store's policy refuses the task itself.
    #[error("task {task:?}: {refusal}")]
    Refused {
        /// The task.
        task: String,
        /// The rule and why.
        refusal: crate::policy::Refusal,
    },
}

/// How a participant's run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Rounds this client uploaded to.
    pub rounds_trained: u64,
    /// Evaluations reported.
    pub evaluations: u64,
    /// The task's final state (`finished`, `failed`, ...) or `cancelled`.
    pub state: String,
    /// Why it ended.
    pub reason: String,
    /// The store's name.
    pub store_name: String,
    /// The store's own last evaluation (what it reported), if it evaluated.
    pub last_eval: Option<EvalSums>,
}

#[allow(clippy::large_enum_variant)] // reason: one value per participant; boxing buys nothing
enum Trainer {
    Mf { model: MfModel, ratings: StoreRatings, local: MfLocal, by_user: RatingsByUser },
    Demand { model: DemandModel, data: DemandData, local: DemandLocal },
    Bench,
}

/// One store's participation in one task.
pub struct Participant<T: Transport> {
    transport: T,
    config: ParticipantConfig,
    data: Option<LocalData>,
    trainer: Option<Trainer>,
    audit: Option<AuditLog>,
    ledger: Option<crate::ledger::Ledger>,
    outcome: Outcome,
    /// What signs this store's secure-aggregation adverts (its TLS key), once needed.
    signer: Option<crate::identity::StoreSigner>,
    /// The current secure-aggregation round, from its keys on.
    secure: Option<secure::SecureRound>,
    /// The discrete Gaussian the store's task asks of it (task id, its own calibration).
    store_noise: Option<(u64, Option<fedretail_core::secagg::ddg::Calibrated>)>,
}

impl<T: Transport> std::fmt::Debug for Participant<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("config", &self.config)
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// Exponential backoff with jitter, from 250 ms up to a maximum.
struct Backoff {
    attempt: u32,
    max: Duration,
    rng: rand::rngs::ChaCha8Rng,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.attempt += 1;
        let base =
            Duration::from_millis(250).saturating_mul(1 << self.attempt.min(10)).min(self.max);
        base.mul_f64(self.rng.random_range(0.8..1.2))
    }
}

impl<T: Transport> Participant<T> {
    /// A participant for `config.task` with this transport and data.
    pub fn new(transport: T, config: ParticipantConfig, data: LocalData) -> Participant<T> {
        let audit = config.state_dir.as_deref().map(AuditLog::new);
        let store_name = config.store_name.clone();
        Participant {
            transport,
            config,
            data: Some(data),
            trainer: None,
            audit,
            ledger: None,
            signer: None,
            secure: None,
            store_noise: None,
            outcome: Outcome {
                rounds_trained: 0,
                evaluations: 0,
                state: String::new(),
                reason: String::new(),
                store_name,
                last_eval: None,
            },
        }
    }

    /// Runs until the task ends, `cancel` fires, or an unrecoverable error.
    ///
    /// Coordinator restarts and outages are retried with backoff and logged; a client the
    /// coordinator no longer knows enrols again.
    ///
    /// # Errors
    ///
    /// See [`ParticipantError`].
    pub async fn run(mut self, cancel: CancellationToken) -> Result<Outcome, ParticipantError> {
        let mut backoff = Backoff {
            attempt: 0,
            max: self.config.max_backoff,
            rng: rand::rngs::ChaCha8Rng::seed_from_u64(user_seed(&self.config.store_name)),
        };
        self.ledger = Some(
            crate::ledger::Ledger::open(self.config.state_dir.as_deref())
                .map_err(ParticipantError::Ledger)?,
        );
        'enroll: loop {
            let enrollment = loop {
                let result = tokio::select! {
                    () = cancel.cancelled() => return Ok(self.cancelled()),
                    r = self.transport.enroll(&self.config.task, &self.config.store_name) => r,
                };
                match result {
                    Ok(e) => break e,
                    Err(e @ (TransportError::Unavailable(_) | TransportError::TaskNotFound(_))) => {
                        if !self.wait(&mut backoff, &e, &cancel).await {
                            return Ok(self.cancelled());
                        }
                    }
                    Err(e) => return Err(ParticipantError::Enroll(e)),
                }
            };
            if backoff.attempt > 0 {
                tracing::info!(peer = %self.transport.peer(), attempts = backoff.attempt, "reconnected to the coordinator");
            }
            backoff.attempt = 0;
            tracing::info!(client_id = enrollment.client_id, task_id = enrollment.task_id, store = %self.config.store_name, "enrolled");
            self.check_task(&enrollment)?;
            // Under secure aggregation with distributed noise the store calibrates its own
            // discrete Gaussian once, now, rather than inside a round's first deadline.
            if enrollment.spec.as_ref().is_some_and(|s| s.plan.secure_aggregation.is_on())
                && let Err(message) = self.store_noise(&enrollment).await
            {
                let refusal = crate::policy::Refusal { rule: "secure_aggregation", message };
                return Err(ParticipantError::Refused { task: self.config.task.clone(), refusal });
            }
            self.prepare(&enrollment)?;
            loop {
                let result = tokio::select! {
                    () = cancel.cancelled() => return Ok(self.cancelled()),
                    r = self.transport.next_assignment(&enrollment) => r,
                };
                let step = match result {
                    Ok(Assignment::Wait) => Ok(()),
                    Ok(Assignment::Train(plan)) => self.train(&enrollment, plan).await,
                    Ok(Assignment::Evaluate(plan)) => self.evaluate(&enrollment, plan).await,
                    Ok(Assignment::Advertise(plan)) => self.advertise(&enrollment, plan).await,
                    Ok(Assignment::ShareKeys { round_id, adverts }) => {
                        self.share_keys(&enrollment, round_id, adverts).await
                    }
                    Ok(Assignment::Unmask { round_id, survivors, dropped }) => {
                        self.unmask(&enrollment, round_id, &survivors, &dropped).await
                    }
                    Ok(Assignment::Finished { state, reason }) => {
                        tracing::info!(%state, %reason, "task ended");
                        self.outcome.state = state;
                        self.outcome.reason = reason;
                        return Ok(self.outcome);
                    }
                    Err(e) => Err(e),
                };
                match step {
                    Ok(()) => {
                        if backoff.attempt > 0 {
                            tracing::info!(peer = %self.transport.peer(), "reconnected to the coordinator");
                        }
                        backoff.attempt = 0;
                    }
                    Err(TransportError::UnknownClient(m)) => {
                        tracing::warn!(reason = %m, "the coordinator no longer knows this client (restarted?); enrolling again");
                        continue 'enroll;
                    }
                    Err(TransportError::TaskNotFound(m)) => {
                        tracing::warn!(reason = %m, "the task is gone; enrolling again");
                        continue 'enroll;
                    }
                    Err(TransportError::Refused(r)) if r.rule.starts_with("max_epsilon") => {
                        // The store's own budget is spent: it takes no further part in the task.
                        self.outcome.state = "refused".into();
                        self.outcome.reason = r.to_string();
                        return Ok(self.outcome);
                    }
                    Err(e @ TransportError::Unavailable(_)) => {
                        if !self.wait(&mut backoff, &e, &cancel).await {
                            return Ok(self.cancelled());
                        }
                    }
                    Err(e) => {
                        // Rejected or malformed: this round goes on without us; so do we. The
                        // coordinator may offer the same round again at once (a rejected upload
                        // may be retried), so back off rather than retrain in a tight loop.
                        tracing::warn!(error = %e, "request refused; waiting for the next round");
                        if !self.wait(&mut backoff, &e, &cancel).await {
                            return Ok(self.cancelled());
                        }
                    }
                }
            }
        }
    }

    fn cancelled(mut self) -> Outcome {
        self.outcome.state = "cancelled".into();
        self.outcome.reason = "stopped by the store".into();
        self.outcome
    }

    /// Logs the outage and sleeps; returns false if cancelled meanwhile.
    async fn wait(
        &mut self,
        backoff: &mut Backoff,
        error: &TransportError,
        cancel: &CancellationToken,
    ) -> bool {
        let delay = backoff.next();
        let retry_in = format!("{:.1}s", delay.as_secs_f64());
        if matches!(error, TransportError::Unavailable(_) | TransportError::TaskNotFound(_)) {
            tracing::warn!(peer = %self.transport.peer(), %error, retry_in, attempt = backoff.attempt, "coordinator not reachable; retrying");
        } else {
            tracing::debug!(retry_in, attempt = backoff.attempt, "backing off after a refusal");
        }
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Checks the task against the store's policy before anything is allocated for it, and
    /// logs the enrolment.
    fn check_task(&mut self, e: &Enrollment) -> Result<(), ParticipantError> {
        let refused = |refusal: crate::policy::Refusal| ParticipantError::Refused {
            task: self.config.task.clone(),
            refusal,
        };
        let checked = match &e.spec {
            Some(spec) if spec.model != e.model => Err(crate::policy::Refusal {
                rule: "valid_task",
                message: "the enrolment's model differs from the task's".into(),
            }),
            Some(spec) => self.config.policy.check_task(spec),
            None if self.config.policy.allow_without_privacy => {
                let n = e.model.n_params();
                if n > self.config.policy.max_model_params {
                    Err(crate::policy::Refusal {
                        rule: "max_model_params",
                        message: format!("the model has {n} parameters"),
                    })
                } else {
                    Ok(())
                }
            }
            None => Err(crate::policy::Refusal {
                rule: "allow_without_privacy",
                message: "the coordinator did not state the task's privacy".into(),
            }),
        };
        let privacy = e.spec.as_ref().and_then(|s| s.privacy.as_ref()).map(|p| {
            serde_json::json!({
                "unit": p.unit, "noise_placement": p.noise_placement,
                "target_epsilon": p.target_epsilon, "delta": p.delta,
                "sampling_rate": p.sampling_rate, "noise_multiplier": p.noise_multiplier,
                "domain": p.domain,
            })
        });
        self.audit(&Entry::Enrolled {
            coordinator: self.transport.peer(),
            task: self.config.task.clone(),
            task_id: e.task_id,
            privacy,
        })
        .map_err(|_| ParticipantError::Audit {
            path: self.audit.as_ref().map(|a| a.path().to_path_buf()).unwrap_or_default(),
            source: std::io::Error::other("cannot write the audit log"),
        })?;
        if let Err(refusal) = checked {
            tracing::error!(rule = refusal.rule, reason = %refusal.message, "the store's policy refuses this task");
            let _ = self.audit(&Entry::Refused {
                task_id: e.task_id,
                round_id: 0,
                rule: refusal.rule.into(),
                message: refusal.message.clone(),
            });
            return Err(refused(refusal));
        }
        Ok(())
    }

    /// Records a refusal in the log and the audit log, and returns it as the round's error.
    fn refuse(
        &self,
        e: &Enrollment,
        round_id: u64,
        refusal: crate::policy::Refusal,
    ) -> TransportError {
        tracing::warn!(round_id, rule = refusal.rule, reason = %refusal.message, "the store's policy refuses this round; nothing is sent");
        let _ = self.audit(&Entry::Refused {
            task_id: e.task_id,
            round_id,
            rule: refusal.rule.into(),
            message: refusal.message.clone(),
        });
        TransportError::Refused(refusal)
    }

    /// What this round would cost the store, by its own accounting (see [`crate::ledger`]).
    fn spend(&self, e: &Enrollment, plan: &TrainPlan) -> Option<crate::ledger::Spend> {
        let spec = e.spec.as_ref()?;
        let p = spec.privacy.as_ref()?;
        let t = plan.privacy?;
        Some(crate::ledger::Spend {
            unix_ms: crate::ledger::now_ms(),
            coordinator: self.transport.peer(),
            task: spec.name.clone(),
            task_id: e.task_id,
            domain: p.domain.clone(),
            round_id: plan.round_id,
            kind: "train".into(),
            unit: p.unit,
            placement: p.noise_placement,
            sampling_rate: if t.per_customer { t.sampling_rate } else { 1.0 },
            noise_multiplier: p.noise_multiplier.unwrap_or(0.0),
            clip_norm: plan.clip_norm,
            noise_std: t.noise_std,
            delta: p.delta,
        })
    }

    /// Checks that `spend` keeps the store's own ledger within `task_allowance` for its task and
    /// within the policy's yearly total.
    fn check_budget(
        &self,
        spend: &crate::ledger::Spend,
        task_allowance: f64,
    ) -> Result<(), crate::policy::Refusal> {
        let policy = &self.config.policy;
        let ledger = self.ledger.as_ref().expect("opened when the run starts");
        let what = if spend.kind == "evaluate" { "evaluation" } else { "round" };
        let task = ledger.task_epsilon_with(spend);
        if task > task_allowance {
            return Err(crate::policy::Refusal {
                rule: "max_epsilon_per_task",
                message: format!(
                    "this {what} would bring the store's spend on the task to epsilon {task:.4}; the policy allows {task_allowance}"
                ),
            });
        }
        let year = ledger.year_epsilon(spend.unix_ms, policy.max_delta, Some(spend));
        if year > policy.max_epsilon_per_year {
            return Err(crate::policy::Refusal {
                rule: "max_epsilon_per_year",
                message: format!(
                    "this {what} would bring the store's spend over the last 365 days to epsilon {year:.4}; the policy allows {}",
                    policy.max_epsilon_per_year
                ),
            });
        }
        Ok(())
    }

    /// Checks an assignment and the store's budget before it trains.
    fn check_train(
        &self,
        e: &Enrollment,
        plan: &TrainPlan,
    ) -> Result<Option<crate::ledger::Spend>, crate::policy::Refusal> {
        let policy = &self.config.policy;
        if let Some(spec) = &e.spec {
            policy.check_assignment(
                spec,
                plan.n_params,
                plan.local_epochs,
                plan.clip_norm,
                plan.privacy.as_ref(),
            )?;
        } else if plan.n_params != e.model.n_params() {
            return Err(crate::policy::Refusal {
                rule: "model_shape",
                message: format!(
                    "{} parameters; the task's model has {}",
                    plan.n_params,
                    e.model.n_params()
                ),
            });
        }
        let Some(spend) = self.spend(e, plan) else { return Ok(None) };
        self.check_budget(&spend, policy.max_epsilon_per_task)?;
        Ok(Some(spend))
    }

    /// Builds the trainer for the task's model on first enrolment, loading saved personal
    /// parameters.
    fn prepare(&mut self, enrollment: &Enrollment) -> Result<(), ParticipantError> {
        if self.trainer.is_some() {
            return Ok(());
        }
        let incompatible = |message: String| ParticipantError::Incompatible {
            task: self.config.task.clone(),
            message,
        };
        let data = match (&enrollment.model, self.data.take()) {
            (ModelSpec::MatrixFactorization(_), Some(LocalData::Purchases { ratings, .. })) => {
                LocalData::Ratings(ratings)
            }
            (ModelSpec::Demand(_), Some(LocalData::Purchases { sales, .. })) => {
                LocalData::Sales(sales)
            }
            (_, data) => data.expect("prepare runs once before the trainer exists"),
        };
        self.trainer = Some(match (&enrollment.model, data) {
            (ModelSpec::MatrixFactorization(spec), LocalData::Ratings(ratings)) => {
                let model = MfModel::new(spec.clone());
                model.check_data(&ratings.data).map_err(incompatible)?;
                let fresh = model.init_local(&ratings.data, None);
                let local = match &self.config.state_dir {
                    Some(dir) => match personal::load(dir, &ratings.user_keys, fresh.clone())? {
                        Some(saved) => {
                            tracing::info!(
                                users = ratings.user_keys.len(),
                                "personal parameters loaded"
                            );
                            saved
                        }
                        None => fresh,
                    },
                    None => fresh,
                };
                let by_user = RatingsByUser::new(&ratings.data);
                Trainer::Mf { model, ratings, local, by_user }
            }
            (ModelSpec::Demand(spec), LocalData::Sales(sales)) => {
                let model = DemandModel::new(spec.clone());
                let (data, unknown) = sales.to_data(&spec.groups);
                if !unknown.is_empty() {
                    tracing::warn!(groups = ?unknown, "the task does not model these product groups; their sales are left out");
                }
                if data.series.is_empty() {
                    return Err(incompatible(format!(
                        "the store sells none of the task's product groups ({})",
                        spec.groups.join(", ")
                    )));
                }
                model.check_data(&data).map_err(incompatible)?;
                tracing::info!(
                    series = data.series.len(),
                    weeks = data.n_weeks(),
                    "weekly sales ready"
                );
                let fresh = model.init_local(&data, None);
                let local = match &self.config.state_dir {
                    Some(dir) => {
                        let groups = series_groups(&model, &data);
                        match personal::load_demand(dir, &groups, fresh.clone())? {
                            Some(saved) => {
                                tracing::info!("personal parameters loaded");
                                saved
                            }
                            None => fresh,
                        }
                    }
                    None => fresh,
                };
                Trainer::Demand { model, data, local }
            }
            (ModelSpec::Bench { .. }, _) => Trainer::Bench,
            (ModelSpec::MatrixFactorization(_), _) => {
                return Err(incompatible(
                    "the task trains a recommender, and this store has no ratings".into(),
                ));
            }
            (ModelSpec::Demand(_), _) => {
                return Err(incompatible(
                    "the task forecasts demand, and this store has no sales".into(),
                ));
            }
        });
        Ok(())
    }

    async fn train(&mut self, e: &Enrollment, plan: TrainPlan) -> Result<(), TransportError> {
        if plan.masked.is_some() && self.vanished(plan.round_id, secure::Step::Upload).await {
            return Ok(());
        }
        let spend = match self.check_train(e, &plan) {
            Ok(spend) => spend,
            Err(refusal) => return Err(self.refuse(e, plan.round_id, refusal)),
        };
        let global = self.transport.fetch_model(e, plan.model_version, plan.n_params).await?;
        // A model with NaN or infinities cannot be trained from, and could be crafted (M4).
        if !global.iter().all(|v| v.is_finite()) {
            let refusal = crate::policy::Refusal {
                rule: "finite_model",
                message: "the global model holds values that are not finite".into(),
            };
            return Err(self.refuse(e, plan.round_id, refusal));
        }
        let seed = plan.round_seed ^ user_seed(&self.config.store_name);
        let trainer = self.trainer.take().expect("prepared at enrolment");
        let seeded = self.config.seeded_privacy;
        let job_plan = plan.clone();
        let (trainer, update, summary) = tokio::task::spawn_blocking(move || {
            let mut trainer = trainer;
            let (update, summary) = contribution(&mut trainer, global, &job_plan, seed, seeded);
            (trainer, update, summary)
        })
        .await
        .expect("local training panicked");
        self.trainer = Some(trainer);
        self.save_personal();
        let UpdateSummary { n_examples, train_loss: loss } = summary;
        // The charge is on disk before the update can leave; if it cannot be written, nothing is
        // sent.
        let mut task_epsilon = 0.0;
        if let Some(spend) = spend {
            let ledger = self.ledger.as_mut().expect("opened when the run starts");
            task_epsilon = ledger.task_epsilon_with(&spend);
            if let Err(err) = ledger.record(spend) {
                tracing::error!(%err, "cannot write the privacy ledger; not sending");
                return Err(TransportError::Protocol(format!("privacy ledger unavailable: {err}")));
            }
        }
        let privacy = plan.privacy.map(|t| {
            let p = e.spec.as_ref().and_then(|s| s.privacy.as_ref());
            crate::audit_log::PrivacyRecord {
                unit: p.map_or(
                    if t.per_customer {
                        fedretail_core::privacy::PrivacyUnit::Customer
                    } else {
                        fedretail_core::privacy::PrivacyUnit::Client
                    },
                    |p| p.unit,
                ),
                placement: p.map_or(fedretail_core::privacy::NoisePlacement::Central, |p| {
                    p.noise_placement
                }),
                sampling_rate: p.map_or(t.sampling_rate, |p| p.sampling_rate),
                noise_multiplier: p.and_then(|p| p.noise_multiplier).unwrap_or(f64::NAN),
                noise_std: t.noise_std,
                count_noise_std: t.count_noise_std,
                sent_unclipped_count: t.report_unclipped,
                task_epsilon,
            }
        });
        // Under secure aggregation only the masked integers leave, and they are what is logged.
        let masked = match &plan.masked {
            Some(m) => {
                let mut rng = if self.config.seeded_privacy {
                    rand::rngs::ChaCha20Rng::seed_from_u64(seed ^ 0x00dd_9a55)
                } else {
                    noise::os_seeded()
                };
                let per_customer = plan.privacy.is_some_and(|t| t.per_customer);
                Some(self.mask(plan.round_id, m, &update, per_customer, &mut rng)?)
            }
            None => None,
        };
        // The words sent: the same 4-byte little-endian encoding either way.
        let (n_sent, sha256) = match &masked {
            Some(m) => {
                let words: Vec<f32> = m.iter().map(|&v| f32::from_bits(v)).collect();
                (words.len(), fedretail_core::update::sha256_f32s(&words))
            }
            None => (update.values().len(), fedretail_core::update::sha256_f32s(update.values())),
        };
        self.audit(&Entry::Update {
            task_id: e.task_id,
            round_id: plan.round_id,
            n_params: n_sent,
            n_bytes: n_sent * 4,
            sha256: hex(&sha256),
            norm_before_clip: (!update.is_private()).then(|| update.norm_before_clip()),
            clip_norm: plan.clip_norm,
            n_examples,
            train_loss: loss,
            privacy,
        })?;
        let norm = update.norm_before_clip();
        match masked {
            Some(masked) => self.transport.upload_masked(e, plan.round_id, masked).await?,
            None => self.transport.upload(e, plan.round_id, update, summary).await?,
        }
        self.outcome.rounds_trained += 1;
        tracing::info!(
            round_id = plan.round_id,
            n_examples,
            train_loss = loss,
            norm_before_clip = norm,
            "update uploaded"
        );
        Ok(())
    }

    async fn evaluate(&mut self, e: &Enrollment, plan: EvalPlan) -> Result<(), TransportError> {
        // Under privacy the sums leave bounded and noised, and the store charges its own ledger
        // first (H1).
        let spend = match plan.privacy {
            Some((p, _)) => match self.check_evaluate(e, &plan, &p) {
                Ok(spend) => spend,
                Err(refusal) => return Err(self.refuse(e, plan.round_id, refusal)),
            },
            None if e.spec.as_ref().is_some_and(|s| s.privacy.is_some()) => {
                let refusal = crate::policy::Refusal {
                    rule: "consistent_privacy",
                    message: "an evaluation of a private task without privacy parameters".into(),
                };
                return Err(self.refuse(e, plan.round_id, refusal));
            }
            None => None,
        };
        let global = self.transport.fetch_model(e, plan.model_version, plan.n_params).await?;
        if !global.iter().all(|v| v.is_finite()) {
            let refusal = crate::policy::Refusal {
                rule: "finite_model",
                message: "the model to evaluate holds values that are not finite".into(),
            };
            return Err(self.refuse(e, plan.round_id, refusal));
        }
        let trainer = self.trainer.take().expect("prepared at enrolment");
        let seeded = self.config.seeded_privacy;
        let store_seed = user_seed(&self.config.store_name);
        let job_plan = plan.clone();
        let (trainer, exact, sent) = tokio::task::spawn_blocking(move || {
            let plan = job_plan;
            let units: Vec<EvalSums> = match &trainer {
                Trainer::Mf { model, ratings, local, .. }
                    if plan.privacy.is_some_and(|(_, per_customer)| per_customer) =>
                {
                    model.evaluate_by_user(&global, local, &ratings.data, plan.seed)
                }
                Trainer::Mf { model, ratings, local, .. } => {
                    vec![model.evaluate(&global, local, &ratings.data, plan.seed)]
                }
                Trainer::Demand { model, data, local } => {
                    vec![model.evaluate(&global, local, data, plan.seed)]
                }
                Trainer::Bench => vec![EvalSums::default()],
            };
            // A diverged model predicts NaN or infinity; such sums would be refused, and the
            // round would wait out its deadline. Report that nothing could be scored instead.
            let finite = |s: &EvalSums| {
                [s.squared_error, s.absolute_error, s.hits_at_10, s.ndcg_at_10, s.actual_sum]
                    .iter()
                    .all(|v| v.is_finite())
            };
            let units: Vec<EvalSums> = if units.iter().all(finite) { units } else { Vec::new() };
            let mut exact = EvalSums::default();
            for u in &units {
                exact.merge(u);
            }
            let sent = match plan.privacy {
                None => exact,
                Some((p, _)) => {
                    let mut rng = if seeded {
                        rand::rngs::ChaCha20Rng::seed_from_u64(
                            plan.seed ^ plan.round_id ^ store_seed,
                        )
                    } else {
                        noise::os_seeded()
                    };
                    p.release(units, &mut rng)
                }
            };
            (trainer, exact, sent)
        })
        .await
        .expect("local evaluation panicked");
        self.trainer = Some(trainer);
        if exact == EvalSums::default() && !matches!(self.trainer, Some(Trainer::Bench)) {
            tracing::warn!(
                round_id = plan.round_id,
                "nothing could be scored (predictions not finite, or no held-out data)"
            );
        }
        if let Some(spend) = spend {
            let ledger = self.ledger.as_mut().expect("opened when the run starts");
            if let Err(err) = ledger.record(spend) {
                tracing::error!(%err, "cannot write the privacy ledger; not sending");
                return Err(TransportError::Protocol(format!("privacy ledger unavailable: {err}")));
            }
        }
        self.audit(&Entry::Metrics {
            task_id: e.task_id,
            round_id: plan.round_id,
            n_ratings: sent.n_ratings,
            n_ranked: sent.n_ranked,
            squared_error: sent.squared_error,
            absolute_error: sent.absolute_error,
            hits_at_10: sent.hits_at_10,
            ndcg_at_10: sent.ndcg_at_10,
            actual_sum: sent.actual_sum,
            privacy: plan.privacy.map(|(p, per_customer)| {
                serde_json::json!({
                    "noise_multiplier": p.noise_multiplier,
                    "unit": if per_customer { "customer" } else { "client" },
                    "count_bound": p.count_bound,
                    "noise_std": p.noise_stds(),
                })
            }),
        })?;
        self.transport.report(e, plan.round_id, sent).await?;
        self.outcome.evaluations += 1;
        // The store's own, exact view: it never leaves the store.
        self.outcome.last_eval = Some(exact);
        Ok(())
    }

    /// Checks a private evaluation against the store's policy and budget; returns its charge.
    fn check_evaluate(
        &self,
        e: &Enrollment,
        plan: &EvalPlan,
        p: &fedretail_core::privacy::evaluation::EvalPrivacy,
    ) -> Result<Option<crate::ledger::Spend>, crate::policy::Refusal> {
        let policy = &self.config.policy;
        let refuse = |rule, message: String| Err(crate::policy::Refusal { rule, message });
        if p.noise_multiplier < policy.min_noise_multiplier {
            return refuse(
                "min_noise_multiplier",
                format!(
                    "evaluation noise multiplier {}; at least {}",
                    p.noise_multiplier, policy.min_noise_multiplier
                ),
            );
        }
        let Some(task) = e.spec.as_ref().and_then(|s| s.privacy.as_ref().map(|pr| (s, pr))) else {
            return Ok(None);
        };
        let (spec, privacy) = task;
        if privacy
            .evaluation_noise_multiplier
            .is_some_and(|z| p.noise_multiplier < z * (1.0 - 1e-9))
        {
            return refuse(
                "consistent_privacy",
                format!(
                    "evaluation noise multiplier {}; the task's is {:?}",
                    p.noise_multiplier, privacy.evaluation_noise_multiplier
                ),
            );
        }
        let spend = crate::ledger::Spend {
            unix_ms: crate::ledger::now_ms(),
            coordinator: self.transport.peer(),
            task: spec.name.clone(),
            task_id: e.task_id,
            domain: privacy.domain.clone(),
            round_id: plan.round_id,
            kind: "evaluate".into(),
            unit: privacy.unit,
            placement: fedretail_core::privacy::NoisePlacement::Local,
            sampling_rate: 1.0,
            noise_multiplier: p.noise_multiplier,
            clip_norm: 0.0,
            noise_std: p.noise_stds()[0],
            delta: privacy.delta,
        };
        // A task's evaluation has its own budget on top of the training one.
        self.check_budget(&spend, policy.max_epsilon_per_task + privacy.evaluation_epsilon)?;
        Ok(Some(spend))
    }

    /// Writes an audit entry; if that fails nothing may be sent, so the request is abandoned.
    fn audit(&self, entry: &Entry) -> Result<(), TransportError> {
        if let Some(log) = &self.audit
            && let Err(err) = log.append(entry)
        {
            tracing::error!(path = %log.path().display(), %err, "cannot write the audit log; not sending");
            return Err(TransportError::Protocol(format!("audit log unavailable: {err}")));
        }
        Ok(())
    }

    fn save_personal(&self) {
        let Some(dir) = &self.config.state_dir else { return };
        let saved = match &self.trainer {
            Some(Trainer::Mf { ratings, local, .. }) => {
                personal::save(dir, &ratings.user_keys, local)
            }
            Some(Trainer::Demand { model, data, local }) => {
                personal::save_demand(dir, &series_groups(model, data), local)
            }
            Some(Trainer::Bench) | None => Ok(()),
        };
        if let Err(err) = saved {
            tracing::error!(%err, "could not save personal parameters");
        }
    }
}

/// Trains locally from `global` and returns what may be uploaded (module docs) with its summary.
fn contribution(
    trainer: &mut Trainer,
    global: Vec<f32>,
    plan: &TrainPlan,
    seed: u64,
    seeded_privacy: bool,
) -> (Contribution, UpdateSummary) {
    let Some(privacy) = plan.privacy else {
        let (delta, n_examples, train_loss) =
            local_delta(trainer, global, plan.local_epochs, plan.model_version, seed);
        let mut update = Contribution::clipped(clip(delta, plan.clip_norm));
        update.forget_unclipped();
        return (update, UpdateSummary { n_examples, train_loss });
    };
    // Customer sampling and noise must be unpredictable to the coordinator.
    let mut rng = if seeded_privacy {
        rand::rngs::ChaCha20Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15)
    } else {
        noise::os_seeded()
    };
    let mut update = match trainer {
        Trainer::Mf { model, ratings, local, by_user } if privacy.per_customer => {
            Contribution::customers(model.customer_round(
                &global,
                local,
                &ratings.data,
                by_user,
                privacy.sampling_rate,
                plan.local_epochs,
                plan.clip_norm,
                &mut rng,
            ))
        }
        _ => {
            let (delta, _, _) =
                local_delta(trainer, global, plan.local_epochs, plan.model_version, seed);
            Contribution::clipped(clip(delta, plan.clip_norm))
        }
    };
    if !privacy.report_unclipped {
        update.forget_unclipped();
    }
    update.add_noise(privacy.noise_std, privacy.count_noise_std, &mut rng);
    (update, UpdateSummary { n_examples: 0, train_loss: 0.0 })
}

/// Trains locally from `global` and returns the change of the global parameters only, with the
/// example count and mean loss. Local (user) parameters are updated in place and stay here.
fn local_delta(
    trainer: &mut Trainer,
    global: Vec<f32>,
    epochs: u32,
    version: u64,
    seed: u64,
) -> (Vec<f32>, usize, f64) {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    match trainer {
        Trainer::Mf { model, ratings, local, .. } => {
            let mut trained = global.clone();
            let stats = model.train(&mut trained, local, &ratings.data, epochs, &mut rng);
            let delta = trained.iter().zip(&global).map(|(t, g)| t - g).collect();
            (delta, stats.n_examples, stats.mean_loss)
        }
        // Trees: the histogram of the level the model grows next (core's demand::trees); LAD:
        // the reweighted statistics at the fetched model (core's demand::lad).
        Trainer::Demand { model, data, .. } if model.spec().uploads_statistics() => {
            let (statistics, n) = model.store_statistics(&global, data);
            (statistics, n, 0.0)
        }
        Trainer::Demand { model, data, local } => {
            let mut trained = global.clone();
            // The learning rate decays with the rounds before this one (DemandModel::train_from).
            let before = version * u64::from(epochs);
            let stats = model.train_from(&mut trained, local, data, epochs, before, &mut rng);
            let delta = trained.iter().zip(&global).map(|(t, g)| t - g).collect();
            (delta, stats.n_examples, stats.mean_loss)
        }
        // Benchmarks measure transport and aggregation, not training: a random direction.
        Trainer::Bench => {
            let delta = (0..global.len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            (delta, 1, 0.0)
        }
    }
}

/// The group name of every series of a store's demand data, in series order.
fn series_groups<'a>(model: &'a DemandModel, data: &DemandData) -> Vec<&'a str> {
    data.series.iter().map(|s| model.spec().groups[s.group as usize].as_str()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
