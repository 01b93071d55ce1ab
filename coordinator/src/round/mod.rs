//! Rounds of a task: the pure state machine (`machine`), its async driver (`driver`) and
//! [`RoundHandle`], the only way in for gRPC handlers and the simulator.
//!
//! ```text
//! Selecting ─▶ Configuring ─▶ Collecting ─▶ Aggregating ─▶ Applying ─▶ Evaluating ─▶ Committing ─▶ Committed
//!                   │              │                                        (optional)      │
//!                   └──────────────┴─ deadline without quorum | shutdown ─▶ Failed ◀── store error
//!
//! Committed or Failed ─▶ next round (Selecting), until `plan.rounds` rounds are committed.
//! ```
//!
//! Selecting waits (without failing) for enough connected clients: no round exists until a
//! cohort does. Configuring hands the plan to the cohort; a client that has fetched its plan may
//! upload at once, even while slower cohort members are still fetching theirs. Aggregating and
//! Applying are compute-only and run on a blocking thread. A failed round applies nothing.

pub(crate) mod driver;
pub(crate) mod machine;

use fedretail_core::ids::{ClientId, ModelVersion, RoundId, TaskId};
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::plan::TaskSpec;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Why a client's request was refused. Expected protocol outcomes, not failures: the round
/// counts them and goes on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Reject {
    /// The client id is not enrolled (for example after a coordinator restart).
    #[error("{0} is not enrolled with this task; enroll again")]
    UnknownClient(ClientId),
    /// No task has this id or name.
    #[error("no task {0}")]
    UnknownTask(String),
    /// The task has ended.
    #[error("the task has ended")]
    TaskEnded,
    /// The task is not in a state that allows this (resume a running task, pause an ended one).
    #[error("the task is {state}: cannot {action} it")]
    WrongState {
        /// Its state.
        state: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// The client is not in this round's cohort.
    #[error("{0} is not in the cohort of this round")]
    NotInCohort(ClientId),
    /// The request names a round that is not the current one.
    #[error("{got} is not the current round ({current})")]
    StaleRound {
        /// The round the request named.
        got: RoundId,
        /// The current round, if any.
        current: String,
    },
    /// The current round is in a phase that does not take this request.
    #[error("the round is in phase {phase}, which does not take {request}")]
    WrongPhase {
        /// Current phase.
        phase: &'static str,
        /// What was asked.
        request: &'static str,
    },
    /// The client already uploaded (or reported) in this round.
    #[error("{0} already uploaded in this round")]
    Duplicate(ClientId),
    /// The update is unusable: wrong shape, non-finite values, or not clipped.
    #[error(transparent)]
    InvalidUpdate(#[from] fedretail_core::aggregate::AggregateError),
    /// The request is malformed (bad chunks, checksum, missing header).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The requested model version is not available.
    #[error("model version {0} is not available")]
    NoSuchModel(ModelVersion),
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// The client id belongs to another store than the caller's certificate names.
    #[error("{0} is not enrolled by this store")]
    NotYours(ClientId),
    /// The task has as many enrolled stores as the coordinator allows.
    #[error("the task has its maximum of {0} enrolled stores")]
    TooManyClients(usize),
}

/// What a client should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    /// Nothing now; poll again.
    Wait,
    /// Train and upload.
    Train {
        /// The round.
        round: RoundId,
        /// The model to start from.
        version: ModelVersion,
        /// Its parameter count.
        n_params: usize,
        /// Local epochs.
        local_epochs: u32,
        /// Clip to this L2 norm.
        clip_norm: f32,
        /// Seed for local data order.
        round_seed: u64,
        /// Time left to upload.
        upload_timeout: Duration,
        /// What differential privacy asks of the client.
        privacy: Option<fedretail_core::privacy::TrainPrivacy>,
        /// Under secure aggregation: how to mask the update.
        masked: Option<MaskedTrain>,
    },
    /// Evaluate a model version on held-out data.
    Evaluate {
        /// The round.
        round: RoundId,
        /// The candidate model.
        version: ModelVersion,
        /// Its parameter count.
        n_params: usize,
        /// Seed for evaluation sampling.
        seed: u64,
        /// Under privacy: how the store bounds and noises its sums, and whether customers are
        /// the units.
        privacy: Option<(fedretail_core::privacy::evaluation::EvalPrivacy, bool)>,
    },
    /// The task has ended.
    Finished {
        /// Final state.
        state: TaskState,
        /// Why.
        reason: String,
    },
    /// Secure aggregation, step 1: make and sign this round's keys.
    Advertise {
        /// The round.
        round: RoundId,
        /// Its public parameters.
        params: Arc<fedretail_core::secagg::round::RoundParams>,
        /// The cohort in index order.
        cohort: Arc<Vec<ClientId>>,
        /// This client's index.
        index: u32,
    },
    /// Secure aggregation, step 2: the neighbours' signed keys, to share seeds with.
    ShareKeys {
        /// The round.
        round: RoundId,
        /// Each advertising neighbour's keys and the identity key they are signed with.
        adverts: Vec<(Advertised, Identity)>,
    },
    /// Secure aggregation, step 4: reveal shares.
    Unmask {
        /// The round.
        round: RoundId,
        /// Indices whose masked upload arrived: their self-mask shares.
        survivors: Vec<u32>,
        /// Indices that shared keys but did not upload: their pairwise-key shares.
        dropped: Vec<u32>,
    },
}

