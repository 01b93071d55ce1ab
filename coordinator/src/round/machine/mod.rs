//! The pure round state machine: no `.await`, no clock reads (`now` is passed in), no store and
//! no wire types. The driver feeds it requests and time, and executes what it asks for.

mod secure;

use super::{
    Assignment, Identity, MaskedUpload, Reject, Revealed, RoundSummary, TrainSummary, Upload,
};
use fedretail_core::aggregate::{Aggregate, Aggregator, validate};
use fedretail_core::ids::{ClientId, ModelVersion, RoundId};
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::plan::TaskSpec;
use fedretail_core::privacy::release::{Adapt, Release};
use fedretail_core::privacy::sampling::poisson;
use fedretail_core::privacy::{NoisePlacement, PrivacyUnit, TrainPrivacy};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use secure::Secure;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::time::Instant;

/// Held-out ratings one customer contributes to private evaluation at most (more are scaled
/// down to this many, keeping the customer's mean error).
pub(crate) const EVAL_RATINGS_PER_CUSTOMER: u64 = 10;
/// Under private evaluation, the bound on a demand forecast's error and actual units (per
/// forecast, as each store reports its means).
pub(crate) const DEMAND_EVAL_UNITS: f64 = 100.0;

/// The largest FedAvg weight (declared example count) a client may send in a task without
/// privacy.
pub(crate) const MAX_WEIGHT: f64 = 1e7;

/// Why a round failed. A failed round applies nothing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FailReason {
    TooFewSampled {
        sampled: usize,
        min: u32,
    },
    TooFewAcks {
        acked: usize,
        min: u32,
    },
    TooFewUploads {
        uploaded: usize,
        min: u32,
    },
    Store(String),
    Shutdown,
    Cancelled,
    NotFinite,
    /// Secure aggregation could not produce the sum (parameters, or too few shares revealed).
    SecureAggregation(String),
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The drawn count is not published: it is about who takes part (M2, L2).
            FailReason::TooFewSampled { min, .. } => write!(
                f,
                "Poisson sampling drew fewer than the {min} clients required; the draw is charged"
            ),
            FailReason::TooFewAcks { acked, min } => {
                write!(f, "configure deadline passed with {acked} of the {min} required clients")
            }
            FailReason::TooFewUploads { uploaded, min } => {
                write!(f, "collect deadline passed with {uploaded} of the {min} required uploads")
            }
            FailReason::Store(e) => write!(f, "could not commit: {e}"),
            FailReason::Shutdown => write!(f, "coordinator shut down"),
            FailReason::Cancelled => write!(f, "the task was cancelled"),
            FailReason::SecureAggregation(e) => write!(f, "secure aggregation: {e}"),
            FailReason::NotFinite => {
                write!(f, "the candidate model is not finite; nothing applied")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Phase {
    Selecting {
        deadline: Instant,
    },
    Configuring {
        deadline: Instant,
    },
    /// Secure aggregation: the cohort advertises its keys.
    Advertising {
        deadline: Instant,
    },
    /// Secure aggregation: the advertisers share their seeds with their neighbours.
    Sharing {
        deadline: Instant,
    },
    Collecting {
        deadline: Instant,
    },
    /// Secure aggregation: the survivors reveal the shares that remove the masks.
    Unmasking {
        deadline: Instant,
    },
    /// The driver is computing the new model (aggregate mean + server optimiser).
    Aggregating,
    Evaluating {
        deadline: Instant,
    },
    /// The driver is writing the commit record.
    Committing,
    Committed,
    Failed(FailReason),
}

impl Phase {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Phase::Selecting { .. } => "Selecting",
            Phase::Configuring { .. } => "Configuring",
            Phase::Advertising { .. } => "Advertising",
            Phase::Sharing { .. } => "Sharing",
            Phase::Unmasking { .. } => "Unmasking",
            Phase::Collecting { .. } => "Collecting",
            Phase::Aggregating => "Aggregating",
            Phase::Evaluating { .. } => "Evaluating",
            Phase::Committing => "Committing",
            Phase::Committed => "Committed",
            Phase::Failed(_) => "Failed",
        }
    }
}

/// Work the driver must do for the machine.
#[derive(Debug)]
pub(crate) enum Output {
    /// Turn the sum into the next model (off the reactor), then call [`Round::computed`].
    /// With privacy, noise is added to the sum and the round charged durably first.
    Compute(Sum, Option<Release>),
    /// Persist the round, then call [`Round::stored`].
    Commit(RoundSummary),
}

/// A round's sum as the driver receives it.
#[derive(Debug)]
pub(crate) enum Sum {
    /// Summed in the clear.
    Plain(Aggregator),
    /// Masked: unmask and decode it first ([`MaskedSum::finish`]).
    Masked(Box<MaskedSum>),
}

