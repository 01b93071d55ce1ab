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
    /// The last evaluation (after the last round): the coordinator's without privacy; under
    /// privacy the stores' exact local sums merged (the coordinator's are noised).
    pub final_eval: EvalSums,
    /// The last evaluation as the coordinator published it (noised under privacy; `None` when
    /// withheld).
    pub coordinator_eval: Option<EvalSums>,
    /// How each participant ended.
    pub outcomes: Vec<Outcome>,
    /// What the final model spent, for tasks with differential privacy.
    pub privacy: Option<PrivacyOutcome>,
    /// Under secure aggregation: the rounds' parameters and dropouts.
    pub secure: Option<SecureOutcome>,
}

/// What a run under secure aggregation shows (the report's `secure_aggregation` object).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecureOutcome {
    /// Rounds that ran the protocol (committed or failed).
    pub rounds: u64,
    /// Mean stores drawn per round.
    pub clients_per_round: f64,
    /// b of the last round.
    pub bits: u32,
    /// k of the last round.
    pub degree: u32,
    /// t of the last round.
    pub threshold: u32,
    /// Stores dropped at each step, summed over rounds: before advertising keys, before
    /// sharing them, before uploading, before unmasking.
    pub dropped: [u64; 4],
    /// ε against the coordinator (the privacy report's), if the run had DP.
    pub epsilon_against_coordinator: Option<f64>,
}

impl SecureOutcome {
    /// The report's `secure_aggregation` object.
    pub fn to_json(&self) -> serde_json::Value {
        let [a, s, u, m] = self.dropped;
        serde_json::json!({
            "rounds": self.rounds,
            "clients_per_round": (self.clients_per_round * 100.0).round() / 100.0,
            "bits": self.bits, "k": self.degree, "t": self.threshold,
            "dropped": {"before_advertising": a, "before_sharing": s, "before_upload": u, "before_unmasking": m},
            "epsilon_against_coordinator": self.epsilon_against_coordinator
                .map(|e| if e.is_finite() { serde_json::json!((e * 1e4).round() / 1e4) } else { serde_json::Value::Null }),
        })
    }
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
    /// What the noised evaluation metrics spent (their own budget).
    pub evaluation_epsilon: f64,
    /// Training and evaluation composed.
    pub total_epsilon: f64,
    /// ε against the coordinator itself (infinite under central noise).
    pub epsilon_against_coordinator: f64,
}

impl PrivacyOutcome {
    /// The `privacy` object of a report.
    pub fn to_json(&self) -> serde_json::Value {
        let round4 = |v: f64| (v * 1e4).round() / 1e4;
        // JSON has no infinity: an unbounded ε is written as null.
        let finite = |v: f64| v.is_finite().then(|| round4(v));
        serde_json::json!({
            "epsilon": round4(self.epsilon), "delta": self.delta, "unit": self.unit,
            "noise_placement": self.noise_placement, "noise_multiplier": round4(self.noise_multiplier),
            "sampling_rate": self.sampling_rate, "rounds": self.rounds, "clip_norm": self.clip_norm,
            "accountant": self.accountant,
            "evaluation_epsilon": finite(self.evaluation_epsilon),
            "total_epsilon": finite(self.total_epsilon),
            "epsilon_against_coordinator": finite(self.epsilon_against_coordinator),
        })
    }
}

/// A throwaway PKI for one simulation: a CA, the coordinator's certificate, an operator's
/// certificate, and a store certificate issued for each store as it joins. The simulator runs
/// over mTLS by default, so the path a deployment takes is the one it tests.
#[derive(Debug)]
pub struct SimPki {
    dir: tempfile::TempDir,
    pki: fedretail_coordinator::pki::PkiDir,
    /// Store name → certificate name (store names may hold spaces; certificate names may not).
    issued: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

/// The administrator certificate the simulator drives the Admin API with.
const SIM_OPERATOR: &str = "sim-operator";

impl SimPki {
    /// A new CA, coordinator certificate and operator certificate in a temporary directory.
    ///
    /// # Errors
    ///
    /// Certificate generation or I/O failures.
    pub fn new() -> anyhow::Result<SimPki> {
        use fedretail_coordinator::pki::{Role, ephemeral};
        let dir = tempfile::tempdir().context("creating a temporary PKI directory")?;
        let pki = ephemeral(dir.path(), &[], &[(SIM_OPERATOR, Role::Operator)])?;
        Ok(SimPki { dir, pki, issued: Default::default() })
    }

