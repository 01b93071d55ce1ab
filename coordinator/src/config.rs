//! The coordinator's TOML config: [`RawConfig`] as written, [`Config`] once validated.

use fedretail_core::plan::TaskSpec;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown fields.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The `[tls]` section as written: paths relative to the config file's directory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The deployment CA certificate (`pki init` writes `ca.crt`).
    pub ca: PathBuf,
    /// The coordinator's certificate.
    pub cert: PathBuf,
    /// The coordinator's private key.
    pub key: PathBuf,
    /// Revoked serial numbers, one hex serial a line; read at every handshake.
    #[serde(default)]
    pub revoked: Option<PathBuf>,
}

/// The config as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the Training service (stores).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the Admin service (operators, auditors, exporters).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Serve plaintext without any authentication: for experiments on a closed machine only.
    #[serde(default)]
    pub insecure: bool,
    /// mTLS for both services; required unless `insecure = true`.
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Open connections per listener.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to complete its TLS handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: f64,
    /// Enrolled stores per task.
    #[serde(default = "default_max_clients")]
    pub max_clients_per_task: usize,
    /// How long a `NextAssignment` call is held open.
    #[serde(default = "default_poll_timeout")]
    pub poll_timeout_secs: f64,
    /// Uploads reassembled at once; bounds staging memory.
    #[serde(default = "default_uploads")]
    pub max_concurrent_uploads: usize,
    /// Largest gRPC message accepted.
    #[serde(default = "default_message_bytes")]
    pub max_message_bytes: usize,
    /// SQLite file for tasks, committed rounds and models; without it nothing survives a restart.
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// Which tasks the coordinator runs at all; strict defaults without the section.
    #[serde(default)]
    pub policy: crate::policy::Policy,
    /// Tasks created at start-up unless a task of that name exists.
    #[serde(default, rename = "task")]
    pub tasks: Vec<TaskSpec>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50052))
}
fn default_max_connections() -> usize {
    4096
}
fn default_handshake_timeout() -> f64 {
    10.0
}
fn default_max_clients() -> usize {
    10_000
}
fn default_poll_timeout() -> f64 {
    10.0
}
fn default_uploads() -> usize {
    16
}
fn default_message_bytes() -> usize {
    8 << 20
}

/// How the listeners are secured.
#[derive(Debug, Clone, PartialEq)]
pub enum Security {
    /// TLS 1.3 with client certificates from the deployment CA on both listeners.
    Mtls(crate::tls::TlsFiles),
    /// Plaintext, no authentication: only behind `insecure = true`, with a warning at start.
    Insecure,
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the Training service.
    pub listen: SocketAddr,
    /// Address of the Admin service.
    pub admin_listen: SocketAddr,
    /// mTLS or (explicitly) plaintext.
    pub security: Security,
    /// Bounds on connections and handshakes.
    pub limits: crate::tls::ConnLimits,
    /// Enrolled stores per task.
    pub max_clients_per_task: usize,
    /// How long a `NextAssignment` call is held open.
    pub poll_timeout: Duration,
    /// Uploads reassembled at once.
    pub max_concurrent_uploads: usize,
    /// Largest gRPC message accepted.
    pub max_message_bytes: usize,
    /// SQLite file, or `None` for an in-memory store.
    pub store: Option<PathBuf>,
    /// Draw cohorts and privacy noise from task seeds instead of the OS: for the simulator only.
    /// The TOML config cannot set it.
    pub deterministic: bool,
    /// Which tasks the coordinator runs.
    pub policy: crate::policy::Policy,
    /// Tasks created at start-up.
    pub tasks: Vec<TaskSpec>,
}

