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
        /// Norm before clipping.
        norm_before_clip: f64,
        /// Norm bound applied.
        clip_norm: f32,
        /// Local training examples (sent as the FedAvg weight).
        n_examples: usize,
        /// Mean local training loss (sent).
        train_loss: f64,
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
    },
}

/// The log file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    /// The log in `dir` (created on first write).
    pub fn new(dir: &Path) -> AuditLog {
        AuditLog { path: dir.join(FILE) }
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
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
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
