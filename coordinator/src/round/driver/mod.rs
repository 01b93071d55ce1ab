//! The async driver of one task: owns the current [`Round`], the model and the client registry;
//! turns requests, time and finished jobs into calls on the pure machine, and executes what the
//! machine asks for (compute on a blocking thread, commits to the store).

use super::machine::{FailReason, Output, Phase, Round, Sum, derive_seed};
use super::{
    Assignment, Control, ModelBlob, Reject, Request, RoundHandle, RoundSummary, TaskState,
    TaskStatus,
};
use crate::store::{AuditEvent, CommitRecord, Snapshot, Store};
use fedretail_core::aggregate::Aggregate;
use fedretail_core::ids::{ClientId, ModelVersion, TaskId};
use fedretail_core::optim::{self, OptimizerState};
use fedretail_core::plan::TaskSpec;
use fedretail_core::privacy::LedgerEntry;
use fedretail_core::privacy::accountant::Charge;
use fedretail_core::privacy::noise;
use fedretail_core::privacy::release::{Admission, Ledgers, Release};
use rand::SeedableRng;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Rounds kept in memory for status.
const HISTORY: usize = 1000;
/// Queue depth of a task's inbox; senders wait when it is full (backpressure).
const INBOX: usize = 1024;
/// Capacity of a task's administrators' queue (status, control, export).
const ADMIN_INBOX: usize = 64;

/// Settings of the driver that come from the coordinator's config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DriverConfig {
    /// A client that has not polled for this long is no longer connected.
    pub(crate) liveness_timeout: Duration,
    /// Cohort sampling and privacy noise from the task seed (simulations only); otherwise both
    /// come from the OS random source, so nobody can predict who is sampled or what noise is drawn.
    pub(crate) deterministic: bool,
    /// Enrolled stores at most; stores silent for ten liveness timeouts are forgotten first.
    pub(crate) max_clients: usize,
    /// The policy's ceiling on a privacy domain's total ε (infinite: none), and its δ.
    pub(crate) domain_epsilon: f64,
    /// δ at which domains are composed.
    pub(crate) domain_delta: f64,
}

struct ClientEntry {
    store_name: String,
    last_seen: Instant,
}

/// What a compute job charged: the training entry, the evaluation entry if the round
/// evaluates, and the domain's ε after them.
type Charged = (LedgerEntry, Option<LedgerEntry>, Option<f64>);

enum JobResult {
    /// The candidate, the optimiser state, the charge written, and adaptive clipping's next
    /// clipping norm.
    Computed(Arc<ModelBlob>, OptimizerState, Option<Charged>, Option<f32>),
    /// The candidate model holds NaN or infinity: the round fails (its charge, if any, stays).
    NotFinite(Option<Charged>),
    /// The privacy charge could not be written: nothing may be released. `true` when the
    /// task's or its domain's budget refused it.
    NotCharged(String, bool),
    /// Secure aggregation could not unmask the sum: nothing was learnt, charged or released.
    NotUnmasked(String),
    Stored(Result<(), String>),
}