/// A masked sum and what unmasks and decodes it.
#[derive(Debug)]
pub(crate) struct MaskedSum {
    unmasker: fedretail_core::secagg::protocol::Unmasker,
    revealed: Vec<Revealed>,
    params: Arc<fedretail_core::secagg::round::RoundParams>,
    survivors: usize,
    /// Coordinates no honest store changes (their sum is 0).
    fixed: Vec<usize>,
}

impl MaskedSum {
    /// Removes the masks, lifts the sum out of mod 2^b, un-scales and un-rotates it: the sum
    /// of the survivors' quantised (and, under distributed noise, noised) updates.
    ///
    /// # Errors
    ///
    /// Too few or inconsistent shares of a seed that must be reconstructed.
    pub(crate) fn finish(self) -> Result<Aggregate, String> {
        let sum = self.unmasker.finish(&self.revealed).map_err(|e| e.to_string())?;
        let p = &self.params;
        let mut decoded =
            fedretail_core::secagg::ddg::decode(&sum, &p.ddg, p.rotation_seed, p.input_len);
        for &i in &self.fixed {
            decoded[i] = 0.0;
        }
        Ok(Aggregate::new(decoded, self.survivors as f64, self.survivors))
    }
}

/// One round of a task.
#[derive(Debug)]
pub(crate) struct Round {
    pub(crate) id: RoundId,
    /// 1-based index this round will have among committed rounds.
    pub(crate) index: u64,
    spec: Arc<TaskSpec>,
    base: ModelVersion,
    n_params: usize,
    /// Length of an upload ([`TaskSpec::upload_len`]): `n_params`, then any statistics.
    upload_len: usize,
    seed: u64,
    /// The seed stores get for their local data order: not the cohort seed (see
    /// [`Round::set_local_seed`]).
    local_seed: u64,
    phase: Phase,
    cohort: BTreeSet<ClientId>,
    acked: BTreeSet<ClientId>,
    uploaded: BTreeSet<ClientId>,
    /// Invariant: `Some` from Configuring until Aggregating takes it.
    sum: Option<Aggregator>,
    n_rejected: u32,
    loss_sum: f64,
    loss_weight: f64,
    candidate: Option<ModelVersion>,
    eval_cohort: BTreeSet<ClientId>,
    reported: BTreeSet<ClientId>,
    eval: EvalSums,
    outputs: Vec<Output>,
    /// Under privacy: the expected number of contributions (see [`Release`]).
    expected_count: f64,
    /// This round's clipping norm (the plan's, or adaptive clipping's latest).
    clip_norm: f32,
    /// Adaptive clipping: the sum of the uploads' unclipped counts.
    unclipped_sum: f64,
    /// Secure aggregation's state, from the cohort's draw on.
    secure: Option<Secure>,
    /// The latest instant the driver passed in (the machine reads no clock): deadlines set by
    /// a request that has no time of its own start from it.
    clock: Instant,
    /// Under secure aggregation with distributed noise: the stores' discrete Gaussian.
    store_noise: Option<Arc<fedretail_core::secagg::ddg::Calibrated>>,
    /// A charge the driver must write although the round failed (a Poisson draw below the
    /// quorum: see [`FailReason::TooFewSampled`]).
    pub(crate) charge_on_failure: Option<fedretail_core::privacy::LedgerEntry>,
}

/// A round's noise under privacy.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RoundNoise {
    /// z charged to the ledger.
    z: f64,
    /// z·C for the update sum (z_Δ·C under adaptive clipping).
    update_std: f64,
    /// σ_b for the unclipped count, 0 without adaptive clipping.
    count_std: f64,
}

impl Round {
    /// A round that samples its cohort with `seed` (see [`derive_seed`] for simulations; the
    /// coordinator otherwise uses OS randomness, so nobody can predict who is sampled).
    pub(crate) fn new(
        id: RoundId,
        index: u64,
        spec: Arc<TaskSpec>,
        base: ModelVersion,
        now: Instant,
        seed: u64,
    ) -> Round {
        let n_params = spec.model.n_params();
        let deadline = now + spec.plan.select_timeout();
        Round {
            id,
            index,
            base,
            n_params,
            upload_len: spec.upload_len(),
            seed,
            local_seed: seed,
            phase: Phase::Selecting { deadline },
            cohort: BTreeSet::new(),
            acked: BTreeSet::new(),
            uploaded: BTreeSet::new(),
            sum: None,
            n_rejected: 0,
            loss_sum: 0.0,
            loss_weight: 0.0,
            candidate: None,
            eval_cohort: BTreeSet::new(),
            reported: BTreeSet::new(),
            eval: EvalSums::default(),
            outputs: Vec::new(),
            expected_count: 0.0,
            clip_norm: spec.plan.clip_norm,
            unclipped_sum: 0.0,
            charge_on_failure: None,
            secure: None,
            clock: now,
            store_noise: None,
            spec,
        }
    }