pub use fedretail_core::secagg::protocol::{Advertised, Identity, Revealed, Sealed};

/// Secure aggregation, step 3: what a training client needs to mask its update.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedTrain {
    /// The round's public parameters.
    pub params: Arc<fedretail_core::secagg::round::RoundParams>,
    /// The client's index.
    pub index: u32,
    /// The shares its neighbours sealed for it.
    pub shares: Vec<Sealed>,
}

/// A masked upload: integers mod 2^b, reassembled and checksummed by the service.
#[derive(Debug)]
pub struct MaskedUpload {
    /// Sender.
    pub client: ClientId,
    /// The round it is for.
    pub round: RoundId,
    /// The masked values.
    pub values: Vec<u32>,
    /// Training facts (all zero under privacy).
    pub summary: TrainSummary,
}

/// Lifecycle of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Rounds are running.
    Running,
    /// All rounds committed.
    Finished,
    /// Stopped by an error.
    Failed,
    /// Stopped because the next round would exceed the privacy budget.
    BudgetExhausted,
    /// An operator paused it: no new rounds until it is resumed.
    Paused,
    /// An operator cancelled it: it applies nothing further, ever.
    Cancelled,
}

impl TaskState {
    /// Stable name, as persisted.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Finished => "finished",
            TaskState::Failed => "failed",
            TaskState::BudgetExhausted => "budget_exhausted",
            TaskState::Paused => "paused",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Whether the task can never run again.
    pub fn is_final(self) -> bool {
        !matches!(self, TaskState::Running | TaskState::Paused)
    }

