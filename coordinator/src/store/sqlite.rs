//! The SQLite [`Store`]: one file, one transaction per commit, so a crash leaves either the
//! old or the new round, never half of one.

use super::{AuditEvent, AuditRecord, CommitRecord, Snapshot, Store, StoreError, StoredTask};
use crate::round::{ModelBlob, RoundSummary, TaskState};
use fedretail_core::ids::{ModelVersion, RoundId, TaskId};
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::optim::OptimizerState;
use fedretail_core::plan::TaskSpec;
use fedretail_core::privacy::accountant::Charge;
use fedretail_core::privacy::{ChargeKind, LedgerEntry, PrivacyUnit};
use fedretail_core::update::{decode_f32s, encode_f32s};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::{Arc, Mutex};

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec TEXT NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    task_id INTEGER PRIMARY KEY REFERENCES tasks(id), version INTEGER NOT NULL, model BLOB NOT NULL,
    opt_m BLOB NOT NULL, opt_v BLOB NOT NULL, opt_t INTEGER NOT NULL,
    committed_rounds INTEGER NOT NULL, failed_rounds INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    round_id INTEGER NOT NULL, task_id INTEGER NOT NULL REFERENCES tasks(id),
    sampling_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, clip_norm REAL NOT NULL, unit TEXT NOT NULL,
    domain TEXT NOT NULL DEFAULT 'default', kind TEXT NOT NULL DEFAULT 'train',
    PRIMARY KEY (round_id, kind)
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks(id), idx INTEGER NOT NULL,
    committed INTEGER NOT NULL, cohort_size INTEGER NOT NULL, n_uploads INTEGER NOT NULL,
    n_rejected INTEGER NOT NULL, failure TEXT, model_version INTEGER NOT NULL, mean_train_loss REAL NOT NULL,
    eval_n_ratings INTEGER, eval_squared_error REAL, eval_absolute_error REAL,
    eval_n_ranked INTEGER, eval_hits REAL, eval_ndcg REAL, eval_actual_sum REAL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, unix_ms INTEGER NOT NULL, actor TEXT NOT NULL,
    role TEXT NOT NULL, action TEXT NOT NULL, task_id INTEGER, outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
-- The audit log is append-only: the database itself refuses to change or remove an entry.
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

/// Columns added after a database format was first released: (table, column, type). Databases
/// created before them gain them on opening.
const ADDED_COLUMNS: [(&str, &str, &str); 1] = [("rounds", "eval_actual_sum", "REAL")];

/// A store in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// An exclusive lock on `<database>.lock`, held while the store is open: a second
    /// coordinator on the same file refuses to start instead of spending the same budget.
    _lock: std::fs::File,
}

/// Opens `path` for writing, creating it with mode 0600 if it does not exist.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn blob(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_f32s(values, &mut out);
    out
}