    /// How stores bound and noise their evaluation sums under privacy.
    fn eval_privacy(&self) -> Option<(fedretail_core::privacy::evaluation::EvalPrivacy, bool)> {
        let p = self.spec.privacy.as_ref()?;
        let per_customer = p.unit == PrivacyUnit::Customer;
        let (error_bound, actual_bound) = match &self.spec.model {
            fedretail_core::plan::ModelSpec::MatrixFactorization(mf) => {
                (f64::from(mf.rating_max - mf.rating_min), 0.0)
            }
            fedretail_core::plan::ModelSpec::Demand(_) => (DEMAND_EVAL_UNITS, DEMAND_EVAL_UNITS),
            fedretail_core::plan::ModelSpec::Bench { .. } => (1.0, 1.0),
        };
        Some((
            fedretail_core::privacy::evaluation::EvalPrivacy {
                noise_multiplier: p
                    .evaluation_noise_multiplier
                    .expect("tasks with privacy are calibrated at creation"),
                count_bound: if per_customer { EVAL_RATINGS_PER_CUSTOMER } else { 1 },
                error_bound,
                actual_bound,
            },
            per_customer,
        ))
    }

    /// This round's ledger entry under `privacy`.
    fn ledger_entry(
        &self,
        privacy: &fedretail_core::privacy::PrivacySpec,
    ) -> fedretail_core::privacy::LedgerEntry {
        fedretail_core::privacy::LedgerEntry {
            round: self.id,
            sampling_rate: privacy.sampling_rate,
            noise_multiplier: privacy
                .noise_multiplier
                .expect("tasks with privacy are calibrated at creation"),
            clip_norm: self.clip_norm,
            unit: privacy.unit,
            kind: fedretail_core::privacy::ChargeKind::Train,
        }
    }

    /// Sets the seed sent to the cohort for local data order. The coordinator sends a one-way
    /// function of the cohort seed, so a cohort member cannot recompute who else was drawn
    /// (L1); simulations send the cohort seed itself, which is public there.
    pub(crate) fn set_local_seed(&mut self, local_seed: u64) {
        self.local_seed = local_seed;
    }

    /// Sets the discrete Gaussian the stores add (the task's, calibrated once:
    /// [`fedretail_core::secagg::round::task_noise`]); call before Selecting ends.
    pub(crate) fn set_store_noise(
        &mut self,
        noise: Option<Arc<fedretail_core::secagg::ddg::Calibrated>>,
    ) {
        self.store_noise = noise;
    }

    /// Sets this round's clipping norm (adaptive clipping); call before Selecting ends.
    pub(crate) fn set_clip_norm(&mut self, clip_norm: f32) {
        self.clip_norm = clip_norm;
    }

    fn noise(&self) -> Option<RoundNoise> {
        let p = self.spec.privacy.as_ref()?;
        let z = p.noise_multiplier.expect("tasks with privacy are calibrated at creation");
        let (z_update, count_std) = match &p.adaptive_clipping {
            Some(a) => (
                a.update_noise_multiplier(z).expect("validated at creation: 2 sigma_b > z"),
                a.count_noise_std,
            ),
            None => (z, 0.0),
        };
        // A customer in k stores is clipped by each: sensitivity k·C (M3).
        let k = match p.unit {
            PrivacyUnit::Customer => f64::from(p.max_stores_per_customer.max(1)),
            PrivacyUnit::Client => 1.0,
        };
        Some(RoundNoise {
            z,
            update_std: z_update * f64::from(self.clip_norm) * k,
            count_std: count_std * k,
        })
    }

    fn train_privacy(&self) -> Option<TrainPrivacy> {
        let p = self.spec.privacy.as_ref()?;
        let noise = self.noise()?;
        let quorum = self.spec.plan.min_clients;
        // Under secure aggregation the stores' noise is the discrete Gaussian of the round's
        // parameters (distributed), or the coordinator's after unmasking (central).
        let share = |std: f64| {
            if self.spec.plan.secure_aggregation.is_on() {
                0.0
            } else {
                p.noise_placement.client_share(std, quorum)
            }
        };
        Some(TrainPrivacy {
            per_customer: p.unit == PrivacyUnit::Customer,
            sampling_rate: p.sampling_rate,
            noise_std: share(noise.update_std),
            report_unclipped: p.adaptive_clipping.is_some(),
            count_noise_std: share(noise.count_std),
        })
    }

    pub(crate) fn phase(&self) -> &Phase {
        &self.phase
    }