impl RawConfig {
    /// Parses TOML; `path` is used in messages.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] with the parser's line and column.
    pub fn from_toml(text: &str, path: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text)
            .map_err(|source| ConfigError::Parse { path: path.into(), source: Box::new(source) })
    }

    /// Checks every value.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the value.
    pub fn validate(self, path: &str) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.into(), message };
        if !(self.poll_timeout_secs > 0.0 && self.poll_timeout_secs <= 300.0) {
            return Err(invalid(format!(
                "poll_timeout_secs must be in (0, 300], got {}",
                self.poll_timeout_secs
            )));
        }
        if self.max_concurrent_uploads == 0 {
            return Err(invalid("max_concurrent_uploads must be at least 1".into()));
        }
        if self.max_message_bytes < 2 << 20 {
            return Err(invalid(format!(
                "max_message_bytes must be at least 2 MiB, got {}",
                self.max_message_bytes
            )));
        }
        let base = Path::new(path).parent().unwrap_or(Path::new("."));
        let security = match (self.insecure, self.tls) {
            (true, None) => Security::Insecure,
            (true, Some(_)) => {
                return Err(invalid("set either [tls] or insecure = true, not both".into()));
            }
            (false, Some(t)) => Security::Mtls(crate::tls::TlsFiles {
                ca: base.join(t.ca),
                cert: base.join(t.cert),
                key: base.join(t.key),
                revoked: t.revoked.map(|r| base.join(r)),
            }),
            (false, None) => {
                return Err(invalid(
                    "no [tls] section: give the coordinator's certificates (see `example-config --pki DIR`), or set insecure = true to serve plaintext without authentication".into(),
                ));
            }
        };
        if self.listen == self.admin_listen {
            return Err(invalid(format!(
                "listen and admin_listen are both {}: the Admin service needs its own address",
                self.listen
            )));
        }
        if self.max_connections == 0 || self.max_clients_per_task == 0 {
            return Err(invalid(
                "max_connections and max_clients_per_task must be at least 1".into(),
            ));
        }
        if !(self.handshake_timeout_secs > 0.0 && self.handshake_timeout_secs <= 300.0) {
            return Err(invalid(format!(
                "handshake_timeout_secs must be in (0, 300], got {}",
                self.handshake_timeout_secs
            )));
        }
        self.policy.validate().map_err(invalid)?;
        let mut names = std::collections::BTreeSet::new();
        for task in &self.tasks {
            task.validate().map_err(|e| invalid(format!("task {:?}: {e}", task.name)))?;
            if !names.insert(task.name.clone()) {
                return Err(invalid(format!("two tasks are named {:?}", task.name)));
            }
        }
        Ok(Config {
            listen: self.listen,
            admin_listen: self.admin_listen,
            security,
            limits: crate::tls::ConnLimits {
                max_connections: self.max_connections,
                handshake_timeout: Duration::from_secs_f64(self.handshake_timeout_secs),
            },
            max_clients_per_task: self.max_clients_per_task,
            policy: self.policy,
            poll_timeout: Duration::from_secs_f64(self.poll_timeout_secs),
            max_concurrent_uploads: self.max_concurrent_uploads,
            max_message_bytes: self.max_message_bytes,
            store: self.store,
            deterministic: false,
            tasks: self.tasks,
        })
    }
}

/// Reads and validates a config file.
///
/// # Errors
///
/// Any [`ConfigError`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
    RawConfig::from_toml(&text, &shown)?.validate(&shown)
}

/// A commented example config serving both services over mTLS with the PKI in `pki` (as made
/// by `pki init`), with one MovieLens-sized recommender task.
pub fn example(pki: &str) -> String {
    let pki = pki.trim_end_matches('/');
    format!(
        r#"# fedretail-coordinator config
listen = "127.0.0.1:50051"        # Training service: stores, with store certificates
admin_listen = "127.0.0.1:50052"  # Admin service: operators, auditors, exporters
poll_timeout_secs = 10.0          # how long a client's NextAssignment call is held open
max_concurrent_uploads = 16       # bounds staging memory: 16 x model size
store = "coordinator.db"          # SQLite: tasks, rounds, models, ledger and audit log

# TLS 1.3 with client certificates from this CA on both listeners. Relative paths are relative
# to this file. `insecure = true` instead serves plaintext without any authentication.
[tls]
ca = "{pki}/ca.crt"
cert = "{pki}/coordinator.crt"
key = "{pki}/coordinator.key"
# revoked = "{pki}/revoked.txt"   # hex serials (see {pki}/issued.log), read at every handshake

# Which tasks this coordinator runs at all. A task outside it is refused (FAILED_PRECONDITION,
# naming the rule). These are also the defaults when the section is left out.
[policy]
allow_without_privacy = false     # every task needs a privacy spec
max_epsilon = 10.0                # per task, and for each privacy domain's total
max_delta = 1e-5
min_cohort = 2                    # the smallest quorum (plan.min_clients)
max_model_params = 50000000
max_live_tasks = 16

# Tasks are created by an operator: fedretail-coordinator admin create-task --spec FILE
# (`example-task` prints one). A [[task]] here is created at start-up instead.
"#
    )
}