fn floats(bytes: &[u8]) -> Result<Vec<f32>, StoreError> {
    let mut out = Vec::with_capacity(bytes.len() / 4);
    decode_f32s(bytes, &mut out).map_err(backend)?;
    Ok(out)
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`.
    ///
    /// # Errors
    ///
    /// The file cannot be opened or is not a fedretail database.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let lock_path = path.with_extension("lock");
        let lock = private_file(&lock_path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Backend(format!(
                    "{} is in use by another coordinator (its lock {} is held)",
                    path.display(),
                    lock_path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Backend(format!("{}: {e}", lock_path.display())));
            }
        }
        // Created private: the database holds models, the ledger and the audit log (SQLite
        // gives its journal files the database's permissions).
        private_file(path).map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let at = |e: rusqlite::Error| StoreError::Backend(format!("{}: {e}", path.display()));
        conn.execute_batch(SCHEMA).map_err(at)?;
        // Ledgers from before evaluation charges keyed rows by round alone; a round now has a
        // training and an evaluation charge.
        let ledger_sql: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger'",
                [],
                |r| r.get(0),
            )
            .map_err(at)?;
        if !ledger_sql.contains("PRIMARY KEY (round_id, kind)") {
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE ledger RENAME TO ledger_v1;
                 CREATE TABLE ledger (
                     round_id INTEGER NOT NULL, task_id INTEGER NOT NULL REFERENCES tasks(id),
                     sampling_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, clip_norm REAL NOT NULL,
                     unit TEXT NOT NULL, domain TEXT NOT NULL DEFAULT 'default',
                     kind TEXT NOT NULL DEFAULT 'train', PRIMARY KEY (round_id, kind));
                 INSERT INTO ledger (round_id, task_id, sampling_rate, noise_multiplier, clip_norm, unit)
                     SELECT round_id, task_id, sampling_rate, noise_multiplier, clip_norm, unit FROM ledger_v1;
                 DROP TABLE ledger_v1;
                 COMMIT;",
            )
            .map_err(at)?;
        }
        for (table, column, kind) in ADDED_COLUMNS {
            let present: bool = conn
                .query_row(
                    &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                    [column],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(at)?
                > 0;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                    .map_err(at)?;
            }
        }
        Ok(SqliteStore { conn: Mutex::new(conn), _lock: lock })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn insert_audit(conn: &Connection, event: &AuditEvent) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (unix_ms, actor, role, action, task_id, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            super::unix_ms() as i64,
            event.actor,
            event.role,
            event.action,
            event.task.map(|t| t.0 as i64),
            event.outcome,
            event.detail.to_string(),
        ],
    )
    .map_err(backend)?;
    Ok(())
}

/// Reads the audit log of the database at `path` without taking the coordinator's lock (a
/// running coordinator may hold it), for `fedretail-coordinator audit`.
pub(crate) fn open_read_only(
    path: &Path,
    after: u64,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
    read_audit(&conn, after, limit)
}

fn read_audit(conn: &Connection, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT seq, unix_ms, actor, role, action, task_id, outcome, detail FROM audit
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .map_err(backend)?;
    stmt.query_map(params![after as i64, limit as i64], |r| {
        let detail: String = r.get(7)?;
        Ok(AuditRecord {
            seq: r.get::<_, i64>(0)? as u64,
            unix_ms: r.get::<_, i64>(1)? as u64,
            event: AuditEvent {
                actor: r.get(2)?,
                role: r.get(3)?,
                action: r.get(4)?,
                task: r.get::<_, Option<i64>>(5)?.map(|t| TaskId(t as u64)),
                outcome: r.get(6)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            },
        })
    })
    .map_err(backend)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(backend)
}

fn insert_round(
    tx: &rusqlite::Transaction<'_>,
    task: TaskId,
    s: &RoundSummary,
) -> Result<(), StoreError> {
    let e = s.eval;
    tx.execute(
        "INSERT OR REPLACE INTO rounds VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        params![
            s.round.0 as i64,
            task.0 as i64,
            s.index as i64,
            s.failure.is_none(),
            s.cohort_size,
            s.n_uploads,
            s.n_rejected,
            s.failure,
            s.model_version.0 as i64,
            s.mean_train_loss,
            e.map(|e| e.n_ratings as i64),
            e.map(|e| e.squared_error),
            e.map(|e| e.absolute_error),
            e.map(|e| e.n_ranked as i64),
            e.map(|e| e.hits_at_10),
            e.map(|e| e.ndcg_at_10),
            e.map(|e| e.actual_sum),
        ],
    )
    .map_err(backend)?;
    Ok(())
}

impl Store for SqliteStore {
    fn create_task(&self, spec: &TaskSpec, initial: Arc<ModelBlob>) -> Result<TaskId, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(backend)?;
        let exists: Option<i64> = tx
            .query_row("SELECT id FROM tasks WHERE name = ?1", [&spec.name], |r| r.get(0))
            .optional()
            .map_err(backend)?;
        if exists.is_some() {
            return Err(StoreError::DuplicateTask(spec.name.clone()));
        }
        let json = serde_json::to_string(spec).map_err(backend)?;
        tx.execute(
            "INSERT INTO tasks (name, spec, state, reason) VALUES (?1, ?2, 'running', '')",
            params![spec.name, json],
        )
        .map_err(backend)?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO snapshots VALUES (?1, ?2, ?3, x'', x'', 0, 0, 0)",
            params![id, initial.version.0 as i64, blob(&initial.values)],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(TaskId(id as u64))
    }

    fn tasks(&self) -> Result<Vec<StoredTask>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT id, spec, state, reason FROM tasks ORDER BY id")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get(3)?))
            })
            .map_err(backend)?;
        let mut tasks = Vec::new();
        for row in rows {
            let (id, spec, state, reason) = row.map_err(backend)?;
            tasks.push(StoredTask {
                id: TaskId(id as u64),
                spec: serde_json::from_str(&spec)
                    .map_err(|e| backend(format!("task {id}: {e}")))?,
                state: TaskState::parse(&state)
                    .ok_or_else(|| backend(format!("task {id}: unknown state {state:?}")))?,
                reason,
            });
        }
        Ok(tasks)
    }

    fn load(&self, task: TaskId) -> Result<Option<Snapshot>, StoreError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT version, model, opt_m, opt_v, opt_t, committed_rounds, failed_rounds FROM snapshots WHERE task_id = ?1",
                [task.0 as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                },
            )
            .optional()
            .map_err(backend)?;
        let Some((version, model, m, v, t, committed, failed)) = row else { return Ok(None) };
        let mut stmt = conn
            .prepare(
                "SELECT round_id, idx, committed, cohort_size, n_uploads, n_rejected, failure, model_version,
                        mean_train_loss, eval_n_ratings, eval_squared_error, eval_absolute_error, eval_n_ranked,
                        eval_hits, eval_ndcg, eval_actual_sum
                 FROM rounds WHERE task_id = ?1 ORDER BY round_id",
            )
            .map_err(backend)?;
        let history = stmt
            .query_map([task.0 as i64], |r| {
                let eval = match r.get::<_, Option<i64>>(9)? {
                    Some(n_ratings) => Some(EvalSums {
                        n_ratings: n_ratings as u64,
                        squared_error: r.get(10)?,
                        absolute_error: r.get(11)?,
                        n_ranked: r.get::<_, i64>(12)? as u64,
                        hits_at_10: r.get(13)?,
                        ndcg_at_10: r.get(14)?,
                        actual_sum: r.get::<_, Option<f64>>(15)?.unwrap_or(0.0),
                    }),
                    None => None,
                };
                Ok(RoundSummary {
                    round: RoundId(r.get::<_, i64>(0)? as u64),
                    index: r.get::<_, i64>(1)? as u64,
                    phase: if r.get::<_, bool>(2)? { "Committed" } else { "Failed" },
                    cohort_size: r.get(3)?,
                    n_uploads: r.get(4)?,
                    n_rejected: r.get(5)?,
                    failure: r.get(6)?,
                    eval,
                    model_version: ModelVersion(r.get::<_, i64>(7)? as u64),
                    mean_train_loss: r.get(8)?,
                    secure: None,
                })
            })
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        let mut stmt = conn
            .prepare(
                "SELECT round_id, sampling_rate, noise_multiplier, clip_norm, unit, kind FROM ledger
                 WHERE task_id = ?1 ORDER BY round_id, kind DESC",
            )
            .map_err(backend)?;
        let ledger = stmt
            .query_map([task.0 as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, f64>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, f64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(backend)?
            .map(|row| {
                let (round, q, z, c, unit, kind) = row.map_err(backend)?;
                let kind = match kind.as_str() {
                    "train" => ChargeKind::Train,
                    "evaluate" => ChargeKind::Evaluate,
                    other => {
                        return Err(backend(format!(
                            "ledger of round {round}: unknown kind {other:?}"
                        )));
                    }
                };
                let unit = match unit.as_str() {
                    "client" => PrivacyUnit::Client,
                    "customer" => PrivacyUnit::Customer,
                    other => {
                        return Err(backend(format!(
                            "ledger of round {round}: unknown unit {other:?}"
                        )));
                    }
                };
                Ok(LedgerEntry {
                    round: RoundId(round as u64),
                    sampling_rate: q,
                    noise_multiplier: z,
                    clip_norm: c as f32,
                    unit,
                    kind,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let interrupted =
            history.iter().filter(|r| r.failure.as_deref() == Some(super::INTERRUPTED)).count()
                as u64;
        Ok(Some(Snapshot {
            interrupted_rounds: interrupted,
            model: Arc::new(ModelBlob::new(ModelVersion(version as u64), floats(&model)?)),
            optimizer: OptimizerState { m: floats(&m)?, v: floats(&v)?, t: t as u64 },
            committed_rounds: committed as u64,
            failed_rounds: failed as u64,
            history,
            ledger,
        }))
    }

    fn next_round_id(&self) -> Result<RoundId, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(backend)?;
        tx.execute(
            "INSERT INTO counters VALUES ('round', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1",
            [],
        )
        .map_err(backend)?;
        let id: i64 = tx
            .query_row("SELECT value FROM counters WHERE name = 'round'", [], |r| r.get(0))
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(RoundId(id as u64))
    }

    fn commit(&self, record: CommitRecord) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(backend)?;
        let changed = tx
            .execute(
                "UPDATE snapshots SET version = ?2, model = ?3, opt_m = ?4, opt_v = ?5, opt_t = ?6,
                        committed_rounds = committed_rounds + 1
                 WHERE task_id = ?1",
                params![
                    record.task.0 as i64,
                    record.model.version.0 as i64,
                    blob(&record.model.values),
                    blob(&record.optimizer.m),
                    blob(&record.optimizer.v),
                    record.optimizer.t as i64,
                ],
            )
            .map_err(backend)?;
        if changed != 1 {
            return Err(StoreError::UnknownTask(record.task));
        }
        insert_round(&tx, record.task, &record.summary)?;
        insert_audit(&tx, &record.audit)?;
        tx.commit().map_err(backend)
    }

    fn charge(
        &self,
        task: TaskId,
        entry: &LedgerEntry,
        limits: &super::ChargeLimits,
    ) -> Result<Option<f64>, StoreError> {
        let unit = match entry.unit {
            PrivacyUnit::Client => "client",
            PrivacyUnit::Customer => "customer",
        };
        let mut conn = self.lock();
        // IMMEDIATE: the write lock is taken before the ledger is read, so the check and the
        // charge see and write the same ledger.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(backend)?;
        let charges =
            |sql: &str, params: &[&dyn rusqlite::ToSql]| -> Result<Vec<Charge>, StoreError> {
                let mut stmt = tx.prepare(sql).map_err(backend)?;
                stmt.query_map(params, |r| {
                    Ok(Charge { sampling_rate: r.get(0)?, noise_multiplier: r.get(1)?, rounds: 1 })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)
            };
        let of_task = charges(
            "SELECT sampling_rate, noise_multiplier FROM ledger WHERE task_id = ?1 AND kind = ?2",
            &[&(task.0 as i64), &entry.kind.as_str()],
        )?;
        let of_domain = charges(
            "SELECT sampling_rate, noise_multiplier FROM ledger WHERE domain = ?1",
            &[&limits.domain],
        )?;
        let domain_epsilon = limits.check(entry, of_task, of_domain)?;
        tx.execute(
            "INSERT INTO ledger (round_id, task_id, sampling_rate, noise_multiplier, clip_norm, unit, domain, kind)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                entry.round.0 as i64,
                task.0 as i64,
                entry.sampling_rate,
                entry.noise_multiplier,
                f64::from(entry.clip_norm),
                unit,
                limits.domain,
                entry.kind.as_str(),
            ],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(domain_epsilon)
    }

    fn is_durable(&self) -> bool {
        true
    }

    fn recover_interrupted(&self, task: TaskId) -> Result<u64, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(backend)?;
        let n = tx
            .execute(
                "INSERT INTO rounds (round_id, task_id, idx, committed, cohort_size, n_uploads, n_rejected,
                                     failure, model_version, mean_train_loss)
                 SELECT l.round_id, l.task_id, 0, 0, 0, 0, 0, ?2, s.version, 0
                 FROM ledger l JOIN snapshots s ON s.task_id = l.task_id
                 WHERE l.task_id = ?1 AND l.kind = 'train'
                   AND NOT EXISTS (SELECT 1 FROM rounds r WHERE r.round_id = l.round_id)",
                params![task.0 as i64, super::INTERRUPTED],
            )
            .map_err(backend)?;
        if n > 0 {
            tx.execute(
                "UPDATE snapshots SET failed_rounds = failed_rounds + ?2 WHERE task_id = ?1",
                params![task.0 as i64, n as i64],
            )
            .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(n as u64)
    }

    fn record_failure(&self, task: TaskId, summary: &RoundSummary) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(backend)?;
        let changed = tx
            .execute(
                "UPDATE snapshots SET failed_rounds = failed_rounds + 1 WHERE task_id = ?1",
                [task.0 as i64],
            )
            .map_err(backend)?;
        if changed != 1 {
            return Err(StoreError::UnknownTask(task));
        }
        insert_round(&tx, task, summary)?;
        tx.commit().map_err(backend)
    }

    fn set_task_state(
        &self,
        task: TaskId,
        state: TaskState,
        reason: &str,
    ) -> Result<(), StoreError> {
        let changed = self
            .lock()
            .execute(
                "UPDATE tasks SET state = ?2, reason = ?3 WHERE id = ?1",
                params![task.0 as i64, state.as_str(), reason],
            )
            .map_err(backend)?;
        if changed != 1 {
            return Err(StoreError::UnknownTask(task));
        }
        Ok(())
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.audit_impl(event)
    }

    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        read_audit(&self.lock(), after, limit)
    }
}

impl SqliteStore {
    fn audit_impl(&self, event: &AuditEvent) -> Result<(), StoreError> {
        insert_audit(&self.lock(), event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedretail_core::optim::ServerOptimizer;
    use fedretail_core::plan::{ModelSpec, TrainingPlan};

    fn spec(name: &str) -> TaskSpec {
        TaskSpec {
            name: name.into(),
            model: ModelSpec::Bench { n_params: 2 },
            plan: TrainingPlan {
                rounds: 2,
                cohort_size: 1,
                min_clients: 1,
                local_epochs: 1,
                clip_norm: 1.0,
                server_optimizer: ServerOptimizer::FedAvgM { learning_rate: 1.0, momentum: 0.5 },
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
            privacy: None,
        }
    }

    fn limits() -> crate::store::ChargeLimits {
        crate::store::ChargeLimits {
            accountant: fedretail_core::privacy::accountant::AccountantKind::Rdp,
            task_epsilon: 100.0,
            task_delta: 1e-5,
            plan: None,
            domain: "d".into(),
            domain_epsilon: f64::INFINITY,
            domain_delta: 1e-5,
        }
    }

    fn summary(round: u64, failure: Option<&str>) -> RoundSummary {
        RoundSummary {
            round: RoundId(round),
            index: if failure.is_some() { 0 } else { 1 },
            phase: if failure.is_some() { "Failed" } else { "Committed" },
            cohort_size: 1,
            n_uploads: 1,
            n_rejected: 2,
            failure: failure.map(str::to_string),
            eval: failure.is_none().then_some(EvalSums {
                n_ratings: 4,
                squared_error: 1.0,
                actual_sum: 7.0,
                ..EvalSums::default()
            }),
            model_version: ModelVersion(1),
            mean_train_loss: 0.5,
            secure: None,
        }
    }

    /// Issue 10 (M8): a round charged before a crash that never committed is recorded failed
    /// ("interrupted") when the store is next opened, so every charge has a round record.
    #[test]
    fn charged_rounds_lost_to_a_crash_are_recorded_as_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let id = {
            let store = SqliteStore::open(&path).unwrap();
            let id = store
                .create_task(&spec("a"), Arc::new(ModelBlob::new(ModelVersion(0), vec![0.0, 0.0])))
                .unwrap();
            let round = store.next_round_id().unwrap();
            let entry = LedgerEntry {
                round,
                sampling_rate: 1.0,
                noise_multiplier: 2.0,
                clip_norm: 1.0,
                unit: PrivacyUnit::Client,
                kind: ChargeKind::Train,
            };
            store.charge(id, &entry, &limits()).unwrap();
            id // the process dies here: no commit, no failure record
        };
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.recover_interrupted(id).unwrap(), 1);
        assert_eq!(store.recover_interrupted(id).unwrap(), 0, "recorded once");
        let snap = store.load(id).unwrap().unwrap();
        assert_eq!((snap.failed_rounds, snap.interrupted_rounds), (1, 1));
        assert_eq!(snap.history[0].failure.as_deref(), Some(crate::store::INTERRUPTED));
        assert_eq!(snap.ledger.len(), 1, "the charge stays");
    }

    /// Issue 10 (H5): the budget check and the charge are one transaction: a charge over the
    /// task's budget is refused and nothing is written.
    #[test]
    fn a_charge_over_the_budget_is_refused_and_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        let id = store
            .create_task(&spec("a"), Arc::new(ModelBlob::new(ModelVersion(0), vec![0.0, 0.0])))
            .unwrap();
        let mut tight = limits();
        tight.task_epsilon = 3.0;
        let entry = |round| LedgerEntry {
            round: RoundId(round),
            sampling_rate: 1.0,
            noise_multiplier: 2.0,
            clip_norm: 1.0,
            unit: PrivacyUnit::Client,
            kind: ChargeKind::Train,
        };
        // One round at z = 2 spends about 2.4 at delta 1e-5; a second would pass 3.
        store.charge(id, &entry(1), &tight).unwrap();
        let err = store.charge(id, &entry(2), &tight).unwrap_err();
        assert!(matches!(err, StoreError::BudgetExceeded(_)), "{err}");
        assert_eq!(store.load(id).unwrap().unwrap().ledger.len(), 1);
    }

    #[test]
    fn everything_committed_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            let id = store
                .create_task(&spec("a"), Arc::new(ModelBlob::new(ModelVersion(0), vec![0.0, 0.0])))
                .unwrap();
            assert!(matches!(
                store.create_task(
                    &spec("a"),
                    Arc::new(ModelBlob::new(ModelVersion(0), vec![0.0, 0.0]))
                ),
                Err(StoreError::DuplicateTask(_))
            ));
            assert_eq!(store.next_round_id().unwrap(), RoundId(1));
            store.record_failure(id, &summary(1, Some("collect deadline passed"))).unwrap();
            assert_eq!(store.next_round_id().unwrap(), RoundId(2));
            let optimizer = OptimizerState { m: vec![0.5, 0.25], v: Vec::new(), t: 1 };
            let model = Arc::new(ModelBlob::new(ModelVersion(1), vec![1.5, -2.0]));
            store
                .commit(CommitRecord {
                    task: id,
                    summary: summary(2, None),
                    model,
                    optimizer,
                    audit: AuditEvent::coordinator(
                        "round_committed",
                        id,
                        serde_json::json!({"cohort_size": 1}),
                    ),
                })
                .unwrap();
            assert!(
                SqliteStore::open(&path)
                    .unwrap_err()
                    .to_string()
                    .contains("in use by another coordinator"),
                "a second process on the same file refuses to start (H5)"
            );
            store.set_task_state(id, TaskState::Finished, "all 2 rounds committed").unwrap();
            let entry = LedgerEntry {
                round: RoundId(2),
                sampling_rate: 0.5,
                noise_multiplier: 1.25,
                clip_norm: 0.5,
                unit: PrivacyUnit::Client,
                kind: ChargeKind::Train,
            };
            store.charge(id, &entry, &limits()).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let tasks = store.tasks().unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!((tasks[0].spec.clone(), tasks[0].state), (spec("a"), TaskState::Finished));
        let snap = store.load(tasks[0].id).unwrap().unwrap();
        assert_eq!(
            (snap.model.version, snap.model.values.clone()),
            (ModelVersion(1), vec![1.5, -2.0])
        );
        assert_eq!(snap.optimizer, OptimizerState { m: vec![0.5, 0.25], v: Vec::new(), t: 1 });
        assert_eq!((snap.committed_rounds, snap.failed_rounds), (1, 1));
        assert_eq!(
            snap.history,
            vec![summary(1, Some("collect deadline passed")), summary(2, None)]
        );
        assert_eq!(store.next_round_id().unwrap(), RoundId(3), "round ids are never reused");
        assert_eq!(snap.ledger.len(), 1);
        assert_eq!((snap.ledger[0].round, snap.ledger[0].noise_multiplier), (RoundId(2), 1.25));
        assert!(store.load(TaskId(9)).unwrap().is_none());
        let audit = store.audit_log(0, 10).unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!((audit[0].seq, audit[0].event.action.as_str()), (1, "round_committed"));
        assert_eq!(audit[0].event.detail["cohort_size"], 1);
        let conn = store.lock();
        for sql in ["UPDATE audit SET outcome = 'x'", "DELETE FROM audit"] {
            let err = conn.execute(sql, []).unwrap_err().to_string();
            assert!(err.contains("append-only"), "{sql}: {err}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "the database is private (L5)");
        }
    }
}