    pub(crate) fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Committed | Phase::Failed(_))
    }

    /// The next instant at which [`Round::tick`] has something to do.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Selecting { deadline }
            | Phase::Configuring { deadline }
            | Phase::Advertising { deadline }
            | Phase::Sharing { deadline }
            | Phase::Collecting { deadline }
            | Phase::Unmasking { deadline }
            | Phase::Evaluating { deadline } => Some(deadline),
            _ => None,
        }
    }

    pub(crate) fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// The summary of the round as it stands.
    pub(crate) fn summary(&self) -> RoundSummary {
        let failure = match &self.phase {
            Phase::Failed(r) => Some(r.to_string()),
            _ => None,
        };
        let committed_like = matches!(self.phase, Phase::Committing | Phase::Committed);
        RoundSummary {
            secure: self.secure.as_ref().map(Secure::summary),
            round: self.id,
            index: if matches!(self.phase, Phase::Failed(_)) { 0 } else { self.index },
            phase: self.phase.name(),
            cohort_size: self.cohort.len() as u32,
            n_uploads: self.uploaded.len() as u32,
            n_rejected: self.n_rejected,
            failure,
            eval: self.published_eval(),
            model_version: if committed_like {
                self.candidate.unwrap_or(self.base)
            } else {
                self.base
            },
            // Shown once the round is over: during Collecting, differencing it after each upload
            // would give each store's own loss (L8).
            mean_train_loss: if self.loss_weight > 0.0
                && (committed_like || matches!(self.phase, Phase::Failed(_)))
            {
                self.loss_sum / self.loss_weight
            } else {
                0.0
            },
        }
    }

    /// The evaluation as it may be shown. Under privacy: only once the round is committing, and
    /// only from at least `min_clients` reports, so no store's (noised) report stands alone and
    /// status never shows a sum in progress (H1).
    fn published_eval(&self) -> Option<EvalSums> {
        let any = self.eval.n_ratings > 0 || self.eval.n_ranked > 0;
        if self.spec.privacy.is_none() {
            return any.then_some(self.eval);
        }
        let committing = matches!(self.phase, Phase::Committing | Phase::Committed);
        let enough = self.reported.len() >= self.spec.plan.min_clients as usize;
        (any && committing && enough).then_some(self.eval)
    }

    /// Advances on time: samples the cohort once enough clients are connected, and handles
    /// deadlines. `connected` are the clients seen recently, in any order.
    pub(crate) fn tick(&mut self, now: Instant, connected: &[ClientId]) {
        self.clock = self.clock.max(now);
        let plan = &self.spec.plan;
        match self.phase {
            Phase::Selecting { deadline } => {
                let enough = connected.len() >= plan.cohort_size as usize;
                let settle = now >= deadline && connected.len() >= plan.min_clients as usize;
                if enough || settle {
                    if let Some(privacy) = &self.spec.privacy
                        && privacy.unit == PrivacyUnit::Customer
                    {
                        // Every store takes part; the stores sample their customers, and the
                        // average divides by the expected number of sampled customers.
                        self.cohort = connected.iter().copied().collect();
                        self.expected_count = privacy.sampling_rate
                            * privacy.population.expect("validated: customer unit has a population")
                                as f64;
                    } else if let Some(privacy) = &self.spec.privacy {
                        // The sampling the accountant assumes: each client independently with
                        // probability q (core::privacy::sampling).
                        let mut pool = connected.to_vec();
                        pool.sort_unstable();
                        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(self.seed);
                        let drawn = poisson(&pool, privacy.sampling_rate, &mut rng);
                        self.expected_count = drawn.expected_count;
                        self.cohort = drawn.members.into_iter().collect();
                        if self.cohort.len() < plan.min_clients as usize {
                            // No redraw: a draw below the quorum is still a draw at rate q, and
                            // only charging every draw keeps the sampling the accountant assumes
                            // (M2). The round fails, releases nothing, and is charged.
                            let sampled = self.cohort.len();
                            self.charge_on_failure = Some(self.ledger_entry(privacy));
                            self.fail(FailReason::TooFewSampled { sampled, min: plan.min_clients });
                            return;
                        }
                    } else {
                        let n = connected.len().min(plan.cohort_size as usize);
                        self.cohort = sample(connected, n, self.seed).into_iter().collect();
                    }
                    self.sum = Some(Aggregator::new(self.upload_len));
                    if plan.secure_aggregation.is_on() {
                        let distributed = self
                            .spec
                            .privacy
                            .as_ref()
                            .is_some_and(|p| p.noise_placement == NoisePlacement::Distributed);
                        if distributed && self.store_noise.is_none() {
                            self.fail(FailReason::SecureAggregation(
                                "the stores' noise is not calibrated".into(),
                            ));
                            return;
                        }
                        let params = fedretail_core::secagg::round::RoundParams::new(
                            &self.spec,
                            self.store_noise.as_deref(),
                            self.cohort.len(),
                            self.seed,
                        );
                        self.secure = Some(Secure::new(params, self.id.0, &self.cohort));
                        self.phase =
                            Phase::Advertising { deadline: now + plan.configure_timeout() };
                    } else {
                        self.phase =
                            Phase::Configuring { deadline: now + plan.configure_timeout() };
                    }
                }
            }
            Phase::Advertising { deadline } if now >= deadline => self.close_advertising(now),
            Phase::Sharing { deadline } if now >= deadline => self.close_sharing(now),
            Phase::Unmasking { deadline } if now >= deadline => self.aggregate(),
            Phase::Configuring { deadline } if now >= deadline => {
                if self.acked.len() >= plan.min_clients as usize {
                    // Clients that never fetched the plan are dropped from the cohort.
                    self.cohort = self.acked.clone();
                    self.phase = Phase::Collecting { deadline: now + plan.collect_timeout() };
                    self.maybe_aggregate();
                } else {
                    self.fail(FailReason::TooFewAcks {
                        acked: self.acked.len(),
                        min: plan.min_clients,
                    });
                }
            }
            Phase::Collecting { deadline } if now >= deadline => {
                if self.uploaded.len() >= plan.min_clients as usize {
                    self.close_uploads(now);
                } else {
                    self.fail(FailReason::TooFewUploads {
                        uploaded: self.uploaded.len(),
                        min: plan.min_clients,
                    });
                }
            }
            Phase::Evaluating { deadline } if now >= deadline => self.commit(),
            _ => {}
        }
    }

    /// What `client` should do now. Handing out the training plan counts as the client's ack.
    pub(crate) fn poll(&mut self, now: Instant, client: ClientId) -> Assignment {
        self.clock = self.clock.max(now);
        let plan = &self.spec.plan;
        match self.phase {
            Phase::Configuring { .. } | Phase::Collecting { .. }
                if self.cohort.contains(&client) && !self.uploaded.contains(&client) =>
            {
                self.acked.insert(client);
                let upload_deadline = match self.phase {
                    Phase::Collecting { deadline } => deadline,
                    _ => now + plan.configure_timeout() + plan.collect_timeout(),
                };
                let assignment = Assignment::Train {
                    round: self.id,
                    version: self.base,
                    n_params: self.n_params,
                    local_epochs: plan.local_epochs,
                    clip_norm: self.clip_norm,
                    round_seed: self.local_seed,
                    upload_timeout: upload_deadline.saturating_duration_since(now),
                    privacy: self.train_privacy(),
                    masked: self.secure.as_ref().and_then(|s| s.masked_train(client)),
                };
                if let Phase::Configuring { .. } = self.phase
                    && self.acked.len() == self.cohort.len()
                {
                    self.phase = Phase::Collecting { deadline: now + plan.collect_timeout() };
                }
                assignment
            }
            Phase::Advertising { .. } => match &self.secure {
                Some(s) if self.cohort.contains(&client) && !s.has_advertised(client) => {
                    Assignment::Advertise {
                        round: self.id,
                        params: s.params.clone(),
                        cohort: s.cohort().clone(),
                        index: s.index(client).expect("cohort members have an index"),
                    }
                }
                _ => Assignment::Wait,
            },
            Phase::Sharing { .. } => match &self.secure {
                Some(s) if s.has_advertised(client) && !s.has_shared(client) => {
                    Assignment::ShareKeys { round: self.id, adverts: s.neighbour_adverts(client) }
                }
                _ => Assignment::Wait,
            },
            Phase::Unmasking { .. } => {
                match self.secure.as_ref().and_then(|s| s.unmask_request(client)) {
                    Some((survivors, dropped)) => {
                        Assignment::Unmask { round: self.id, survivors, dropped }
                    }
                    None => Assignment::Wait,
                }
            }
            Phase::Evaluating { .. }
                if self.eval_cohort.contains(&client) && !self.reported.contains(&client) =>
            {
                Assignment::Evaluate {
                    round: self.id,
                    version: self.candidate.expect("Evaluating has a candidate"),
                    n_params: self.n_params,
                    seed: self.spec.plan.seed,
                    privacy: self.eval_privacy(),
                }
            }
            _ => Assignment::Wait,
        }
    }

    fn check_round(&self, round: RoundId) -> Result<(), Reject> {
        if round != self.id {
            return Err(Reject::StaleRound { got: round, current: self.id.to_string() });
        }
        Ok(())
    }

    /// Checks that `client` may upload now, before it streams its update.
    pub(crate) fn begin_upload(
        &mut self,
        client: ClientId,
        round: RoundId,
    ) -> Result<(usize, Instant), Reject> {
        let result = self.check_upload(client, round);
        if result.is_err() {
            self.n_rejected += 1;
        }
        // The upload must end by the collect deadline: a stalled stream holds a staging permit
        // no longer than the round would wait for it (M1).
        let deadline = match self.phase {
            Phase::Configuring { deadline } => deadline + self.spec.plan.collect_timeout(),
            Phase::Collecting { deadline } => deadline,
            _ => Instant::now(),
        };
        let len = self.secure.as_ref().map_or(self.upload_len, |s| s.params.masked_len());
        result.map(|()| (len, deadline))
    }

    /// Counts a request for `round` that was refused before it reached the machine.
    pub(crate) fn count_reject(&mut self, round: RoundId) {
        if round == self.id {
            self.n_rejected += 1;
        }
    }

    fn check_upload(&self, client: ClientId, round: RoundId) -> Result<(), Reject> {
        self.check_round(round)?;
        if !matches!(self.phase, Phase::Configuring { .. } | Phase::Collecting { .. }) {
            return Err(Reject::WrongPhase { phase: self.phase.name(), request: "uploads" });
        }
        if !self.cohort.contains(&client) {
            return Err(Reject::NotInCohort(client));
        }
        if self.uploaded.contains(&client) {
            return Err(Reject::Duplicate(client));
        }
        if !self.acked.contains(&client) {
            return Err(Reject::WrongPhase {
                phase: "Configuring (plan not fetched)",
                request: "uploads",
            });
        }
        Ok(())
    }

    /// Validates a complete upload and adds it to the sum. One bad upload never fails the round.
    pub(crate) fn upload(&mut self, upload: Upload) -> Result<(), Reject> {
        let result = self.try_add(upload);
        match &result {
            Ok(()) => self.maybe_aggregate(),
            Err(_) => self.n_rejected += 1,
        }
        result
    }

    fn try_add(&mut self, upload: Upload) -> Result<(), Reject> {
        self.check_upload(upload.client, upload.round)?;
        if self.secure.is_some() {
            return Err(Reject::Malformed(
                "this round takes only masked uploads (secure aggregation)".into(),
            ));
        }
        let bound = self.upload_norm_bound();
        validate(&upload.values, self.upload_len, bound)?;
        // A client's count of unclipped contributions moves the next clipping norm: it must
        // be a number within what its contributions and its noise can explain (H7).
        let unclipped = upload.summary.unclipped;
        let count_bound = self.unclipped_bound();
        if !(unclipped.is_finite() && unclipped.abs() <= count_bound) {
            return Err(Reject::Malformed(format!(
                "the unclipped count {unclipped} is not a number within ±{count_bound}"
            )));
        }
        self.unclipped_sum += unclipped;
        // Under privacy every clipped update counts once (validation forbids example weights).
        // Otherwise a client declares its example count: capped, so one client cannot outweigh
        // every other by declaring 1e308 (H8).
        let weight = if self.spec.plan.weight_by_examples { upload.weight } else { 1.0 };
        if weight > MAX_WEIGHT {
            return Err(Reject::Malformed(format!(
                "the averaging weight {weight} exceeds the largest allowed, {MAX_WEIGHT}"
            )));
        }
        let sum = self.sum.as_mut().expect("Configuring and Collecting hold the sum");
        sum.add(Arc::new(upload.values), weight)?;
        let TrainSummary { n_examples, train_loss, .. } = upload.summary;
        if train_loss.is_finite() {
            self.loss_sum += train_loss * n_examples as f64;
            self.loss_weight += n_examples as f64;
        }
        self.uploaded.insert(upload.client);
        Ok(())
    }

    /// The largest L2 norm an upload can honestly have (H8): the clipping norm for a single
    /// clipped update; the clipping norm times the population for a store's sum of customer
    /// contributions; plus, where the clients add noise, a margin their noise exceeds with
    /// probability below e⁻⁵⁰.
    fn upload_norm_bound(&self) -> f32 {
        let c = f64::from(self.clip_norm);
        let Some(p) = &self.spec.privacy else { return self.clip_norm };
        let signal = match p.unit {
            PrivacyUnit::Client => c,
            PrivacyUnit::Customer => c * p.population.unwrap_or(1) as f64,
        };
        let share = self.train_privacy().map_or(0.0, |t| t.noise_std);
        let margin = share * ((self.upload_len as f64).sqrt() + 10.0);
        if p.unit == PrivacyUnit::Client && share == 0.0 {
            self.clip_norm
        } else {
            (signal + margin) as f32
        }
    }

    /// The largest unclipped count an upload can honestly report.
    fn unclipped_bound(&self) -> f64 {
        let Some(p) = &self.spec.privacy else { return 1.0 };
        let most = match p.unit {
            PrivacyUnit::Client => 1.0,
            PrivacyUnit::Customer => p.population.unwrap_or(1) as f64,
        };
        let share = self.train_privacy().map_or(0.0, |t| t.count_noise_std);
        most + 10.0 * share + 1.0
    }

    /// Moves on once everyone who fetched the plan has uploaded.
    fn maybe_aggregate(&mut self) {
        if matches!(self.phase, Phase::Collecting { .. })
            && self.uploaded.len() == self.cohort.len()
        {
            self.close_uploads(self.clock);
        }
    }

    /// Uploads are over: aggregate, or under secure aggregation ask for the unmasking shares.
    fn close_uploads(&mut self, now: Instant) {
        match self.secure.as_mut() {
            Some(s) => {
                s.close_uploads();
                self.phase =
                    Phase::Unmasking { deadline: now + self.spec.plan.configure_timeout() };
            }
            None => self.aggregate(),
        }
    }

    /// Advertising is over: on to sharing with those who advertised, if they are a quorum.
    fn close_advertising(&mut self, now: Instant) {
        let plan = &self.spec.plan;
        let advertised = self.secure.as_ref().map_or(0, Secure::advertised);
        if advertised >= plan.min_clients as usize {
            self.phase = Phase::Sharing { deadline: now + plan.configure_timeout() };
        } else {
            self.fail(FailReason::TooFewAcks { acked: advertised, min: plan.min_clients });
        }
    }

    /// Sharing is over: the clients that shared are the cohort that uploads.
    fn close_sharing(&mut self, now: Instant) {
        let plan = &self.spec.plan;
        let shared = self.secure.as_ref().map_or(0, Secure::shared);
        if shared >= plan.min_clients as usize {
            let sharers = self.secure.as_mut().expect("checked").close_sharing();
            self.cohort = sharers.clone();
            self.acked = sharers;
            self.phase = Phase::Collecting { deadline: now + plan.collect_timeout() };
        } else {
            self.fail(FailReason::TooFewAcks { acked: shared, min: plan.min_clients });
        }
    }

    /// Secure aggregation, step 1: a cohort member's signed keys.
    pub(crate) fn advertise(
        &mut self,
        now: Instant,
        client: ClientId,
        round: RoundId,
        advert: super::Advertised,
        identity: Identity,
    ) -> Result<(), Reject> {
        self.try_secure(round, "keys", |r| {
            if !matches!(r.phase, Phase::Advertising { .. }) {
                return Err(Reject::WrongPhase { phase: r.phase.name(), request: "keys" });
            }
            let s = r.secure.as_mut().expect("checked by try_secure");
            s.advertise(client, advert, identity)?;
            if s.advertised() == r.cohort.len() {
                r.close_advertising(now);
            }
            Ok(())
        })
    }

    /// Secure aggregation, step 2: a client's sealed shares.
    pub(crate) fn share(
        &mut self,
        now: Instant,
        client: ClientId,
        round: RoundId,
        sealed: Vec<super::Sealed>,
    ) -> Result<(), Reject> {
        self.try_secure(round, "shares", |r| {
            if !matches!(r.phase, Phase::Sharing { .. }) {
                return Err(Reject::WrongPhase { phase: r.phase.name(), request: "shares" });
            }
            let s = r.secure.as_mut().expect("checked by try_secure");
            s.share(client, sealed)?;
            if s.shared() == s.advertised() {
                r.close_sharing(now);
            }
            Ok(())
        })
    }

    /// Secure aggregation, step 3: a masked upload at `now`.
    pub(crate) fn masked_upload(
        &mut self,
        now: Instant,
        upload: MaskedUpload,
    ) -> Result<(), Reject> {
        self.clock = self.clock.max(now);
        self.try_secure(upload.round, "masked uploads", |r| {
            r.check_upload(upload.client, upload.round)?;
            r.secure.as_mut().expect("checked by try_secure").add(upload.client, upload.values)?;
            let TrainSummary { n_examples, train_loss, .. } = upload.summary;
            if train_loss.is_finite() && r.spec.privacy.is_none() {
                r.loss_sum += train_loss * n_examples as f64;
                r.loss_weight += n_examples as f64;
            }
            r.uploaded.insert(upload.client);
            r.maybe_aggregate();
            Ok(())
        })
    }

    /// Secure aggregation, step 4: a survivor's revealed shares.
    pub(crate) fn reveal(
        &mut self,
        client: ClientId,
        round: RoundId,
        revealed: Vec<Revealed>,
    ) -> Result<(), Reject> {
        self.try_secure(round, "shares", |r| {
            if !matches!(r.phase, Phase::Unmasking { .. }) {
                return Err(Reject::WrongPhase {
                    phase: r.phase.name(),
                    request: "unmasking shares",
                });
            }
            let s = r.secure.as_mut().expect("checked by try_secure");
            s.reveal(client, revealed)?;
            if s.all_responded() {
                r.aggregate();
            }
            Ok(())
        })
    }

    /// Runs a secure-aggregation step, counting a refusal.
    fn try_secure(
        &mut self,
        round: RoundId,
        request: &'static str,
        step: impl FnOnce(&mut Round) -> Result<(), Reject>,
    ) -> Result<(), Reject> {
        let result = self.check_round(round).and_then(|()| {
            if self.secure.is_none() {
                return Err(Reject::WrongPhase { phase: "without secure aggregation", request });
            }
            step(self)
        });
        if result.is_err() {
            self.n_rejected += 1;
        }
        result
    }

    fn aggregate(&mut self) {
        let sum = self.sum.take().expect("the sum is taken once");
        self.phase = Phase::Aggregating;
        let fixed = self.fixed_coordinates();
        let release = self.spec.privacy.as_ref().map(|p| {
            let noise = self.noise().expect("privacy has noise");
            let central = p.noise_placement == NoisePlacement::Central;
            // Under secure aggregation a store's quantised update can move the sum by a little
            // more than its clipping norm: central noise grows with it.
            let inflation = self.secure.as_ref().map_or(1.0, |s| {
                fedretail_core::secagg::round::rounding_inflation(&s.params.ddg, s.params.input_len)
            });
            Release {
                std: if central { noise.update_std * inflation } else { 0.0 },
                expected_count: self.expected_count,
                adapt: p.adaptive_clipping.clone().map(|rule| Adapt {
                    unclipped_sum: self.unclipped_sum,
                    count_std: if central { noise.count_std } else { 0.0 },
                    rule,
                }),
                charge: self.ledger_entry(p),
                fixed: fixed.clone(),
                evaluation: self.spec.plan.evaluates_round(self.index).then(|| {
                    fedretail_core::privacy::LedgerEntry {
                        sampling_rate: 1.0,
                        noise_multiplier: p
                            .evaluation_noise_multiplier
                            .expect("tasks with privacy are calibrated at creation"),
                        kind: fedretail_core::privacy::ChargeKind::Evaluate,
                        ..self.ledger_entry(p)
                    }
                }),
            }
        });
        let sum = match self.secure.as_mut() {
            None => Sum::Plain(sum),
            Some(s) => {
                let (unmasker, revealed) = s.take();
                Sum::Masked(Box::new(MaskedSum {
                    unmasker,
                    revealed,
                    params: s.params.clone(),
                    survivors: self.uploaded.len(),
                    fixed,
                }))
            }
        };
        self.outputs.push(Output::Compute(sum, release));
    }

    /// Coordinates no store changes, kept at their value (see [`Release`]): μ of the
    /// recommender under customer-level privacy.
    fn fixed_coordinates(&self) -> Vec<usize> {
        match (&self.spec.model, &self.spec.privacy) {
            (fedretail_core::plan::ModelSpec::MatrixFactorization(_), Some(p))
                if p.unit == PrivacyUnit::Customer =>
            {
                vec![0]
            }
            _ => Vec::new(),
        }
    }

    /// The driver computed candidate model `version`. `connected` are the clients that may be
    /// asked to evaluate it.
    pub(crate) fn computed(&mut self, now: Instant, version: ModelVersion, connected: &[ClientId]) {
        assert_eq!(self.phase, Phase::Aggregating, "computed outside Aggregating");
        self.candidate = Some(version);
        let plan = &self.spec.plan;
        if plan.evaluates_round(self.index) && !connected.is_empty() {
            let n = ((connected.len() as f64 * f64::from(plan.eval_fraction)).ceil() as usize)
                .clamp(1, connected.len());
            self.eval_cohort = sample(connected, n, self.seed ^ 0xe7a1).into_iter().collect();
            self.phase = Phase::Evaluating { deadline: now + plan.evaluate_timeout() };
        } else {
            self.commit();
        }
    }

    /// Adds one client's evaluation sums.
    pub(crate) fn report(
        &mut self,
        client: ClientId,
        round: RoundId,
        sums: &EvalSums,
    ) -> Result<(), Reject> {
        let result = self.try_report(client, round, sums);
        if result.is_err() {
            self.n_rejected += 1;
        }
        result
    }

    fn try_report(
        &mut self,
        client: ClientId,
        round: RoundId,
        sums: &EvalSums,
    ) -> Result<(), Reject> {
        self.check_round(round)?;
        if !matches!(self.phase, Phase::Evaluating { .. }) {
            return Err(Reject::WrongPhase { phase: self.phase.name(), request: "metrics" });
        }
        if !self.eval_cohort.contains(&client) {
            return Err(Reject::NotInCohort(client));
        }
        if !self.reported.insert(client) {
            return Err(Reject::Duplicate(client));
        }
        self.eval.merge(sums);
        if self.reported.len() == self.eval_cohort.len() {
            self.commit();
        }
        Ok(())
    }

    fn commit(&mut self) {
        self.phase = Phase::Committing;
        let summary = self.summary();
        self.outputs.push(Output::Commit(summary));
    }

    /// The driver wrote (or failed to write) the commit record.
    pub(crate) fn stored(&mut self, result: Result<(), String>) {
        assert_eq!(self.phase, Phase::Committing, "stored outside Committing");
        match result {
            Ok(()) => self.phase = Phase::Committed,
            Err(e) => {
                // The commit did not happen: nothing was applied.
                self.candidate = None;
                self.phase = Phase::Failed(FailReason::Store(e));
            }
        }
    }

    /// Fails the round unless it is over or committing (a commit in flight is never abandoned).
    pub(crate) fn fail(&mut self, reason: FailReason) {
        if !self.is_over() && self.phase != Phase::Committing {
            self.sum = None;
            self.candidate = None;
            self.phase = Phase::Failed(reason);
        }
    }
}

/// The deterministic per-round seed of a simulation: the task seed mixed with the round index.
pub(crate) fn derive_seed(task_seed: u64, index: u64) -> u64 {
    task_seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// `n` of `clients`, uniformly without replacement, deterministic for a seed and a client set.
fn sample(clients: &[ClientId], n: usize, seed: u64) -> Vec<ClientId> {
    let mut pool = clients.to_vec();
    pool.sort_unstable();
    pool.shuffle(&mut rand::rngs::ChaCha8Rng::seed_from_u64(seed));
    pool.truncate(n);
    pool
}

#[cfg(test)]
mod tests;