    /// Where the PKI lives (removed when this is dropped).
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The coordinator's certificate files.
    pub fn coordinator_files(&self) -> fedretail_coordinator::tls::TlsFiles {
        fedretail_coordinator::tls::TlsFiles {
            ca: self.pki.ca_cert(),
            cert: self.pki.coordinator_cert(),
            key: self.pki.coordinator_key(),
            revoked: None,
        }
    }

    /// The store's certificate and key, issued on first use.
    ///
    /// # Errors
    ///
    /// Certificate generation or I/O failures.
    pub fn store(&self, store: &str) -> anyhow::Result<fedretail_client::transport::StoreTls> {
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let name = match issued.get(store) {
            Some(name) => name.clone(),
            None => {
                let mut base: String = store
                    .chars()
                    .map(
                        |c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' },
                    )
                    .take(56)
                    .collect();
                if base.is_empty() || base.starts_with('.') {
                    base.insert(0, 's');
                }
                let taken: std::collections::BTreeSet<&String> = issued.values().collect();
                let mut name = base.clone();
                let mut n = 1;
                while taken.contains(&name) {
                    n += 1;
                    name = format!("{base}-{n}");
                }
                fedretail_coordinator::pki::issue_store(&self.pki, &name)?;
                issued.insert(store.to_string(), name.clone());
                name
            }
        };
        let (cert, key) = self.pki.store(&name);
        Ok(fedretail_client::transport::StoreTls::read(&self.pki.ca_cert(), &cert, &key)?)
    }

    /// TLS settings of the simulator's operator for the Admin API.
    ///
    /// # Errors
    ///
    /// Unreadable files.
    pub fn operator(&self) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let (cert, key) = self.pki.admin(SIM_OPERATOR);
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.pki.ca_cert())?))
            .identity(Identity::from_pem(read(&cert)?, read(&key)?)))
    }
}

/// A coordinator running in this process on two `127.0.0.1` ports.
#[derive(Debug)]
pub struct LocalCoordinator {
    /// Where the Training service listens.
    pub addr: SocketAddr,
    /// Where the Admin service listens.
    pub admin_addr: SocketAddr,
    /// The PKI, unless the coordinator serves plaintext.
    pki: Option<std::sync::Arc<SimPki>>,
    stop: CancellationToken,
    join: tokio::task::JoinHandle<Result<(), fedretail_coordinator::RunError>>,
}

impl LocalCoordinator {
    /// Binds ports first, then starts serving over mTLS with a fresh PKI (so clients can
    /// connect at once).
    ///
    /// # Errors
    ///
    /// If a port cannot be bound or the PKI cannot be made.
    pub async fn start(poll_timeout: Duration) -> anyhow::Result<LocalCoordinator> {
        LocalCoordinator::start_with(poll_timeout, Some(std::sync::Arc::new(SimPki::new()?))).await
    }

    /// [`LocalCoordinator::start`] with a given PKI, or plaintext (`None`).
    ///
    /// # Errors
    ///
    /// If a port cannot be bound.
    pub async fn start_with(
        poll_timeout: Duration,
        pki: Option<std::sync::Arc<SimPki>>,
    ) -> anyhow::Result<LocalCoordinator> {
        use fedretail_coordinator::config::{Config, Security};
        let listeners =
            fedretail_coordinator::Listeners::loopback().await.context("binding loopback ports")?;
        let addr = listeners.training.local_addr()?;
        let admin_addr = listeners.admin.local_addr()?;
        let config = Config {
            listen: addr,
            admin_listen: admin_addr,
            security: match &pki {
                Some(p) => Security::Mtls(p.coordinator_files()),
                None => Security::Insecure,
            },
            limits: fedretail_coordinator::tls::ConnLimits {
                max_connections: 4096,
                handshake_timeout: Duration::from_secs(30),
            },
            max_clients_per_task: 100_000,
            poll_timeout,
            max_concurrent_uploads: 16,
            max_message_bytes: 8 << 20,
            store: None,
            deterministic: true,
            // Tests and simulations run plans of every kind, private or not.
            policy: fedretail_coordinator::policy::Policy::permissive(),
            tasks: Vec::new(),
        };
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let join = tokio::spawn(async move {
            fedretail_coordinator::run(config, listeners, async move { signal.cancelled().await })
                .await
        });
        Ok(LocalCoordinator { addr, admin_addr, pki, stop, join })
    }