    /// Parses [`TaskState::as_str`].
    pub fn parse(s: &str) -> Option<TaskState> {
        [
            TaskState::Running,
            TaskState::Finished,
            TaskState::Failed,
            TaskState::BudgetExhausted,
            TaskState::Paused,
            TaskState::Cancelled,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// What a client reports with its upload: aggregate facts of its local training.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrainSummary {
    /// Local training examples.
    pub n_examples: u64,
    /// Mean training loss.
    pub train_loss: f64,
    /// Update norm before clipping (0 under privacy).
    pub norm_before_clip: f64,
    /// Adaptive clipping: the client's (noised, where it adds noise) count of unclipped
    /// contributions.
    pub unclipped: f64,
}

/// A complete upload, reassembled and checksummed by the service.
#[derive(Debug)]
pub struct Upload {
    /// Sender.
    pub client: ClientId,
    /// The round it is for.
    pub round: RoundId,
    /// The update's values.
    pub values: Vec<f32>,
    /// The client's FedAvg weight.
    pub weight: f64,
    /// Training facts.
    pub summary: TrainSummary,
}

/// One round's outcome, as shown by status and persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSummary {
    /// The round.
    pub round: RoundId,
    /// 1-based index among the task's committed rounds (0 if failed).
    pub index: u64,
    /// Final or current phase name.
    pub phase: &'static str,
    /// Cohort size.
    pub cohort_size: u32,
    /// Accepted uploads.
    pub n_uploads: u32,
    /// Rejected requests.
    pub n_rejected: u32,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Aggregated evaluation, if any.
    pub eval: Option<EvalSums>,
    /// Model version it produced (or the base version if it failed).
    pub model_version: ModelVersion,
    /// Example-weighted mean training loss of the accepted uploads.
    pub mean_train_loss: f64,
    /// Under secure aggregation: the round's parameters and who dropped when (not persisted).
    pub secure: Option<SecureSummary>,
}

/// What a secure-aggregation round shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SecureSummary {
    /// Stores drawn into the cohort.
    pub cohort: u32,
    /// b.
    pub bits: u32,
    /// The graph's degree k.
    pub degree: u32,
    /// The Shamir threshold t.
    pub threshold: u32,
    /// Dropped before advertising keys.
    pub dropped_before_advertising: u32,
    /// Advertised but did not share keys.
    pub dropped_before_sharing: u32,
    /// Shared keys but did not upload.
    pub dropped_before_upload: u32,
    /// Uploaded but did not answer the unmask request.
    pub dropped_before_unmasking: u32,
}

/// A task's status.
#[derive(Debug, Clone)]
pub struct TaskStatus {
    /// The task.
    pub task: TaskId,
    /// Its spec.
    pub spec: Arc<TaskSpec>,
    /// Lifecycle state.
    pub state: TaskState,
    /// Why it is in that state.
    pub state_reason: String,
    /// Newest committed model version.
    pub model_version: ModelVersion,
    /// Rounds committed.
    pub committed_rounds: u64,
    /// Rounds failed.
    pub failed_rounds: u64,
    /// Clients seen recently.
    pub connected_clients: u32,
    /// Current phase.
    pub phase: &'static str,
    /// Newest rounds first.
    pub rounds: Vec<RoundSummary>,
    /// What the task has spent, for tasks with differential privacy.
    pub privacy: Option<PrivacyReport>,
}

/// The privacy a task's newest model carries: every charged round, composed.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyReport {
    /// ε spent so far at `delta` (by the task's accountant).
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The budget.
    pub target_epsilon: f64,
    /// The protected unit.
    pub unit: fedretail_core::privacy::PrivacyUnit,
    /// Where noise is added.
    pub noise_placement: fedretail_core::privacy::NoisePlacement,
    /// Rounds charged.
    pub rounds: u64,
    /// q per round.
    pub sampling_rate: f64,
    /// z per round.
    pub noise_multiplier: f64,
    /// C.
    pub clip_norm: f32,
    /// The accountant `epsilon` comes from.
    pub accountant: fedretail_core::privacy::accountant::AccountantKind,
    /// ε against the coordinator itself: infinite under central noise (it sees each clipped
    /// update), and under distributed or local noise without secure aggregation the ε of the
    /// share one store adds, unamplified for stores (the coordinator knows the cohort).
    pub epsilon_against_coordinator: f64,
    /// The privacy domain the task draws on.
    pub domain: String,
    /// What every task of the domain has spent together after this task's last charge, where
    /// the policy bounds domains.
    pub domain_epsilon: Option<f64>,
    /// δ of `domain_epsilon`.
    pub domain_delta: f64,
    /// Charged rounds lost to crashes (recorded failed as interrupted).
    pub interrupted_rounds: u64,
    /// What the noised evaluation reports have spent.
    pub evaluation_epsilon: f64,
    /// Their budget.
    pub evaluation_budget: f64,
    /// Evaluating rounds charged.
    pub evaluation_rounds: u64,
    /// Training and evaluation composed: what somebody who sees the model and every
    /// evaluation faces.
    pub total_epsilon: f64,
}

/// A model version's parameters and checksum, shared without copying.
#[derive(Debug)]
pub struct ModelBlob {
    /// The version.
    pub version: ModelVersion,
    /// The parameters.
    pub values: Vec<f32>,
    /// SHA-256 of their little-endian bytes.
    pub sha256: [u8; 32],
}

