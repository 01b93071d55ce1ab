//! Runs a federated task for real: an in-process coordinator on loopback gRPC and one
//! `fedretail-client` participant per store, each over its own gRPC connection.

use anyhow::Context;
use fedretail_client::participant::{LocalData, Outcome, Participant, ParticipantConfig};
use fedretail_client::transport::GrpcTransport;
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::plan::TaskSpec;
use fedretail_proto::pb;
use fedretail_proto::pb::admin_client::AdminClient;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// One committed round as seen through the Admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRecord {
    /// 1-based index among committed rounds.
    pub index: u64,
    /// Accepted uploads.
    pub n_uploads: u32,
    /// Mean local training loss.
    pub train_loss: f64,
    /// Federated evaluation, if the round evaluated.
    pub eval: Option<EvalSums>,
}

/// What a federated run produced.
#[derive(Debug, Clone)]
pub struct FederatedResult {
    /// Committed rounds, oldest first.
    pub rounds: Vec<RoundRecord>,
    /// Rounds that failed.
    pub failed_rounds: u64,
    /// The last evaluation (after the last round).
    pub final_eval: EvalSums,
    /// How each participant ended.
    pub outcomes: Vec<Outcome>,
    /// What the final model spent, for tasks with differential privacy.
    pub privacy: Option<PrivacyOutcome>,
}

/// The privacy report of the final model, as the coordinator computed it.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyOutcome {
    /// ε spent.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The protected unit (`client`).
    pub unit: String,
    /// Where noise was added (`central`).
    pub noise_placement: String,
    /// z.
    pub noise_multiplier: f64,
    /// q.
    pub sampling_rate: f64,
    /// Rounds charged.
    pub rounds: u64,
    /// C.
    pub clip_norm: f32,
    /// The accountant ε comes from (`rdp` or `pld`).
    pub accountant: String,
}

/// A coordinator running in this process on `127.0.0.1:0`.
#[derive(Debug)]
pub struct LocalCoordinator {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
    join: tokio::task::JoinHandle<Result<(), fedretail_coordinator::RunError>>,
}

impl LocalCoordinator {
    /// Binds a port first, then starts serving (so clients can connect at once).
    ///
    /// # Errors
    ///
    /// If the port cannot be bound.
    pub async fn start(poll_timeout: Duration) -> anyhow::Result<LocalCoordinator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback port")?;
        let addr = listener.local_addr()?;
        let config = fedretail_coordinator::config::Config {
            listen: addr,
            poll_timeout,
            max_concurrent_uploads: 16,
            max_message_bytes: 8 << 20,
            store: None,
            deterministic: true,
            tasks: Vec::new(),
        };
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let join = tokio::spawn(async move {
            fedretail_coordinator::run(config, listener, async move { signal.cancelled().await })
                .await
        });
        Ok(LocalCoordinator { addr, stop, join })
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it and waits.
    ///
    /// # Errors
    ///
    /// The coordinator's own error.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.join.await.context("coordinator task")?.context("coordinator")
    }
}

/// Connects an Admin client.
///
/// # Errors
///
/// Connection failures.
pub async fn admin(url: &str) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    AdminClient::connect(url.to_string()).await.with_context(|| format!("connecting to {url}"))
}