    /// The Training service's URL.
    pub fn url(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A gRPC transport for the store named `store` (with its own certificate over mTLS).
    ///
    /// # Errors
    ///
    /// Certificate or URL failures.
    pub fn transport(&self, store: &str) -> anyhow::Result<GrpcTransport> {
        Ok(match &self.pki {
            Some(pki) => GrpcTransport::with_tls(&self.url(), &pki.store(store)?)?,
            None => GrpcTransport::new(&self.url())?,
        })
    }

    /// An Admin client with the simulator's operator certificate.
    ///
    /// # Errors
    ///
    /// Connection failures.
    pub async fn admin(&self) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", self.admin_addr);
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())?;
        if let Some(pki) = &self.pki {
            endpoint = endpoint.tls_config(pki.operator()?)?;
        }
        let channel = endpoint.connect().await.with_context(|| format!("connecting to {url}"))?;
        Ok(AdminClient::new(channel))
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
    dropout: f64,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<FederatedResult> {
    let mut admin = coordinator.admin().await?;
    let task_id = admin
        .create_task(pb::CreateTaskRequest { spec: Some(spec.into()) })
        .await
        .context("creating the task")?
        .into_inner()
        .task_id;

    let cancel = CancellationToken::new();
    let mut participants = JoinSet::new();
    for (name, data) in clients {
        let transport = coordinator.transport(&name)?;
        let config = ParticipantConfig {
            task: spec.name.clone(),
            store_name: name,
            state_dir: None,
            max_backoff: Duration::from_secs(2),
            // The simulator repeats runs exactly; see ParticipantConfig::seeded_privacy.
            seeded_privacy: true,
            dropout,
            policy: fedretail_client::policy::StorePolicy::permissive(),
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
    let coordinator_eval = rounds.last().and_then(|r| r.eval);
    // Under privacy the coordinator sees only bounded, noised evaluation sums (issue 10, H1).
    // The simulator holds every store's data anyway, so its report scores the final model on
    // the stores' exact local sums, which in a deployment never leave the stores.
    let final_eval = if spec.privacy.is_some() {
        let mut exact = EvalSums::default();
        for o in &outcomes {
            exact.merge(&o.last_eval.unwrap_or_default());
        }
        exact
    } else {
        coordinator_eval.unwrap_or_else(|| {
            tracing::warn!(
                "the last round has no evaluation (every store's predictions were non-finite?)"
            );
            EvalSums::default()
        })
    };
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
        evaluation_epsilon: p.evaluation_epsilon,
        total_epsilon: p.total_epsilon,
        epsilon_against_coordinator: p.epsilon_against_coordinator,
    });
    let secure = spec.plan.secure_aggregation.is_on().then(|| {
        let mut s = SecureOutcome::default();
        let mut cohort = 0u64;
        // Newest first: the first seen is the last round's.
        for r in status.rounds.iter().filter_map(|r| r.secure_aggregation) {
            if s.rounds == 0 {
                (s.bits, s.degree, s.threshold) = (r.bits, r.degree, r.threshold);
            }
            s.rounds += 1;
            cohort += u64::from(r.cohort);
            for (d, v) in s.dropped.iter_mut().zip([
                r.dropped_before_advertising,
                r.dropped_before_sharing,
                r.dropped_before_upload,
                r.dropped_before_unmasking,
            ]) {
                *d += u64::from(v);
            }
        }
        s.clients_per_round = cohort as f64 / s.rounds.max(1) as f64;
        s.epsilon_against_coordinator = privacy.as_ref().map(|p| p.epsilon_against_coordinator);
        s
    });
    Ok(FederatedResult {
        secure,
        rounds,
        failed_rounds: status.failed_rounds,
        final_eval,
        coordinator_eval,
        outcomes,
        privacy,
    })
}