impl ModelBlob {
    /// Wraps parameters, computing the checksum.
    pub fn new(version: ModelVersion, values: Vec<f32>) -> ModelBlob {
        let sha256 = fedretail_core::update::sha256_f32s(&values);
        ModelBlob { version, values, sha256 }
    }
}

/// Requests to a task's driver. Each carries its reply channel.
#[derive(Debug)]
pub(crate) enum Request {
    Enroll {
        store_name: String,
        reply: oneshot::Sender<Result<ClientId, Reject>>,
    },
    Poll {
        client: ClientId,
        reply: oneshot::Sender<Result<Assignment, Reject>>,
    },
    Owner {
        client: ClientId,
        store: String,
        reply: oneshot::Sender<Result<(), Reject>>,
    },
    Model {
        client: ClientId,
        version: ModelVersion,
        reply: oneshot::Sender<Result<Arc<ModelBlob>, Reject>>,
    },
    LatestModel {
        reply: oneshot::Sender<Arc<ModelBlob>>,
    },
    BeginUpload {
        client: ClientId,
        round: RoundId,
        reply: oneshot::Sender<Result<(usize, tokio::time::Instant), Reject>>,
    },
    Rejected {
        round: RoundId,
    },
    Upload {
        upload: Upload,
        reply: oneshot::Sender<Result<(), Reject>>,
    },
    MaskedUpload {
        upload: MaskedUpload,
        reply: oneshot::Sender<Result<(), Reject>>,
    },
    Advertise {
        client: ClientId,
        round: RoundId,
        advert: Advertised,
        identity: Identity,
        reply: oneshot::Sender<Result<(), Reject>>,
    },
    Share {
        client: ClientId,
        round: RoundId,
        sealed: Vec<Sealed>,
        reply: oneshot::Sender<Result<(), Reject>>,
    },
    Unmask {
        client: ClientId,
        round: RoundId,
        revealed: Vec<Revealed>,
        reply: oneshot::Sender<Result<(), Reject>>,
    },
    Report {
        client: ClientId,
        round: RoundId,
        sums: EvalSums,
        reply: oneshot::Sender<Result<(), Reject>>,
    },
    Status {
        max_rounds: usize,
        reply: oneshot::Sender<TaskStatus>,
    },
    Control {
        action: Control,
        reply: oneshot::Sender<Result<TaskStatus, Reject>>,
    },
}

/// What an operator can do to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Start no new rounds.
    Pause,
    /// Start rounds again.
    Resume,
    /// End the task for good.
    Cancel,
}

/// The way into a running task: bounded queues to its driver, with a reply per request. Stores'
/// requests share one queue; administrators' (status, control, export) have their own, which
/// the driver serves first, so a flood of store requests cannot delay an operator (L3).
#[derive(Debug, Clone)]
pub struct RoundHandle {
    task: TaskId,
    spec: Arc<TaskSpec>,
    tx: mpsc::Sender<Request>,
    admin_tx: mpsc::Sender<Request>,
    changes: watch::Receiver<u64>,
}

impl RoundHandle {
    /// The task this handle drives.
    pub fn task(&self) -> TaskId {
        self.task
    }

    /// The task's specification (fixed at creation).
    pub fn spec(&self) -> &Arc<TaskSpec> {
        &self.spec
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, Reject> {
        Self::ask_on(&self.tx, make).await
    }

    /// Asks on the administrators' queue.
    async fn ask_admin<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, Reject> {
        Self::ask_on(&self.admin_tx, make).await
    }

    async fn ask_on<T>(
        tx: &mpsc::Sender<Request>,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, Reject> {
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply)).await.map_err(|_| Reject::ShuttingDown)?;
        rx.await.map_err(|_| Reject::ShuttingDown)
    }

    /// Enrols a store; returns its client id.
    pub async fn enroll(&self, store_name: String) -> Result<ClientId, Reject> {
        self.ask(|reply| Request::Enroll { store_name, reply }).await?
    }

