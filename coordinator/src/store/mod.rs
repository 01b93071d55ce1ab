//! Durable state of the coordinator: tasks, committed rounds and their models.
//!
//! The trait is synchronous, like SQLite; the driver calls it on a blocking thread.

mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

use crate::round::{ModelBlob, RoundSummary, TaskState};
use fedretail_core::ids::{RoundId, TaskId};
use fedretail_core::optim::OptimizerState;
use fedretail_core::plan::TaskSpec;
use fedretail_core::privacy::LedgerEntry;
use fedretail_core::privacy::accountant::{Accountant, AccountantKind, Charge};
use std::sync::Arc;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A task with this name exists already.
    #[error("a task named {0:?} already exists")]
    DuplicateTask(String),
    /// No task with this id.
    #[error("no task {0}")]
    UnknownTask(TaskId),
    /// The backend failed.
    #[error("store backend: {0}")]
    Backend(String),
    /// The charge would take the task or its privacy domain over its budget; nothing was
    /// written.
    #[error("privacy budget: {0}")]
    BudgetExceeded(String),
}

/// The budgets a charge is checked against, in the transaction that writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChargeLimits {
    /// The task's accountant (also composes the domain).
    pub accountant: AccountantKind,
    /// The task's ε budget and δ.
    pub task_epsilon: f64,
    /// δ of the task's guarantee.
    pub task_delta: f64,
    /// Every round of the task's plan, when the whole plan is known to fit the budget: a
    /// ledger of only such rounds, no longer than the plan, is admitted without recomposing it
    /// (ε only grows with rounds).
    pub plan: Option<Charge>,
    /// The privacy domain.
    pub domain: String,
    /// The ceiling on the domain's total (infinite: none).
    pub domain_epsilon: f64,
    /// δ at which the domain is composed.
    pub domain_delta: f64,
}

impl ChargeLimits {
    /// Checks that `entry` fits: `task` holds the task's charges of its kind so far, `domain`
    /// the domain's; returns the domain's ε with `entry` when there is a ceiling to check it
    /// against. Both stores call this inside the transaction that writes `entry`.
    ///
    /// # Errors
    ///
    /// [`StoreError::BudgetExceeded`] naming the budget.
    pub fn check(
        &self,
        entry: &LedgerEntry,
        mut task: Vec<Charge>,
        mut domain: Vec<Charge>,
    ) -> Result<Option<f64>, StoreError> {
        task.push(entry.charge());
        domain.push(entry.charge());
        let (task, domain) = (&task[..], &domain[..]);
        let within_plan = self.plan.is_some_and(|plan| {
            task.len() as u64 <= plan.rounds
                && task.iter().all(|c| {
                    c.sampling_rate == plan.sampling_rate
                        && c.noise_multiplier == plan.noise_multiplier
                })
        });
        if !within_plan {
            let e = self
                .accountant
                .epsilon(task, self.task_delta)
                .map_err(|e| StoreError::BudgetExceeded(e.to_string()))?;
            if e.epsilon > self.task_epsilon * (1.0 + 1e-9) {
                return Err(StoreError::BudgetExceeded(format!(
                    "the task would spend epsilon {:.4} of its {}",
                    e.epsilon, self.task_epsilon
                )));
            }
        }
        if !self.domain_epsilon.is_finite() {
            return Ok(None);
        }
        let e = self
            .accountant
            .epsilon(domain, self.domain_delta)
            .map_err(|e| StoreError::BudgetExceeded(e.to_string()))?;
        if e.epsilon > self.domain_epsilon * (1.0 + 1e-9) {
            return Err(StoreError::BudgetExceeded(format!(
                "privacy domain {:?} would spend epsilon {:.4} of the coordinator's ceiling {} (delta {})",
                self.domain, e.epsilon, self.domain_epsilon, self.domain_delta
            )));
        }
        Ok(Some(e.epsilon))
    }
}

/// A task as persisted.
#[derive(Debug, Clone)]
pub struct StoredTask {
    /// Its id.
    pub id: TaskId,
    /// Its spec.
    pub spec: TaskSpec,
    /// Lifecycle state.
    pub state: TaskState,
    /// Why.
    pub reason: String,
}

/// The newest committed state of a task: where a restarted coordinator resumes.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The newest committed model.
    pub model: Arc<ModelBlob>,
    /// Server optimiser state after it.
    pub optimizer: OptimizerState,
    /// Committed rounds.
    pub committed_rounds: u64,
    /// Failed rounds.
    pub failed_rounds: u64,
    /// Newest rounds last.
    pub history: Vec<RoundSummary>,
    /// Every privacy charge, oldest first (rounds that crashed after their charge included).
    pub ledger: Vec<LedgerEntry>,
    /// Charged rounds that never committed because the coordinator stopped in between.
    pub interrupted_rounds: u64,
}

/// The failure recorded for a round that was charged and then lost to a crash.
pub const INTERRUPTED: &str =
    "interrupted: charged, then the coordinator stopped before the commit";

