//! The store's own privacy ledger: every round it took part in, with the parameters that
//! decide what that round cost it, synced to disk before the update leaves. The store composes
//! it itself (RDP), per task and over any 365 days, across every task and coordinator: it does
//! not have to believe a coordinator's report.
//!
//! A round of a customer-level task is charged at the customer sampling rate the store applies
//! itself. A round of a store-level (client unit) task is charged at rate 1: the coordinator
//! says it sampled the store with rate q, but the store cannot check that, only that it was
//! asked.

use fedretail_core::privacy::accountant::{Accountant, AccountantKind, Charge};
use fedretail_core::privacy::{NoisePlacement, PrivacyUnit};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name inside the state directory.
pub const FILE: &str = "ledger.jsonl";

/// Milliseconds in 365 days.
const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;

/// One round the store took part in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    /// When (milliseconds since the Unix epoch).
    pub unix_ms: u64,
    /// The coordinator (its address).
    pub coordinator: String,
    /// The task's name and id at that coordinator.
    pub task: String,
    /// The task's id.
    pub task_id: u64,
    /// The task's privacy domain.
    pub domain: String,
    /// The round.
    pub round_id: u64,
    /// `train` or `evaluate`.
    pub kind: String,
    /// Whom the round protects.
    pub unit: PrivacyUnit,
    /// Where the noise was added.
    pub placement: NoisePlacement,
    /// The sampling rate the store charges (see the module docs).
    pub sampling_rate: f64,
    /// The noise multiplier z of the round.
    pub noise_multiplier: f64,
    /// The clipping norm.
    pub clip_norm: f32,
    /// The noise this store added itself (0 when the coordinator adds it).
    pub noise_std: f64,
    /// δ of the task's guarantee.
    pub delta: f64,
}

impl Spend {
    fn charge(&self) -> Charge {
        Charge {
            sampling_rate: self.sampling_rate,
            noise_multiplier: self.noise_multiplier,
            rounds: 1,
        }
    }

    fn same_task(&self, other: &Spend) -> bool {
        self.coordinator == other.coordinator && self.task == other.task
    }
}

/// The ledger: in memory, and on disk when the store has a state directory.
#[derive(Debug, Default)]
pub struct Ledger {
    path: Option<PathBuf>,
    entries: Vec<Spend>,
}

/// The store's spend on one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSpend {
    /// Coordinator and task.
    pub coordinator: String,
    /// The task's name.
    pub task: String,
    /// Its privacy domain.
    pub domain: String,
    /// Rounds charged.
    pub rounds: u64,
    /// ε at the task's δ.
    pub epsilon: f64,
    /// That δ.
    pub delta: f64,
}

impl Ledger {
    /// The ledger in `dir` (read if it exists), or an empty one in memory.
    ///
    /// # Errors
    ///
    /// A ledger file that cannot be read or parsed: the store must not go on without it.
    pub fn open(dir: Option<&Path>) -> std::io::Result<Ledger> {
        let Some(dir) = dir else { return Ok(Ledger::default()) };
        let path = dir.join(FILE);
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
                .map(|(n, l)| {
                    serde_json::from_str(l).map_err(|e| {
                        std::io::Error::other(format!("{}:{}: {e}", path.display(), n + 1))
                    })
                })
                .collect::<Result<_, _>>()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Ledger { path: Some(path), entries })
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> &[Spend] {
        &self.entries
    }