    /// Checks that `client` was enrolled by `store` (the name its certificate carries).
    pub async fn check_owner(&self, client: ClientId, store: String) -> Result<(), Reject> {
        self.ask(|reply| Request::Owner { client, store, reply }).await?
    }

    /// The client's next assignment, waiting up to `timeout` for one other than `Wait`.
    pub async fn poll(&self, client: ClientId, timeout: Duration) -> Result<Assignment, Reject> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.changes.clone();
        loop {
            changes.mark_unchanged();
            let next = self.ask(|reply| Request::Poll { client, reply }).await??;
            if next != Assignment::Wait {
                return Ok(next);
            }
            // Ask again whenever the driver moves on: a commit and the next round's start are
            // separate changes, and the client should not see `Wait` between them.
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // The timeout, or a stopped driver: the client asks again later.
                Ok(Err(_)) | Err(_) => return Ok(Assignment::Wait),
            }
        }
    }

    /// One model version, for a client of this task.
    pub async fn model(
        &self,
        client: ClientId,
        version: ModelVersion,
    ) -> Result<Arc<ModelBlob>, Reject> {
        self.ask(|reply| Request::Model { client, version, reply }).await?
    }

    /// The newest committed model.
    pub async fn latest_model(&self) -> Result<Arc<ModelBlob>, Reject> {
        self.ask_admin(|reply| Request::LatestModel { reply }).await
    }

    /// Checks that `client` may upload for `round`; returns the expected size and the instant
    /// by which the upload must have ended.
    pub async fn begin_upload(
        &self,
        client: ClientId,
        round: RoundId,
    ) -> Result<(usize, tokio::time::Instant), Reject> {
        self.ask(|reply| Request::BeginUpload { client, round, reply }).await?
    }

    /// Tells the round that the service refused a request for it (malformed stream, checksum).
    pub async fn rejected(&self, round: RoundId) {
        let _ = self.tx.send(Request::Rejected { round }).await;
    }

    /// Hands over a complete upload.
    pub async fn upload(&self, upload: Upload) -> Result<(), Reject> {
        self.ask(|reply| Request::Upload { upload, reply }).await?
    }

    /// Hands over a complete masked upload.
    pub async fn masked_upload(&self, upload: MaskedUpload) -> Result<(), Reject> {
        self.ask(|reply| Request::MaskedUpload { upload, reply }).await?
    }

    /// Secure aggregation: a client's signed keys and the identity key they verify with.
    pub async fn advertise(
        &self,
        client: ClientId,
        round: RoundId,
        advert: Advertised,
        identity: Identity,
    ) -> Result<(), Reject> {
        self.ask(|reply| Request::Advertise { client, round, advert, identity, reply }).await?
    }

    /// Secure aggregation: a client's sealed shares for its neighbours.
    pub async fn share(
        &self,
        client: ClientId,
        round: RoundId,
        sealed: Vec<Sealed>,
    ) -> Result<(), Reject> {
        self.ask(|reply| Request::Share { client, round, sealed, reply }).await?
    }

    /// Secure aggregation: the shares a client reveals.
    pub async fn unmask(
        &self,
        client: ClientId,
        round: RoundId,
        revealed: Vec<Revealed>,
    ) -> Result<(), Reject> {
        self.ask(|reply| Request::Unmask { client, round, revealed, reply }).await?
    }

    /// Reports evaluation sums.
    pub async fn report(
        &self,
        client: ClientId,
        round: RoundId,
        sums: EvalSums,
    ) -> Result<(), Reject> {
        self.ask(|reply| Request::Report { client, round, sums, reply }).await?
    }

    /// Pauses, resumes or cancels the task; returns its status afterwards.
    pub async fn control(&self, action: Control) -> Result<TaskStatus, Reject> {
        self.ask_admin(|reply| Request::Control { action, reply }).await?
    }

    /// The task's status with its newest `max_rounds` rounds.
    pub async fn status(&self, max_rounds: usize) -> Result<TaskStatus, Reject> {
        self.ask_admin(|reply| Request::Status { max_rounds, reply }).await
    }
}