struct Driver {
    task: TaskId,
    spec: Arc<TaskSpec>,
    store: Arc<dyn Store>,
    config: DriverConfig,
    state: TaskState,
    state_reason: String,
    model: Arc<ModelBlob>,
    optimizer: OptimizerState,
    candidate: Option<(Arc<ModelBlob>, OptimizerState)>,
    committed_rounds: u64,
    failed_rounds: u64,
    history: VecDeque<RoundSummary>,
    clients: BTreeMap<ClientId, ClientEntry>,
    round: Option<Round>,
    job: Option<JoinHandle<JobResult>>,
    changes: watch::Sender<u64>,
    last_phase: (u64, &'static str),
    /// A state an operator set that is not yet persisted.
    pending_state: Option<(TaskState, String)>,
    /// Why the store refused this task's last charge for lack of budget.
    budget_refused: Option<String>,
    /// Charged rounds lost to crashes (recorded failed at start-up).
    interrupted_rounds: u64,
    /// The privacy domain's ε after this task's last charge (where the policy has a ceiling).
    domain_spent: Option<f64>,
    /// Every charge of this task, with what is cached about them (admission, composed ε).
    ledgers: Ledgers,
    /// The clipping norm of the next round: the plan's, or adaptive clipping's latest. After a
    /// restart adaptive clipping resumes from the last charged round's norm (the step computed
    /// from that round is not stored; it is one step of a slow-moving estimate).
    clip_norm: f32,
    /// Under secure aggregation with distributed noise: the stores' discrete Gaussian,
    /// calibrated once when the driver starts.
    store_noise: Option<Arc<fedretail_core::secagg::ddg::Calibrated>>,
}

/// Starts the driver of `task` from its snapshot; returns the handle and the driver's join handle.
pub(crate) fn spawn(
    task: TaskId,
    spec: Arc<TaskSpec>,
    state: (TaskState, String),
    snapshot: Snapshot,
    store: Arc<dyn Store>,
    config: DriverConfig,
    cancel: CancellationToken,
) -> (RoundHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(INBOX);
    let (admin_tx, admin_rx) = mpsc::channel(ADMIN_INBOX);
    let (changes, changes_rx) = watch::channel(0);
    let adaptive = spec.privacy.as_ref().is_some_and(|p| p.adaptive_clipping.is_some());
    let clip_norm = match snapshot
        .ledger
        .iter()
        .rfind(|e| e.kind == fedretail_core::privacy::ChargeKind::Train)
    {
        Some(last) if adaptive => last.clip_norm,
        _ => spec.plan.clip_norm,
    };
    let driver = Driver {
        clip_norm,
        task,
        spec: spec.clone(),
        store,
        config,
        state: state.0,
        state_reason: state.1,
        model: snapshot.model,
        optimizer: snapshot.optimizer,
        candidate: None,
        committed_rounds: snapshot.committed_rounds,
        failed_rounds: snapshot.failed_rounds,
        history: snapshot.history.into_iter().rev().take(HISTORY).rev().collect(),
        ledgers: Ledgers::new(&snapshot.ledger),
        clients: BTreeMap::new(),
        round: None,
        job: None,
        changes,
        last_phase: (0, ""),
        pending_state: None,
        budget_refused: None,
        interrupted_rounds: snapshot.interrupted_rounds,
        domain_spent: None,
        store_noise: None,
    };
    let span = tracing::info_span!("task", task_id = %task);
    let join = tokio::spawn(driver.run(rx, admin_rx, cancel).instrument(span));
    (RoundHandle { task, spec, tx, admin_tx, changes: changes_rx }, join)
}

impl Driver {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Request>,
        mut admin: mpsc::Receiver<Request>,
        cancel: CancellationToken,
    ) {
        tracing::info!(name = %self.spec.name, committed = self.committed_rounds, "task driver started");
        // A fraction of a second of accounting: off the reactor, once.
        let spec = self.spec.clone();
        match tokio::task::spawn_blocking(move || fedretail_core::secagg::round::task_noise(&spec))
            .await
            .expect("calibration panicked")
        {
            Ok(noise) => {
                if let Some(c) = &noise {
                    self.ledgers.set_ddg(c.charge);
                }
                self.store_noise = noise.map(Arc::new);
            }
            Err(e) if !self.state.is_final() => {
                self.end_task(TaskState::Failed, format!("secure aggregation: {e}")).await;
            }
            Err(_) => {}
        }
        loop {
            let now = Instant::now();
            self.ensure_round(now).await;
            let wake = self
                .round
                .as_ref()
                .and_then(Round::deadline)
                .filter(|d| *d > now)
                .unwrap_or(now + Duration::from_secs(1));
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                // Administrators first: a flood of store requests cannot delay them (L3).
                Some(request) = admin.recv() => self.handle(request),
                result = async { self.job.as_mut().expect("guarded by the if").await }, if self.job.is_some() => {
                    self.job = None;
                    match result {
                        Ok(result) => self.job_done(result),
                        // A panicking job is a bug: stop the driver so the supervisor exits non-zero.
                        Err(e) => panic!("round job panicked: {e}"),
                    }
                }
                request = inbox.recv() => match request {
                    Some(request) => self.handle(request),
                    None => break,
                },
                () = tokio::time::sleep_until(wake) => {}
            }
            self.step().await;
        }
        self.shutdown().await;
    }

    fn connected(&self, now: Instant) -> Vec<ClientId> {
        self.clients
            .iter()
            .filter(|(_, c)| {
                now.saturating_duration_since(c.last_seen) <= self.config.liveness_timeout
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Starts the next round if the task is running and none is in progress.
    async fn ensure_round(&mut self, now: Instant) {
        if self.round.is_some() || self.state != TaskState::Running {
            return;
        }
        if let Some(privacy) = &self.spec.privacy {
            let admitted = match self.ledgers.admission(privacy, self.spec.plan.rounds) {
                Admission::Admitted => Ok(None),
                // PLD composition takes a tenth of a second or more: off the reactor (L3).
                Admission::Check(check) => tokio::task::spawn_blocking(move || check.run())
                    .await
                    .expect("the accountant panicked"),
            };
            match admitted {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    self.end_task(TaskState::BudgetExhausted, reason).await;
                    return;
                }
                Err(e) => {
                    self.end_task(TaskState::Failed, format!("privacy accounting: {e}")).await;
                    return;
                }
            }
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.next_round_id())
            .await
            .expect("store call panicked")
        {
            Ok(id) => {
                let index = self.committed_rounds + 1;
                tracing::info!(round_id = %id, index, "round starts: selecting");
                let seed = if self.config.deterministic {
                    derive_seed(self.spec.plan.seed, index)
                } else {
                    use rand::RngExt;
                    noise::os_seeded().random()
                };
                let mut round =
                    Round::new(id, index, self.spec.clone(), self.model.version, now, seed);
                if !self.config.deterministic {
                    let digest = ring::digest::digest(
                        &ring::digest::SHA256,
                        &[b"fedretail local order".as_slice(), &seed.to_le_bytes()].concat(),
                    );
                    let bytes: [u8; 8] = digest.as_ref()[..8].try_into().expect("32 bytes");
                    round.set_local_seed(u64::from_le_bytes(bytes));
                }
                round.set_clip_norm(self.clip_norm);
                round.set_store_noise(self.store_noise.clone());
                self.round = Some(round);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot allocate a round id; task fails");
                self.end_task(TaskState::Failed, format!("store error: {e}")).await;
            }
        }
    }

    fn handle(&mut self, request: Request) {
        let now = Instant::now();
        match request {
            Request::Enroll { store_name, reply } => {
                let _ = reply.send(self.enroll(now, store_name));
            }
            Request::Owner { client, store, reply } => {
                let result = match self.clients.get(&client) {
                    None => Err(Reject::UnknownClient(client)),
                    Some(entry) if entry.store_name == store => Ok(()),
                    Some(_) => Err(Reject::NotYours(client)),
                };
                log_reject(client, "request", &result);
                let _ = reply.send(result);
            }
            Request::Poll { client, reply } => {
                let _ = reply.send(self.poll(now, client));
            }
            Request::Model { client, version, reply } => {
                let result = self.known(client).and_then(|()| {
                    if version == self.model.version {
                        Ok(self.model.clone())
                    } else {
                        match &self.candidate {
                            Some((blob, _)) if blob.version == version => Ok(blob.clone()),
                            _ => Err(Reject::NoSuchModel(version)),
                        }
                    }
                });
                let _ = reply.send(result);
            }
            Request::LatestModel { reply } => {
                let _ = reply.send(self.model.clone());
            }
            Request::BeginUpload { client, round, reply } => {
                let result = self.known(client).and_then(|()| match self.round.as_mut() {
                    Some(r) => r.begin_upload(client, round),
                    None => Err(no_round(self.state, round)),
                });
                log_reject(client, "begin upload", &result);
                let _ = reply.send(result);
            }
            Request::Rejected { round } => {
                if let Some(r) = self.round.as_mut() {
                    r.count_reject(round);
                }
            }
            Request::Upload { upload, reply } => {
                let client = upload.client;
                let state = self.state;
                let result = self.known(client).and_then(|()| match self.round.as_mut() {
                    Some(r) => r.upload(upload),
                    None => Err(no_round(state, upload.round)),
                });
                log_reject(client, "upload", &result);
                if result.is_ok() {
                    tracing::debug!(client_id = %client, "update accepted");
                }
                let _ = reply.send(result);
            }
            Request::MaskedUpload { upload, reply } => {
                let client = upload.client;
                let state = self.state;
                let result = self.known(client).and_then(|()| match self.round.as_mut() {
                    Some(r) => r.masked_upload(now, upload),
                    None => Err(no_round(state, upload.round)),
                });
                log_reject(client, "masked upload", &result);
                let _ = reply.send(result);
            }
            Request::Advertise { client, round, advert, identity, reply } => {
                let result = self.known(client).and_then(|()| match self.round.as_mut() {
                    Some(r) => r.advertise(now, client, round, advert, identity),
                    None => Err(no_round(self.state, round)),
                });
                log_reject(client, "keys", &result);
                let _ = reply.send(result);
            }
            Request::Share { client, round, sealed, reply } => {
                let result = self.known(client).and_then(|()| match self.round.as_mut() {
                    Some(r) => r.share(now, client, round, sealed),
                    None => Err(no_round(self.state, round)),
                });
                log_reject(client, "shares", &result);
                let _ = reply.send(result);
            }
            Request::Unmask { client, round, revealed, reply } => {
                let result = self.known(client).and_then(|()| match self.round.as_mut() {
                    Some(r) => r.reveal(client, round, revealed),
                    None => Err(no_round(self.state, round)),
                });
                log_reject(client, "unmasking shares", &result);
                let _ = reply.send(result);
            }
            Request::Report { client, round, sums, reply } => {
                let result = self.known(client).and_then(|()| match self.round.as_mut() {
                    Some(r) => r.report(client, round, &sums),
                    None => Err(no_round(self.state, round)),
                });
                log_reject(client, "report", &result);
                let _ = reply.send(result);
            }
            Request::Status { max_rounds, reply } => {
                let _ = reply.send(self.status(now, max_rounds));
            }
            Request::Control { action, reply } => {
                let result = self.control(action);
                let _ = reply.send(result.map(|()| self.status(now, 20)));
            }
        }
    }

    /// Pause, resume or cancel. The new state is persisted by `publish_state` on the next step.
    fn control(&mut self, action: Control) -> Result<(), Reject> {
        let wrong = |state: TaskState, action: &'static str| {
            Err(Reject::WrongState { state: state.as_str(), action })
        };
        match (action, self.state) {
            (Control::Pause, TaskState::Running) => {
                self.pending_state = Some((TaskState::Paused, "paused by an operator".into()));
            }
            (Control::Resume, TaskState::Paused) => {
                self.pending_state = Some((TaskState::Running, String::new()));
            }
            (Control::Cancel, TaskState::Running | TaskState::Paused) => {
                if let Some(round) = self.round.as_mut() {
                    round.fail(super::machine::FailReason::Cancelled);
                }
                self.pending_state =
                    Some((TaskState::Cancelled, "cancelled by an operator".into()));
            }
            (Control::Pause, state) => return wrong(state, "pause"),
            (Control::Resume, state) => return wrong(state, "resume"),
            (Control::Cancel, state) => return wrong(state, "cancel"),
        }
        let (state, reason) = self.pending_state.clone().expect("set above");
        self.state = state;
        self.state_reason = reason;
        Ok(())
    }

    /// One active enrolment per store: a store that enrols again replaces its old id, so a
    /// store is never counted twice. The registry is bounded.
    fn enroll(&mut self, now: Instant, store_name: String) -> Result<ClientId, Reject> {
        if self.state != TaskState::Running {
            return Err(Reject::TaskEnded);
        }
        let replaced: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.store_name == store_name)
            .map(|(id, _)| *id)
            .collect();
        for old in &replaced {
            self.clients.remove(old);
        }
        if self.clients.len() >= self.config.max_clients {
            let forget = self.config.liveness_timeout * 10;
            self.clients.retain(|_, c| now.saturating_duration_since(c.last_seen) <= forget);
            if self.clients.len() >= self.config.max_clients {
                return Err(Reject::TooManyClients(self.config.max_clients));
            }
        }
        let id = random_client_id();
        tracing::info!(store = %store_name, replaced = replaced.len(), "store enrolled");
        self.clients.insert(id, ClientEntry { store_name, last_seen: now });
        Ok(id)
    }

    fn known(&self, client: ClientId) -> Result<(), Reject> {
        if self.clients.contains_key(&client) { Ok(()) } else { Err(Reject::UnknownClient(client)) }
    }

    fn poll(&mut self, now: Instant, client: ClientId) -> Result<Assignment, Reject> {
        let entry = self.clients.get_mut(&client).ok_or(Reject::UnknownClient(client))?;
        entry.last_seen = now;
        if self.state.is_final() {
            return Ok(Assignment::Finished {
                state: self.state,
                reason: self.state_reason.clone(),
            });
        }
        let connected = self.connected(now);
        Ok(match self.round.as_mut() {
            Some(round) => {
                round.tick(now, &connected);
                let assignment = round.poll(now, client);
                if let Assignment::Train { round, .. } = &assignment {
                    let store = &self.clients[&client].store_name;
                    tracing::debug!(client_id = %client, %store, round_id = %round, "plan sent");
                }
                assignment
            }
            None => Assignment::Wait,
        })
    }

    /// Lets time act on the round, runs what it asks for, and finishes it when it is over.
    async fn step(&mut self) {
        if let Some((state, reason)) = self.pending_state.take() {
            self.persist_state(state, reason).await;
        }
        let now = Instant::now();
        let connected = self.connected(now);
        let Some(round) = self.round.as_mut() else { return };
        round.tick(now, &connected);
        for output in round.take_outputs() {
            match output {
                Output::Compute(sum, noising) => self.start_compute(sum, noising),
                Output::Commit(summary) => self.start_commit(summary),
            }
        }
        self.publish();
        if self.round.as_ref().is_some_and(Round::is_over) && self.job.is_none() {
            self.finish_round().await;
            self.publish();
        }
    }

    /// Bumps the change counter when the round or phase moved, waking long polls.
    fn publish(&mut self) {
        let key = match &self.round {
            Some(r) => (r.id.0, r.phase().name()),
            None => (0, "Idle"),
        };
        if key != self.last_phase {
            if let Some(r) = &self.round {
                tracing::debug!(round_id = %r.id, phase = key.1, "phase");
            }
            self.last_phase = key;
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Aggregating, Noising and Applying, on a blocking thread. Under privacy the noise is drawn
    /// and the charge written durably before the candidate model exists: nothing derived from
    /// the noised sum can leave the coordinator uncharged.
    fn start_compute(&mut self, sum: Sum, release: Option<Release>) {
        let base = self.model.clone();
        let mut optimizer = self.optimizer.clone();
        let server = self.spec.plan.server_optimizer;
        let spec = self.spec.clone();
        let (store, task) = (self.store.clone(), self.task);
        let mut rng = if self.config.deterministic {
            rand::rngs::ChaCha20Rng::seed_from_u64(
                self.spec.plan.seed ^ release.as_ref().map_or(0, |r| r.charge.round.0),
            )
        } else {
            noise::os_seeded()
        };
        let limits =
            self.spec.privacy.is_some().then(|| (self.charge_limits(), self.eval_charge_limits()));
        self.job = Some(tokio::task::spawn_blocking(move || {
            // Secure aggregation: unmask and decode first. Until the release below, the sum
            // carries only the stores' own noise (distributed) or none (central).
            let sum: Aggregate = match sum {
                Sum::Plain(sum) => sum.finish(),
                Sum::Masked(masked) => match masked.finish() {
                    Ok(sum) => sum,
                    Err(e) => return JobResult::NotUnmasked(e),
                },
            };
            let (delta, charged, next_clip) = match release {
                None => (sum.mean(), None, None),
                Some(release) => {
                    let noised = release.noise(sum.sum(), &mut rng);
                    let (limits, eval_limits) =
                        limits.as_ref().expect("private rounds have limits");
                    let mut domain_epsilon = match store.charge(task, &release.charge, limits) {
                        Ok(e) => e,
                        Err(e) => {
                            let budget = matches!(e, crate::store::StoreError::BudgetExceeded(_));
                            return JobResult::NotCharged(e.to_string(), budget);
                        }
                    };
                    // The evaluation is charged before any store is asked for its noised
                    // sums. If it cannot be, the training charge stays and nothing is released.
                    if let Some(entry) = &release.evaluation {
                        match store.charge(task, entry, eval_limits) {
                            Ok(e) => domain_epsilon = e.or(domain_epsilon),
                            Err(e) => {
                                let budget =
                                    matches!(e, crate::store::StoreError::BudgetExceeded(_));
                                return JobResult::NotCharged(
                                    format!("evaluation: {e} (the training charge stays)"),
                                    budget,
                                );
                            }
                        }
                    }
                    let released = noised.release();
                    let charged = (release.charge, release.evaluation, domain_epsilon);
                    (released.mean, Some(charged), released.next_clip)
                }
            };
            // The model's own server step (statistics to a change of the model): a pure
            // function of the noised mean and the public model.
            let delta = spec.model_delta(&base.values, delta);
            let mut values = base.values.clone();
            optim::apply(&server, &mut optimizer, &mut values, &delta);
            // A candidate that is not finite is never committed or served (H8). Under privacy
            // its charge is already written and stays.
            if !values.iter().all(|v| v.is_finite()) {
                return JobResult::NotFinite(charged);
            }
            JobResult::Computed(
                Arc::new(ModelBlob::new(base.version.next(), values)),
                optimizer,
                charged,
                next_clip,
            )
        }));
    }

    fn start_commit(&mut self, summary: RoundSummary) {
        let (model, optimizer) =
            self.candidate.clone().expect("a committing round has a candidate");
        let audit = AuditEvent::coordinator(
            "round_committed",
            self.task,
            serde_json::json!({
                "round_id": summary.round.0,
                "index": summary.index,
                "cohort_size": summary.cohort_size,
                "uploads": summary.n_uploads,
                "model_version": model.version.0,
                // The charge of this round is already in the ledger (written at Noising).
                "epsilon": self.privacy_report().map(|p| p.epsilon),
            }),
        );
        let record = CommitRecord { task: self.task, summary, model, optimizer, audit };
        let store = self.store.clone();
        self.job = Some(tokio::task::spawn_blocking(move || {
            JobResult::Stored(store.commit(record).map_err(|e| e.to_string()))
        }));
    }

    fn job_done(&mut self, result: JobResult) {
        let now = Instant::now();
        let connected = self.connected(now);
        let Some(round) = self.round.as_mut() else { return };
        match result {
            JobResult::NotFinite(charged) => {
                if let Some((entry, evaluation, _)) = charged {
                    self.ledgers.push(entry);
                    evaluation.into_iter().for_each(|e| self.ledgers.push(e));
                }
                tracing::error!("the candidate model is not finite; the round applies nothing");
                round.fail(FailReason::NotFinite);
            }
            JobResult::NotUnmasked(e) => {
                tracing::error!(error = %e, "could not unmask the round's sum; nothing released");
                round.fail(FailReason::SecureAggregation(e));
            }
            JobResult::NotCharged(e, budget) => {
                tracing::error!(error = %e, "could not write the privacy charge; the round releases nothing");
                round.fail(FailReason::Store(format!("privacy charge: {e}")));
                if budget {
                    // Another task of the domain may have spent what was left: end here rather
                    // than run rounds that can never be charged.
                    self.budget_refused = Some(e);
                }
            }
            JobResult::Computed(blob, optimizer, charged, next_clip) => {
                // The charge is durable whatever happens to the round from here on.
                if let Some((entry, evaluation, domain_epsilon)) = charged {
                    self.ledgers.push(entry);
                    evaluation.into_iter().for_each(|e| self.ledgers.push(e));
                    if domain_epsilon.is_some() {
                        self.domain_spent = domain_epsilon;
                    }
                }
                if let Some(c) = next_clip {
                    tracing::debug!(clip_norm = c, "adaptive clipping: next clipping norm");
                    self.clip_norm = c;
                }
                // The round may have failed (shutdown) while the job ran: then drop the result.
                if *round.phase() == Phase::Aggregating {
                    let version = blob.version;
                    self.candidate = Some((blob, optimizer));
                    round.computed(now, version, &connected);
                }
            }
            JobResult::Stored(result) => round.stored(result),
        }
    }

    async fn finish_round(&mut self) {
        let round = self.round.take().expect("checked by the caller");
        let summary = round.summary();
        match round.phase() {
            Phase::Committed => {
                let (blob, optimizer) =
                    self.candidate.take().expect("a committed round has a candidate");
                tracing::info!(
                    round_id = %round.id,
                    index = round.index,
                    version = %blob.version,
                    uploads = summary.n_uploads,
                    rejected = summary.n_rejected,
                    train_loss = summary.mean_train_loss,
                    rmse = summary.eval.map(|e| e.rmse()),
                    // Demand tasks: weighted absolute percentage error of the forecasts.
                    wape = summary.eval.filter(|e| e.actual_sum > 0.0).map(|e| e.wape()),
                    "round committed"
                );
                self.model = blob;
                self.optimizer = optimizer;
                self.committed_rounds += 1;
                self.push_history(summary);
                if self.committed_rounds >= self.spec.plan.rounds {
                    let reason = format!("all {} rounds committed", self.spec.plan.rounds);
                    self.end_task(TaskState::Finished, reason).await;
                }
            }
            Phase::Failed(reason) => {
                tracing::warn!(round_id = %round.id, %reason, "round failed; nothing applied");
                self.candidate = None;
                self.failed_rounds += 1;
                if let Some(entry) = round.charge_on_failure {
                    let (store, task, limits) =
                        (self.store.clone(), self.task, self.charge_limits());
                    let charged =
                        tokio::task::spawn_blocking(move || store.charge(task, &entry, &limits))
                            .await
                            .expect("store call panicked");
                    match charged {
                        Ok(domain_epsilon) => {
                            self.ledgers.push(entry);
                            if domain_epsilon.is_some() {
                                self.domain_spent = domain_epsilon;
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "could not charge a failed draw");
                            if matches!(e, crate::store::StoreError::BudgetExceeded(_)) {
                                self.budget_refused = Some(e.to_string());
                            }
                        }
                    }
                }
                let store = self.store.clone();
                let (task, record) = (self.task, summary.clone());
                let stored =
                    tokio::task::spawn_blocking(move || store.record_failure(task, &record)).await;
                if let Ok(Err(e)) = stored {
                    tracing::error!(error = %e, "could not record the failed round");
                }
                self.push_history(summary);
                if let Some(reason) = self.budget_refused.take()
                    && !self.state.is_final()
                {
                    self.end_task(TaskState::BudgetExhausted, reason).await;
                }
            }
            other => unreachable!("finish_round in phase {}", other.name()),
        }
    }

    /// What the store checks an evaluation charge of this task against: its own budget.
    fn eval_charge_limits(&mut self) -> crate::store::ChargeLimits {
        let p = self.spec.privacy.as_ref().expect("only private tasks are charged");
        let z = p.evaluation_noise_multiplier.expect("calibrated at creation");
        let rounds = evaluating_rounds(&self.spec.plan);
        crate::store::ChargeLimits {
            accountant: p.accountant,
            task_epsilon: p.evaluation_epsilon,
            task_delta: p.delta,
            // Calibrated for exactly these rounds at creation.
            plan: Some(Charge { sampling_rate: 1.0, noise_multiplier: z, rounds }),
            domain: p.domain.clone(),
            domain_epsilon: self.config.domain_epsilon,
            domain_delta: self.config.domain_delta,
        }
    }

    /// What the store checks a charge of this task against.
    fn charge_limits(&mut self) -> crate::store::ChargeLimits {
        let p = self.spec.privacy.as_ref().expect("only private tasks are charged");
        crate::store::ChargeLimits {
            accountant: p.accountant,
            task_epsilon: p.target_epsilon,
            task_delta: p.delta,
            plan: self.ledgers.plan_fits(p, self.spec.plan.rounds),
            domain: p.domain.clone(),
            domain_epsilon: self.config.domain_epsilon,
            domain_delta: self.config.domain_delta,
        }
    }

    fn push_history(&mut self, summary: RoundSummary) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(summary);
    }

    async fn end_task(&mut self, state: TaskState, reason: String) {
        tracing::info!(state = state.as_str(), %reason, "task ended");
        self.state = state;
        self.state_reason = reason.clone();
        self.persist_state(state, reason).await;
    }

    /// Writes the task's state and its audit entry, and wakes long polls.
    async fn persist_state(&mut self, state: TaskState, reason: String) {
        let (store, task) = (self.store.clone(), self.task);
        let epsilon = self.privacy_report().map(|p| p.epsilon);
        let audit = AuditEvent::coordinator(
            "task_state",
            task,
            serde_json::json!({
                "state": state.as_str(),
                "reason": reason,
                "committed_rounds": self.committed_rounds,
                "epsilon": epsilon,
            }),
        );
        let stored = tokio::task::spawn_blocking(move || {
            store.set_task_state(task, state, &reason)?;
            store.append_audit(&audit)
        })
        .await;
        if let Ok(Err(e)) = stored {
            tracing::error!(error = %e, "could not record the task's state");
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Waits for an in-flight commit (never abandoned halfway), then fails what is left.
    async fn shutdown(&mut self) {
        if let Some(job) = self.job.take()
            && let Ok(result) = job.await
        {
            self.job_done(result);
        }
        if let Some(round) = self.round.as_mut() {
            round.fail(FailReason::Shutdown);
            if round.is_over() {
                self.finish_round().await;
            }
        }
        tracing::info!("task driver stopped");
    }

    fn status(&self, now: Instant, max_rounds: usize) -> TaskStatus {
        let mut rounds: Vec<RoundSummary> = self.round.iter().map(Round::summary).collect();
        rounds.extend(self.history.iter().rev().cloned());
        rounds.truncate(max_rounds);
        TaskStatus {
            task: self.task,
            spec: self.spec.clone(),
            state: self.state,
            state_reason: self.state_reason.clone(),
            model_version: self.model.version,
            committed_rounds: self.committed_rounds,
            failed_rounds: self.failed_rounds,
            connected_clients: self.connected(now).len() as u32,
            phase: self.round.as_ref().map_or("Idle", |r| r.phase().name()),
            rounds,
            privacy: self.privacy_report(),
        }
    }

    fn privacy_report(&self) -> Option<super::PrivacyReport> {
        let p = self.spec.privacy.as_ref()?;
        let fedretail_core::privacy::release::Spent {
            epsilon,
            evaluation_epsilon,
            total_epsilon,
            against_coordinator,
        } = self.ledgers.spent(p, self.spec.plan.min_clients);
        Some(super::PrivacyReport {
            evaluation_epsilon,
            evaluation_budget: p.evaluation_epsilon,
            evaluation_rounds: self.ledgers.evaluations() as u64,
            total_epsilon,
            epsilon_against_coordinator: against_coordinator,
            domain: p.domain.clone(),
            domain_epsilon: self.domain_spent,
            domain_delta: self.config.domain_delta,
            interrupted_rounds: self.interrupted_rounds,
            epsilon,
            delta: p.delta,
            target_epsilon: p.target_epsilon,
            unit: p.unit,
            noise_placement: p.noise_placement,
            rounds: self.ledgers.train().len() as u64,
            sampling_rate: p.sampling_rate,
            noise_multiplier: p.noise_multiplier.unwrap_or(f64::NAN),
            clip_norm: self
                .ledgers
                .train()
                .last()
                .map_or(self.spec.plan.clip_norm, |e| e.clip_norm),
            accountant: p.accountant,
        })
    }
}

/// Why a request for `round` finds no open round: the task has ended (which the store should
/// hear as such), or the next round has not started yet.
fn no_round(state: TaskState, round: fedretail_core::ids::RoundId) -> Reject {
    if state.is_final() {
        Reject::TaskEnded
    } else {
        Reject::StaleRound { got: round, current: "none open".into() }
    }
}

fn log_reject<T>(client: ClientId, what: &str, result: &Result<T, Reject>) {
    if let Err(reject) = result {
        tracing::warn!(client_id = %client, %reject, "{what} rejected");
    }
}

/// A client id nobody can guess or reuse across restarts: 63 random bits from the OS.
fn random_client_id() -> ClientId {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("the OS random source works");
    ClientId(u64::from_le_bytes(bytes) >> 1)
}

/// How many rounds of `spec`'s plan evaluate (each charged under privacy).
pub(crate) fn evaluating_rounds(plan: &fedretail_core::plan::TrainingPlan) -> u64 {
    (1..=plan.rounds).filter(|&n| plan.evaluates_round(n)).count() as u64
}

/// The initial model (version 0) of a task, from its seed.
pub(crate) fn initial_model(spec: &TaskSpec) -> ModelBlob {
    use fedretail_core::model::Model;
    use fedretail_core::model::mf::MfModel;
    use fedretail_core::plan::ModelSpec;
    use rand::SeedableRng;
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(spec.plan.seed);
    let values = match &spec.model {
        ModelSpec::MatrixFactorization(mf) => MfModel::new(mf.clone()).init_global(&mut rng),
        ModelSpec::Demand(d) => {
            fedretail_core::model::demand::DemandModel::new(d.clone()).init_global(&mut rng)
        }
        ModelSpec::Bench { n_params } => vec![0.0; *n_params],
    };
    ModelBlob::new(ModelVersion(0), values)
}

#[cfg(test)]
mod tests;
