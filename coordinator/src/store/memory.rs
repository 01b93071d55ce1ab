//! An in-memory [`Store`] for tests and the simulator. Nothing survives the process.

use super::{AuditEvent, AuditRecord, CommitRecord, Snapshot, Store, StoreError, StoredTask};
use crate::round::{ModelBlob, RoundSummary, TaskState};
use fedretail_core::ids::{RoundId, TaskId};
use fedretail_core::optim::OptimizerState;
use fedretail_core::plan::TaskSpec;
use fedretail_core::privacy::LedgerEntry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Tasks and snapshots in a mutex-guarded map.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_task: u64,
    next_round: u64,
    tasks: BTreeMap<TaskId, (StoredTask, Snapshot)>,
    /// Test hook: how many further commits fail.
    failing_commits: u32,
    audit: Vec<AuditRecord>,
}

impl Inner {
    fn push_audit(&mut self, event: &AuditEvent) {
        let seq = self.audit.len() as u64 + 1;
        self.audit.push(AuditRecord { seq, unix_ms: super::unix_ms(), event: event.clone() });
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Makes the next `n` commits fail, to test that a failed commit fails the round.
    pub fn fail_next_commits(&self, n: u32) {
        self.lock().failing_commits = n;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for MemoryStore {
    fn create_task(&self, spec: &TaskSpec, initial: Arc<ModelBlob>) -> Result<TaskId, StoreError> {
        let mut inner = self.lock();
        if inner.tasks.values().any(|(t, _)| t.spec.name == spec.name) {
            return Err(StoreError::DuplicateTask(spec.name.clone()));
        }
        inner.next_task += 1;
        let id = TaskId(inner.next_task);
        let task =
            StoredTask { id, spec: spec.clone(), state: TaskState::Running, reason: String::new() };
        let snapshot = Snapshot {
            model: initial,
            optimizer: OptimizerState::default(),
            committed_rounds: 0,
            failed_rounds: 0,
            history: Vec::new(),
            ledger: Vec::new(),
            interrupted_rounds: 0,
        };
        inner.tasks.insert(id, (task, snapshot));
        Ok(id)
    }

    fn tasks(&self) -> Result<Vec<StoredTask>, StoreError> {
        Ok(self.lock().tasks.values().map(|(t, _)| t.clone()).collect())
    }

    fn load(&self, task: TaskId) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.lock().tasks.get(&task).map(|(_, s)| s.clone()))
    }

    fn next_round_id(&self) -> Result<RoundId, StoreError> {
        let mut inner = self.lock();
        inner.next_round += 1;
        Ok(RoundId(inner.next_round))
    }

    fn commit(&self, record: CommitRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.failing_commits > 0 {
            inner.failing_commits -= 1;
            return Err(StoreError::Backend("injected commit failure".into()));
        }
        let (_, snap) =
            inner.tasks.get_mut(&record.task).ok_or(StoreError::UnknownTask(record.task))?;
        snap.model = record.model;
        snap.optimizer = record.optimizer;
        snap.committed_rounds += 1;
        snap.history.push(record.summary);
        inner.push_audit(&record.audit);
        Ok(())
    }

    fn charge(
        &self,
        task: TaskId,
        entry: &LedgerEntry,
        limits: &super::ChargeLimits,
    ) -> Result<Option<f64>, StoreError> {
        let mut inner = self.lock();
        let of_task = inner
            .tasks
            .get(&task)
            .ok_or(StoreError::UnknownTask(task))?
            .1
            .ledger
            .iter()
            .filter(|e| e.kind == entry.kind)
            .map(LedgerEntry::charge)
            .collect();
        let of_domain = inner
            .tasks
            .values()
            .filter(|(t, _)| t.spec.privacy.as_ref().is_some_and(|p| p.domain == limits.domain))
            .flat_map(|(_, s)| s.ledger.iter().map(LedgerEntry::charge))
            .collect();
        let domain_epsilon = limits.check(entry, of_task, of_domain)?;
        let (_, snap) = inner.tasks.get_mut(&task).ok_or(StoreError::UnknownTask(task))?;
        snap.ledger.push(*entry);
        Ok(domain_epsilon)
    }

    fn is_durable(&self) -> bool {
        false
    }

    fn recover_interrupted(&self, _task: TaskId) -> Result<u64, StoreError> {
        // Nothing outlives the process, so nothing is ever interrupted across a restart.
        Ok(0)
    }

    fn record_failure(&self, task: TaskId, summary: &RoundSummary) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let (_, snap) = inner.tasks.get_mut(&task).ok_or(StoreError::UnknownTask(task))?;
        snap.failed_rounds += 1;
        snap.history.push(summary.clone());
        Ok(())
    }

    fn set_task_state(
        &self,
        task: TaskId,
        state: TaskState,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let (t, _) = inner.tasks.get_mut(&task).ok_or(StoreError::UnknownTask(task))?;
        t.state = state;
        t.reason = reason.to_string();
        Ok(())
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.lock().push_audit(event);
        Ok(())
    }

    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(self.lock().audit.iter().filter(|r| r.seq > after).take(limit).cloned().collect())
    }
}
