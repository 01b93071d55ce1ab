//! `fedretail-coordinator admin …`: the Admin service from the command line, with an
//! administrator's certificate. Prints JSON.

use anyhow::Context;
use fedretail_proto::pb;
use std::path::PathBuf;

/// How to reach the Admin service and as whom.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The Admin service's URL.
    #[arg(long, default_value = "https://127.0.0.1:50052")]
    pub url: String,
    /// A PKI directory laid out by `pki`: takes ca.crt and admins/NAME.crt, admins/NAME.key.
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// The administrator's name (with --pki).
    #[arg(long, requires = "pki")]
    pub name: Option<String>,
    /// Or the files one by one: the deployment CA, the certificate and its key.
    #[arg(long, conflicts_with = "pki", requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// The administrator's certificate.
    #[arg(long, requires = "ca")]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, requires = "ca")]
    pub key: Option<PathBuf>,
    /// Plaintext to an `insecure = true` coordinator.
    #[arg(long, conflicts_with_all = ["pki", "ca"])]
    pub insecure: bool,
    /// What to do.
    #[command(subcommand)]
    pub action: AdminAction,
}

/// Admin calls.
#[derive(Debug, clap::Subcommand)]
pub enum AdminAction {
    /// Creates a task from a TOML file holding one task (as a `[[task]]` of the config, without
    /// the `[[task]]` header: `name`, `[model]`, `[plan]`, `[privacy]`).
    CreateTask {
        /// The task file.
        #[arg(long)]
        spec: PathBuf,
    },
    /// Every task.
    ListTasks,
    /// One task with its newest rounds.
    GetTask {
        /// The task's id.
        #[arg(long)]
        task: u64,
        /// Rounds to show.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// Pauses a task.
    Pause {
        /// The task's id.
        #[arg(long)]
        task: u64,
        /// Why (for the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resumes a paused task.
    Resume {
        /// The task's id.
        #[arg(long)]
        task: u64,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Cancels a task for good.
    Cancel {
        /// The task's id.
        #[arg(long)]
        task: u64,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The audit log.
    AuditLog {
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Exports the newest model (raw little-endian float32) and prints its privacy report.
    Export {
        /// The task's id.
        #[arg(long)]
        task: u64,
        /// Where to write the parameters.
        #[arg(long)]
        out: PathBuf,
    },
}

async fn connect(
    args: &AdminArgs,
) -> anyhow::Result<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut endpoint = Endpoint::from_shared(args.url.clone())
        .with_context(|| format!("invalid URL {}", args.url))?;
    if !args.insecure {
        let (ca, cert, key) = match (&args.pki, &args.name, &args.ca, &args.cert, &args.key) {
            (Some(dir), Some(name), ..) => {
                let pki = crate::pki::PkiDir::new(dir);
                let (cert, key) = pki.admin(name);
                (pki.ca_cert(), cert, key)
            }
            (None, None, Some(ca), Some(cert), Some(key)) => {
                (ca.clone(), cert.clone(), key.clone())
            }
            _ => anyhow::bail!(
                "give an administrator certificate (--pki DIR --name WHO, or --ca, --cert and --key), or --insecure"
            ),
        };
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca)?))
            .identity(Identity::from_pem(read(&cert)?, read(&key)?));
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel =
        endpoint.connect().await.with_context(|| format!("connecting to {}", args.url))?;
    Ok(pb::admin_client::AdminClient::new(channel))
}

fn status_json(s: &pb::TaskStatus) -> serde_json::Value {
    let state = pb::TaskState::try_from(s.state).map_or("unknown".into(), |t| {
        t.as_str_name().trim_start_matches("TASK_STATE_").to_lowercase()
    });
    let finite = |v: f64| v.is_finite().then_some(v);
    serde_json::json!({
        "task_id": s.task_id,
        "name": s.spec.as_ref().map(|t| t.name.clone()),
        "state": state,
        "reason": s.state_reason,
        "phase": s.phase,
        "model_version": s.model_version,
        "committed_rounds": s.committed_rounds,
        "failed_rounds": s.failed_rounds,
        "connected_clients": s.connected_clients,
        "privacy": s.privacy.as_ref().map(|p| serde_json::json!({
            "epsilon": p.epsilon, "target_epsilon": p.target_epsilon, "delta": p.delta,
            "noise_multiplier": p.noise_multiplier, "rounds": p.rounds,
            "evaluation_epsilon": p.evaluation_epsilon, "total_epsilon": p.total_epsilon,
            "epsilon_against_coordinator": finite(p.epsilon_against_coordinator),
            "domain": p.domain, "domain_epsilon": finite(p.domain_epsilon),
            "interrupted_rounds": p.interrupted_rounds,
        })),
        "rounds": s.rounds.iter().map(|r| serde_json::json!({
            "round_id": r.round_id, "phase": r.phase, "cohort_size": r.cohort_size,
            "uploads": r.n_uploads, "rejected": r.n_rejected, "failure": r.failure,
        })).collect::<Vec<_>>(),
    })
}

/// Runs one Admin call and prints its result as JSON.
///
/// # Errors
///
/// Connection failures, refusals (with the coordinator's message), unreadable files.
pub async fn run(args: AdminArgs) -> anyhow::Result<serde_json::Value> {
    let mut admin = connect(&args).await?;
    let status = |r: Result<tonic::Response<pb::TaskStatus>, tonic::Status>| -> anyhow::Result<serde_json::Value> {
        let s = r.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?.into_inner();
        Ok(status_json(&s))
    };
    let refused = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    Ok(match args.action {
        AdminAction::CreateTask { spec } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("reading {}", spec.display()))?;
            let task: fedretail_core::plan::TaskSpec =
                toml::from_str(&text).with_context(|| format!("parsing {}", spec.display()))?;
            let id = admin
                .create_task(pb::CreateTaskRequest { spec: Some((&task).into()) })
                .await
                .map_err(refused)?
                .into_inner()
                .task_id;
            serde_json::json!({ "task_id": id, "name": task.name })
        }
        AdminAction::ListTasks => {
            let list =
                admin.list_tasks(pb::ListTasksRequest {}).await.map_err(refused)?.into_inner();
            serde_json::Value::Array(list.tasks.iter().map(status_json).collect())
        }
        AdminAction::GetTask { task, rounds } => {
            status(admin.get_task(pb::GetTaskRequest { task_id: task, max_rounds: rounds }).await)?
        }
        AdminAction::Pause { task, reason } => {
            status(admin.pause_task(pb::TaskActionRequest { task_id: task, reason }).await)?
        }
        AdminAction::Resume { task, reason } => {
            status(admin.resume_task(pb::TaskActionRequest { task_id: task, reason }).await)?
        }
        AdminAction::Cancel { task, reason } => {
            status(admin.cancel_task(pb::TaskActionRequest { task_id: task, reason }).await)?
        }
        AdminAction::AuditLog { after } => {
            let log = admin
                .get_audit_log(pb::GetAuditLogRequest { after, limit: 0 })
                .await
                .map_err(refused)?
                .into_inner();
            serde_json::Value::Array(
                log.entries
                    .iter()
                    .map(|e| serde_json::json!({
                        "seq": e.seq, "unix_ms": e.unix_ms, "actor": e.actor, "role": e.role,
                        "action": e.action, "task_id": e.task_id, "outcome": e.outcome,
                        "detail": serde_json::from_str::<serde_json::Value>(&e.detail).unwrap_or_default(),
                    }))
                    .collect(),
            )
        }
        AdminAction::Export { task, out } => {
            let mut stream = admin
                .export_model(pb::ExportModelRequest { task_id: task })
                .await
                .map_err(refused)?
                .into_inner();
            let mut bytes = Vec::new();
            let mut privacy = None;
            let mut version = 0;
            while let Some(chunk) = stream.message().await.map_err(refused)? {
                if chunk.privacy.is_some() {
                    privacy = chunk.privacy;
                }
                if let Some(c) = chunk.chunk {
                    version = c.model_version;
                    bytes.extend_from_slice(&c.data);
                }
            }
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            serde_json::json!({
                "model_version": version,
                "n_params": bytes.len() / 4,
                "out": out.display().to_string(),
                "privacy": privacy.map(|p| serde_json::json!({
                    "epsilon": p.epsilon, "delta": p.delta, "total_epsilon": p.total_epsilon,
                    "epsilon_against_coordinator": p.epsilon_against_coordinator.is_finite().then_some(p.epsilon_against_coordinator),
                })),
            })
        }
    })
}