    /// Appends `spend` and syncs it to disk before returning.
    ///
    /// # Errors
    ///
    /// I/O errors: then nothing may be sent.
    pub fn record(&mut self, spend: Spend) -> std::io::Result<()> {
        if let Some(path) = &self.path {
            let mut line = serde_json::to_vec(&spend).expect("plain data serialises");
            line.push(b'\n');
            let mut options = std::fs::OpenOptions::new();
            options.create(true).append(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut f = options.open(path)?;
            f.write_all(&line)?;
            f.sync_data()?;
        }
        self.entries.push(spend);
        Ok(())
    }

    /// ε of the task `like` belongs to, with `like` added, at the task's δ.
    pub fn task_epsilon_with(&self, like: &Spend) -> f64 {
        let charges: Vec<Charge> = self
            .entries
            .iter()
            .filter(|e| e.same_task(like))
            .chain(std::iter::once(like))
            .map(Spend::charge)
            .collect();
        epsilon(&charges, like.delta)
    }

    /// ε of every round in the 365 days before `now_ms`, plus `extra`, at `delta`.
    pub fn year_epsilon(&self, now_ms: u64, delta: f64, extra: Option<&Spend>) -> f64 {
        let charges: Vec<Charge> = self
            .entries
            .iter()
            .filter(|e| e.unix_ms + YEAR_MS >= now_ms)
            .chain(extra)
            .map(Spend::charge)
            .collect();
        epsilon(&charges, delta)
    }

    /// The spend per task, in order of first appearance.
    pub fn by_task(&self) -> Vec<TaskSpend> {
        let mut tasks: Vec<TaskSpend> = Vec::new();
        for e in &self.entries {
            if tasks.iter().any(|t| t.coordinator == e.coordinator && t.task == e.task) {
                continue;
            }
            let charges: Vec<Charge> =
                self.entries.iter().filter(|o| o.same_task(e)).map(Spend::charge).collect();
            tasks.push(TaskSpend {
                coordinator: e.coordinator.clone(),
                task: e.task.clone(),
                domain: e.domain.clone(),
                rounds: charges.len() as u64,
                epsilon: epsilon(&charges, e.delta),
                delta: e.delta,
            });
        }
        tasks
    }
}

fn epsilon(charges: &[Charge], delta: f64) -> f64 {
    if charges.is_empty() {
        return 0.0;
    }
    AccountantKind::Rdp.epsilon(charges, delta).map_or(f64::INFINITY, |e| e.epsilon)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(task: &str, when: u64, z: f64) -> Spend {
        Spend {
            unix_ms: when,
            coordinator: "https://c".into(),
            task: task.into(),
            task_id: 1,
            domain: "d".into(),
            round_id: when,
            kind: "train".into(),
            unit: PrivacyUnit::Client,
            placement: NoisePlacement::Central,
            sampling_rate: 1.0,
            noise_multiplier: z,
            clip_norm: 1.0,
            noise_std: 0.0,
            delta: 1e-5,
        }
    }

    #[test]
    fn the_ledger_survives_reopening_and_composes_per_task_and_per_year() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(Some(dir.path())).unwrap();
        ledger.record(spend("a", 1, 2.0)).unwrap();
        ledger.record(spend("a", 2, 2.0)).unwrap();
        ledger.record(spend("b", 3, 2.0)).unwrap();
        let ledger = Ledger::open(Some(dir.path())).unwrap();
        assert_eq!(ledger.entries().len(), 3);
        let one = epsilon(&[Charge { sampling_rate: 1.0, noise_multiplier: 2.0, rounds: 1 }], 1e-5);
        let two = epsilon(&[Charge { sampling_rate: 1.0, noise_multiplier: 2.0, rounds: 2 }], 1e-5);
        let three =
            epsilon(&[Charge { sampling_rate: 1.0, noise_multiplier: 2.0, rounds: 3 }], 1e-5);
        let by_task = ledger.by_task();
        assert_eq!(by_task.len(), 2);
        assert!((by_task[0].epsilon - two).abs() < 1e-9 && (by_task[1].epsilon - one).abs() < 1e-9);
        assert!((ledger.task_epsilon_with(&spend("b", 4, 2.0)) - two).abs() < 1e-9);
        // Across tasks: a new task name is not a new budget for the store.
        assert!((ledger.year_epsilon(10, 1e-5, None) - three).abs() < 1e-9);
        // Rounds older than a year drop out of the yearly total.
        assert!((ledger.year_epsilon(YEAR_MS + 2, 1e-5, None) - two).abs() < 1e-9);
    }
}