/// A commented example task: what `admin create-task --spec FILE` takes, and, under a
/// `[[task]]` header with `task.`-prefixed tables, what a config's tasks look like.
pub const EXAMPLE_TASK: &str = r#"# A fedretail task (fedretail-coordinator admin create-task --spec FILE).
name = "movielens"

[model]
kind = "matrix_factorization"
n_items = 1682                  # item ids in the stores' CSV files are 0..n_items
dim = 1                         # the simulator's private preset (BENCHMARKS.md)
learning_rate = 0.01
regularization = 0.1
init_std = 0.1
init_mean = 3.5                 # customer-level rounds keep the global mean fixed
local_item_offsets = 20.0       # each store's own item offsets; never sent

[plan]
rounds = 30
cohort_size = 2                 # clients sampled per round
min_clients = 2                 # quorum: fewer acks or uploads fail the round
local_epochs = 5
clip_norm = 0.25                # each customer's contribution is clipped to this L2 norm
weight_by_examples = false      # under privacy every contribution counts once
eval_every = 10
select_timeout_secs = 10.0
configure_timeout_secs = 60.0
collect_timeout_secs = 120.0
evaluate_timeout_secs = 60.0
seed = 42
secure_aggregation = "off"      # "secagg+": the coordinator sees only the sum of masked updates
                                # (needs min_clients >= 3; with noise_placement = "distributed"
                                # the stores add the noise themselves)

[plan.server_optimizer]
kind = "fed_avg"                # or fed_avg_m (momentum), fed_adam (beta1, beta2, tau)
learning_rate = 1.0

# Customer-level differential privacy: each store sums one clipped contribution per customer,
# sampled with rate q, and the coordinator adds Gaussian noise calibrated to epsilon.
[privacy]
unit = "customer"
noise_placement = "central"
target_epsilon = 8.0            # what the model carries
evaluation_epsilon = 1.0        # the noised evaluation metrics' own budget
delta = 1e-5
sampling_rate = 0.3
population = 943                # customers across the stores (a public figure)
domain = "stores-2026"          # every task over the same customers shares this budget
"#;

/// [`EXAMPLE_TASK`] as a `[[task]]` of a config file.
pub fn example_task_in_config() -> String {
    let mut out = String::from("[[task]]\n");
    for line in EXAMPLE_TASK.lines().skip(1) {
        match line.strip_prefix('[') {
            Some(table) => out.push_str(&format!("[task.{table}\n")),
            None => out.push_str(&format!("{line}\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let text = example("/etc/pki") + &example_task_in_config();
        let config = RawConfig::from_toml(&text, "/etc/example.toml")
            .unwrap()
            .validate("/etc/example.toml")
            .unwrap();
        assert_eq!(config.tasks.len(), 1);
        let alone: fedretail_core::plan::TaskSpec = toml::from_str(EXAMPLE_TASK).unwrap();
        assert_eq!(alone, config.tasks[0], "the standalone task and the config's are one task");
        let Security::Mtls(files) = &config.security else { panic!("the example uses mTLS") };
        assert_eq!(files.ca, Path::new("/etc/pki/ca.crt"));
        assert_ne!(config.listen, config.admin_listen);
        assert_eq!(config.tasks[0].model.n_params(), 1 + 1682 * 2);
        assert_eq!(
            config.policy,
            crate::policy::Policy::default(),
            "the example spells out the defaults"
        );
        crate::policy::Policy::default().check(&config.tasks[0], 0).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let err = RawConfig::from_toml("listen = 5\n", "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml: TOML parse error at line 1"), "{err}");
        let err = RawConfig::from_toml("colour = 1\n", "c.toml").unwrap_err().to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
        let err = RawConfig::from_toml("", "c.toml").unwrap().validate("c.toml").unwrap_err();
        assert!(err.to_string().contains("no [tls] section"), "plaintext needs insecure = true");
        let bad = (example("pki") + &example_task_in_config())
            .replace("min_clients = 2                 #", "min_clients = 3  #");
        let err = RawConfig::from_toml(&bad, "c.toml")
            .unwrap()
            .validate("c.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "c.toml: task \"movielens\": invalid task spec: plan.cohort_size: 2 is below min_clients 3"
        );
    }
}