/// One entry of the coordinator's append-only audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// Who: a certificate's name, or `coordinator` for what the coordinator did on its own.
    pub actor: String,
    /// The actor's role (`operator`, `auditor`, `exporter`, `store`, `coordinator`, or
    /// `insecure` when nobody is authenticated).
    pub role: String,
    /// What: `create_task`, `pause_task`, `export_model`, `task_ended`, `round_committed`, ...
    pub action: String,
    /// The task concerned, if any.
    pub task: Option<TaskId>,
    /// `ok`, or why it was refused.
    pub outcome: String,
    /// Details as JSON.
    pub detail: serde_json::Value,
}

impl AuditEvent {
    /// An event the coordinator records on its own behalf.
    pub fn coordinator(action: &str, task: TaskId, detail: serde_json::Value) -> AuditEvent {
        AuditEvent {
            actor: "coordinator".into(),
            role: "coordinator".into(),
            action: action.into(),
            task: Some(task),
            outcome: "ok".into(),
            detail,
        }
    }
}

/// An audit event as stored: with its sequence number and time.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Position in the log, from 1, never reused.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The event.
    pub event: AuditEvent,
}

/// Reads the audit log of the SQLite database at `path` read-only, without the coordinator's
/// lock, so it works while a coordinator runs on it.
///
/// # Errors
///
/// An unreadable database.
pub fn read_audit_log(
    path: &std::path::Path,
    after: u64,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    sqlite::open_read_only(path, after, limit)
}

/// Milliseconds since the Unix epoch, for audit records.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything one committed round writes, in one transaction.
#[derive(Debug, Clone)]
pub struct CommitRecord {
    /// The task.
    pub task: TaskId,
    /// The round's outcome.
    pub summary: RoundSummary,
    /// The new model.
    pub model: Arc<ModelBlob>,
    /// Optimiser state after the round.
    pub optimizer: OptimizerState,
    /// The audit entry of the commit, written in the same transaction.
    pub audit: AuditEvent,
}

/// Persistence for tasks and rounds.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Persists a new task and its initial model (version 0).
    ///
    /// # Errors
    ///
    /// [`StoreError::DuplicateTask`] if the name is taken; backend errors.
    fn create_task(&self, spec: &TaskSpec, initial: Arc<ModelBlob>) -> Result<TaskId, StoreError>;

    /// Every task.
    ///
    /// # Errors
    ///
    /// Backend errors.
    fn tasks(&self) -> Result<Vec<StoredTask>, StoreError>;

    /// The newest committed state of a task.
    ///
    /// # Behavior
    ///
    /// `Ok(None)` if the task does not exist.
    ///
    /// # Errors
    ///
    /// Backend errors.
    fn load(&self, task: TaskId) -> Result<Option<Snapshot>, StoreError>;

    /// A round id never handed out before, for any task.
    ///
    /// # Errors
    ///
    /// Backend errors.
    fn next_round_id(&self) -> Result<RoundId, StoreError>;

    /// Commits a round: summary, model and optimiser state together or not at all.
    ///
    /// # Errors
    ///
    /// Backend errors; then nothing was written.
    fn commit(&self, record: CommitRecord) -> Result<(), StoreError>;

    /// Durably records a round's privacy charge against the task's privacy domain, after
    /// checking in the same transaction that the task and the domain stay within `limits`;
    /// returns the domain's ε after it where the domain has a ceiling.
    /// Called when the round's noise is drawn and before anything derived from the noised sum
    /// leaves the coordinator.
    ///
    /// # Errors
    ///
    /// [`StoreError::BudgetExceeded`] (nothing written); backend errors. Either way the round
    /// must release nothing.
    fn charge(
        &self,
        task: TaskId,
        entry: &LedgerEntry,
        limits: &ChargeLimits,
    ) -> Result<Option<f64>, StoreError>;

    /// Whether what is written survives the process (a private task needs that).
    fn is_durable(&self) -> bool;

    /// Records every charged round of `task` that has no round record (the coordinator died
    /// between its charge and its commit) as failed, "interrupted"; returns how many.
    ///
    /// # Errors
    ///
    /// Backend errors.
    fn recover_interrupted(&self, task: TaskId) -> Result<u64, StoreError>;

    /// Records a failed round (no model; a charge already made stays).
    ///
    /// # Errors
    ///
    /// Backend errors.
    fn record_failure(&self, task: TaskId, summary: &RoundSummary) -> Result<(), StoreError>;

    /// Sets a task's lifecycle state.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownTask`]; backend errors.
    fn set_task_state(
        &self,
        task: TaskId,
        state: TaskState,
        reason: &str,
    ) -> Result<(), StoreError>;

    /// Appends to the audit log.
    ///
    /// # Errors
    ///
    /// Backend errors.
    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;

    /// Audit records with a sequence number above `after`, oldest first, at most `limit`.
    ///
    /// # Errors
    ///
    /// Backend errors.
    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
}
