//! An append-only log of everything the client sends, for store staff to read.
//!
//! Each line is one JSON object. A line is written and flushed to disk *before* the bytes it
//! describes leave the store; if the log cannot be written, nothing is sent.

use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name inside the state directory.
pub const FILE: &str = "sent.jsonl";

/// One thing sent.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// The store enrolled with a task (nothing about customers is sent).
    Enrolled {
        /// The coordinator.
        coordinator: String,
        /// The task's name and id.
        task: String,
        /// Its id.
        task_id: u64,
        /// The task's privacy as the coordinator stated it (`null`: none).
        privacy: Option<serde_json::Value>,
    },
    /// The store refused what the coordinator asked; nothing was sent for it.
    Refused {
        /// Task.
        task_id: u64,
        /// Round (0 at enrolment).
        round_id: u64,
        /// The policy rule.
        rule: String,
        /// Why.
        message: String,
    },
    /// A clipped model update.
    Update {
        /// Task.
        task_id: u64,
        /// Round.
        round_id: u64,
        /// Parameters sent.
        n_params: usize,
        /// Bytes of parameters sent.
        n_bytes: usize,
        /// SHA-256 of those bytes (hex).
        sha256: String,
        /// Norm before clipping, where it is sent (not under privacy: it is about the data).
        norm_before_clip: Option<f64>,
        /// Norm bound applied.
        clip_norm: f32,
        /// Local training examples (sent as the FedAvg weight; 0 under privacy).
        n_examples: usize,
        /// Mean local training loss (sent; 0 under privacy).
        train_loss: f64,
        /// Every privacy parameter of the round (`null` without privacy).
        privacy: Option<PrivacyRecord>,
    },
    /// Aggregated evaluation sums.
    Metrics {
        /// Task.
        task_id: u64,
        /// Round.
        round_id: u64,
        /// Held-out ratings scored.
        n_ratings: u64,
        /// Users ranked.
        n_ranked: u64,
        /// Sum of squared errors.
        squared_error: f64,
        /// Sum of absolute errors.
        absolute_error: f64,
        /// Sum of HR@10.
        hits_at_10: f64,
        /// Sum of NDCG@10.
        ndcg_at_10: f64,
        /// Sum of actual values (demand forecasts).
        actual_sum: f64,
        /// Under privacy: the evaluation's noise multiplier and per-field noise that was added
        /// to the bounded sums above (which are what was sent).
        privacy: Option<serde_json::Value>,
    },
}

/// The privacy parameters of one upload, as the store applied them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrivacyRecord {
    /// `client` or `customer`.
    pub unit: fedretail_core::privacy::PrivacyUnit,
    /// `central`, `distributed` or `local`.
    pub placement: fedretail_core::privacy::NoisePlacement,
    /// Customer sampling rate q (customer unit) or the coordinator's stated store rate.
    pub sampling_rate: f64,
    /// The task's noise multiplier z.
    pub noise_multiplier: f64,
    /// The noise standard deviation this store added to its update (0: the coordinator adds it).
    pub noise_std: f64,
    /// The noise it added to its unclipped count.
    pub count_noise_std: f64,
    /// Whether the (noised) unclipped count was sent.
    pub sent_unclipped_count: bool,
    /// ε the store's own ledger holds for this task after this round.
    pub task_epsilon: f64,
}

/// Size at which the log moves aside and a new one starts (L6).
pub const ROTATE_BYTES: u64 = 64 << 20;

/// The log file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    rotate_bytes: u64,
}

impl AuditLog {
    /// The log in `dir` (created on first write).
    pub fn new(dir: &Path) -> AuditLog {
        AuditLog { path: dir.join(FILE), rotate_bytes: ROTATE_BYTES }
    }

    /// The log in `dir`, moved aside once it holds `rotate_bytes` (tests).
    pub fn with_rotation(dir: &Path, rotate_bytes: u64) -> AuditLog {
        AuditLog { path: dir.join(FILE), rotate_bytes }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry with a wall-clock timestamp and syncs it to disk.
    ///
    /// # Errors
    ///
    /// I/O errors; the caller must then not send.
    pub fn append(&self, entry: &Entry) -> std::io::Result<()> {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut value = serde_json::to_value(entry).expect("plain data serialises");
        value["unix_ms"] = unix_ms.into();
        let mut line = serde_json::to_vec(&value).expect("plain data serialises");
        line.push(b'\n');
        // Bounded, and still append-only: a full log is kept whole under the time it was
        // closed (`sent.jsonl.<unix_ms>`), and a new one starts.
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.rotate_bytes) {
            let mut closed = self.path.with_extension(format!("jsonl.{unix_ms}"));
            let mut n = 1;
            while closed.exists() {
                n += 1;
                closed = self.path.with_extension(format!("jsonl.{unix_ms}-{n}"));
            }
            std::fs::rename(&self.path, closed)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600); // what left the store is the store's business (L5)
        }
        let mut f = options.open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()
    }

    /// Every entry, as JSON values (for staff tools and tests).
    ///
    /// # Errors
    ///
    /// I/O or parse errors.
    pub fn read(&self) -> std::io::Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        text.lines().map(|l| serde_json::from_str(l).map_err(std::io::Error::other)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10 (L6): the log is bounded; full logs are kept whole beside it.
    #[test]
    fn a_full_log_moves_aside_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::with_rotation(dir.path(), 300);
        let entry =
            Entry::Refused { task_id: 1, round_id: 2, rule: "r".into(), message: "m".repeat(50) };
        for _ in 0..10 {
            log.append(&entry).unwrap();
        }
        let files: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(files.len() > 1, "{files:?}");
        let lines: usize =
            files.iter().map(|f| std::fs::read_to_string(f).unwrap().lines().count()).sum();
        assert_eq!(lines, 10);
        assert!(std::fs::metadata(log.path()).unwrap().len() < 300 + 200);
    }
}