/// Runs `spec` with one participant per entry of `clients` against `coordinator`, reporting
/// committed rounds to `progress`.
///
/// # Errors
///
/// Task creation, participant failures, or a task that does not finish.
pub async fn run_federated(
    coordinator: &LocalCoordinator,
    spec: &TaskSpec,
    clients: Vec<(String, LocalData)>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<FederatedResult> {
    let url = coordinator.url();
    let mut admin = admin(&url).await?;
    let task_id = admin
        .create_task(pb::CreateTaskRequest { spec: Some(spec.into()) })
        .await
        .context("creating the task")?
        .into_inner()
        .task_id;

    let cancel = CancellationToken::new();
    let mut participants = JoinSet::new();
    for (name, data) in clients {
        let transport = GrpcTransport::new(&url)?;
        let config = ParticipantConfig {
            task: spec.name.clone(),
            store_name: name,
            state_dir: None,
            max_backoff: Duration::from_secs(2),
            // The simulator repeats runs exactly; see ParticipantConfig::seeded_privacy.
            seeded_privacy: true,
        };
        let cancel = cancel.clone();
        participants
            .spawn(async move { Participant::new(transport, config, data).run(cancel).await });
    }

    let status = loop {
        let status =
            admin.get_task(pb::GetTaskRequest { task_id, max_rounds: 1 }).await?.into_inner();
        progress.set_position(status.committed_rounds);
        if let Some(rmse) = status.rounds.iter().filter_map(|r| r.eval).find(|e| e.n_ratings > 0) {
            let e = EvalSums::try_from(rmse).unwrap_or_default();
            progress.set_message(format!("{} | test RMSE {:.4}", status.phase, e.rmse()));
        } else {
            progress.set_message(status.phase.clone());
        }
        if status.state != pb::TaskState::Running as i32 {
            break status;
        }
        if participants.is_empty() {
            anyhow::bail!("every participant stopped before the task ended");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    anyhow::ensure!(
        status.state == pb::TaskState::Finished as i32,
        "task ended as {:?}: {}",
        pb::TaskState::try_from(status.state),
        status.state_reason
    );

    let mut outcomes = Vec::new();
    let drain = async {
        while let Some(done) = participants.join_next().await {
            outcomes.push(done.context("participant task")?.context("participant")?);
        }
        anyhow::Ok(())
    };
    if tokio::time::timeout(Duration::from_secs(30), drain).await.is_err() {
        cancel.cancel();
        anyhow::bail!("participants did not stop within 30 s of the task's end");
    }

    let all = status.committed_rounds + status.failed_rounds + 1;
    let status =
        admin.get_task(pb::GetTaskRequest { task_id, max_rounds: all as u32 }).await?.into_inner();
    let mut rounds: Vec<RoundRecord> = status
        .rounds
        .iter()
        .filter(|r| r.phase == "Committed")
        .map(|r| RoundRecord {
            index: 0,
            n_uploads: r.n_uploads,
            train_loss: r.mean_train_loss,
            eval: r.eval.and_then(|e| EvalSums::try_from(e).ok()),
        })
        .collect();
    rounds.reverse();
    for (i, r) in rounds.iter_mut().enumerate() {
        r.index = i as u64 + 1;
    }
    let final_eval = rounds.last().and_then(|r| r.eval).unwrap_or_else(|| {
        tracing::warn!(
            "the last round has no evaluation (every store's predictions were non-finite?)"
        );
        EvalSums::default()
    });
    let privacy = status.privacy.map(|p| PrivacyOutcome {
        epsilon: p.epsilon,
        delta: p.delta,
        unit: pb::PrivacyUnit::try_from(p.unit).map_or("unknown".into(), |u| {
            u.as_str_name().trim_start_matches("PRIVACY_UNIT_").to_lowercase()
        }),
        noise_placement: pb::NoisePlacement::try_from(p.noise_placement)
            .map_or("unknown".into(), |u| {
                u.as_str_name().trim_start_matches("NOISE_PLACEMENT_").to_lowercase()
            }),
        noise_multiplier: p.noise_multiplier,
        sampling_rate: p.sampling_rate,
        rounds: p.rounds,
        clip_norm: p.clip_norm,
        accountant: pb::Accountant::try_from(p.accountant).map_or("unknown".into(), |a| {
            match a {
                pb::Accountant::Pld => "pld",
                pb::Accountant::Rdp | pb::Accountant::Unspecified => "rdp",
            }
            .into()
        }),
    });
    Ok(FederatedResult {
        rounds,
        failed_rounds: status.failed_rounds,
        final_eval,
        outcomes,
        privacy,
    })
}
