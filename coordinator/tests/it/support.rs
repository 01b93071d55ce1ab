//! Test fixtures: a coordinator on `127.0.0.1:0`, stopped when the fixture is dropped.

use fedretail_coordinator::config::{Config, Security};
use fedretail_core::optim::ServerOptimizer;
use fedretail_core::plan::{ModelSpec, TaskSpec, TrainingPlan};
use fedretail_proto::pb;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(crate) struct TestCoordinator {
    /// The Training service.
    pub(crate) url: String,
    /// The Admin service.
    pub(crate) admin_url: String,
    stop: CancellationToken,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl TestCoordinator {
    /// Shuts down and waits until the coordinator has stopped.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        self.join.take().unwrap().await.unwrap();
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds first, then serves, so clients can connect at once.
pub(crate) async fn start_coordinator() -> TestCoordinator {
    start_coordinator_with(None).await
}

/// [`start_coordinator`] with an SQLite store at `store`; plaintext (`insecure = true`).
pub(crate) async fn start_coordinator_with(store: Option<std::path::PathBuf>) -> TestCoordinator {
    start_secured(store, Security::Insecure).await
}

/// A coordinator on loopback with the given security.
pub(crate) async fn start_secured(
    store: Option<std::path::PathBuf>,
    security: Security,
) -> TestCoordinator {
    start_full(store, security, fedretail_coordinator::policy::Policy::permissive()).await
}

/// A coordinator on loopback with the given security and policy.
pub(crate) async fn start_full(
    store: Option<std::path::PathBuf>,
    security: Security,
    policy: fedretail_coordinator::policy::Policy,
) -> TestCoordinator {
    let listeners = fedretail_coordinator::Listeners::loopback().await.unwrap();
    let addr = listeners.training.local_addr().unwrap();
    let admin_addr = listeners.admin.local_addr().unwrap();
    let scheme = if security == Security::Insecure { "http" } else { "https" };
    let config = Config {
        listen: addr,
        admin_listen: admin_addr,
        security,
        limits: fedretail_coordinator::tls::ConnLimits {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(5),
        },
        max_clients_per_task: 1000,
        poll_timeout: Duration::from_millis(500),
        max_concurrent_uploads: 4,
        max_message_bytes: 4 << 20,
        store,
        deterministic: false,
        policy,
        tasks: Vec::new(),
    };
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let join = tokio::spawn(async move {
        fedretail_coordinator::run(config, listeners, signal.cancelled_owned()).await.unwrap()
    });
    TestCoordinator {
        url: format!("{scheme}://{addr}"),
        admin_url: format!("{scheme}://{admin_addr}"),
        stop,
        join: Some(join),
    }
}

pub(crate) fn plan(rounds: u64, cohort: u32) -> TrainingPlan {
    TrainingPlan {
        rounds,
        cohort_size: cohort,
        min_clients: cohort,
        local_epochs: 1,
        clip_norm: 1.0,
        server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
        eval_every: 0,
        eval_fraction: 1.0,
        select_timeout_secs: 60.0,
        configure_timeout_secs: 60.0,
        collect_timeout_secs: 60.0,
        evaluate_timeout_secs: 60.0,
        seed: 3,
        weight_by_examples: true,
        secure_aggregation: Default::default(),
    }
}

pub(crate) fn bench_task(name: &str, n_params: usize, rounds: u64, cohort: u32) -> TaskSpec {
    TaskSpec {
        name: name.into(),
        model: ModelSpec::Bench { n_params },
        plan: plan(rounds, cohort),
        privacy: None,
    }
}

/// Creates a task through the Admin service at `url` (plaintext).
pub(crate) async fn create_task(url: &str, spec: &TaskSpec) -> Result<u64, tonic::Status> {
    let mut admin = pb::admin_client::AdminClient::connect(url.to_string()).await.unwrap();
    admin
        .create_task(pb::CreateTaskRequest { spec: Some(spec.into()) })
        .await
        .map(|r| r.into_inner().task_id)
}

pub(crate) async fn task_status(url: &str, task_id: u64) -> pb::TaskStatus {
    let mut admin = pb::admin_client::AdminClient::connect(url.to_string()).await.unwrap();
    admin.get_task(pb::GetTaskRequest { task_id, max_rounds: 100 }).await.unwrap().into_inner()
}

/// Creates a task with an already connected Admin client.
pub(crate) async fn create_task_over(
    admin: &pb::admin_client::AdminClient<tonic::transport::Channel>,
    spec: &TaskSpec,
) -> Result<u64, tonic::Status> {
    admin
        .clone()
        .create_task(pb::CreateTaskRequest { spec: Some(spec.into()) })
        .await
        .map(|r| r.into_inner().task_id)
}

/// A channel to `url` trusting `ca`, presenting `cert`/`key` if given; the error as text.
pub(crate) async fn channel(
    url: &str,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}
