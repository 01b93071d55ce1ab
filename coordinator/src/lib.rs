//! fedretail coordinator: runs federated training tasks as a round state machine over gRPC.
//!
//! # Layout
//!
//! - [`config`]: the TOML config, raw and validated.
//! - [`admin_cli`]: `fedretail-coordinator admin`, the Admin service from the command line.
//! - [`run`]: wires store, tasks, gRPC services and shutdown together.
//! - `round/`: the pure round state machine, its async driver and [`round::RoundHandle`].
//! - [`tasks`]: the registry of tasks and their handles.
//! - [`store`]: the [`store::Store`] trait, SQLite and in-memory.
//! - `service/`: the `Training` and `Admin` gRPC services; the only place `pb` types meet the
//!   coordinator's domain types.
//! - [`pki`]: the deployment CA, store and administrator certificates.
//! - [`tls`]: TLS 1.3 with client certificates, identities, and the accept loop.

pub mod admin_cli;
pub mod config;
pub mod pki;
pub mod policy;
pub mod round;
mod service;
pub mod store;
pub mod tasks;
pub mod tls;

use config::Config;
use fedretail_proto::pb::admin_server::AdminServer;
use fedretail_proto::pb::training_server::TrainingServer;
use round::driver::DriverConfig;
use std::future::Future;
use std::sync::Arc;
use store::{MemoryStore, SqliteStore, Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use service::TrainingService;
pub use service::admin::AdminService;

/// Why the coordinator stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store could not be opened or read at start-up.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A task from the config could not be created.
    #[error("creating task from config: {0}")]
    CreateTask(#[from] tasks::CreateTaskError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The TLS certificates could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// A task driver panicked: a bug; the process must not go on half-alive.
    #[error("a task driver panicked")]
    DriverPanicked,
}

/// The two bound listeners: stores on one address, administrators on another.
#[derive(Debug)]
pub struct Listeners {
    /// The Training service's (stores).
    pub training: TcpListener,
    /// The Admin service's.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both addresses of `config`.
    ///
    /// # Errors
    ///
    /// An address that cannot be bound.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let training = TcpListener::bind(config.listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding {}: {e}", config.listen))
        })?;
        let admin = TcpListener::bind(config.admin_listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding {}: {e}", config.admin_listen))
        })?;
        Ok(Listeners { training, admin })
    }

    /// Two listeners on `127.0.0.1` ports the OS picks (tests, the simulator).
    ///
    /// # Errors
    ///
    /// If no port can be bound.
    pub async fn loopback() -> std::io::Result<Listeners> {
        Ok(Listeners {
            training: TcpListener::bind("127.0.0.1:0").await?,
            admin: TcpListener::bind("127.0.0.1:0").await?,
        })
    }
}

type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

/// gRPC prescribes `RESOURCE_EXHAUSTED` for a message over the receiver's limit; tonic's codec
/// answers `OUT_OF_RANGE`. Rewrite the status of such refusals (always trailers-only, so the
/// status is in the headers) and leave every other response alone.
fn oversized_is_resource_exhausted(mut response: HttpResponse) -> HttpResponse {
    if let Some(status) = tonic::Status::from_header_map(response.headers())
        && status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large")
    {
        let status = tonic::Status::resource_exhausted(status.message());
        if status.add_header(response.headers_mut()).is_err() {
            tracing::warn!("cannot rewrite an oversized message's status");
        }
    }
    response
}

/// Serves the coordinator on `listeners` until `shutdown` resolves, with the store the config
/// names (SQLite), or an in-memory one.
///
/// # Errors
///
/// See [`RunError`].
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let store: Arc<dyn Store> = match &config.store {
        Some(path) => {
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .map_err(|e| StoreError::Backend(e.to_string()))??;
            Arc::new(store)
        }
        None => {
            tracing::warn!(
                "no `store` configured: tasks and models are kept in memory and lost on restart"
            );
            Arc::new(MemoryStore::new())
        }
    };
    run_with_store(config, store, listeners, shutdown).await
}

/// [`run`] with a given store.
///
/// # Errors
///
/// See [`RunError`].
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn Store>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // rustls must use ring whatever else enables another provider; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = match &config.security {
        config::Security::Mtls(files) => Some(tls::server_config(files)?),
        config::Security::Insecure => {
            tracing::warn!(
                "insecure = true: both services serve plaintext with no authentication; anyone who can reach the ports can enrol stores, create tasks and export models"
            );
            None
        }
    };
    let cancel = CancellationToken::new();
    let driver_config = DriverConfig {
        liveness_timeout: config.poll_timeout * 3,
        deterministic: config.deterministic,
        max_clients: config.max_clients_per_task,
        domain_epsilon: config.policy.max_epsilon,
        domain_delta: config.policy.max_delta,
    };
    let (tasks, mut drivers) = tasks::Tasks::resume(
        store,
        driver_config,
        config.policy.clone(),
        config.deterministic,
        cancel.clone(),
    )?;
    for spec in config.tasks {
        if !tasks.contains_name(&spec.name) {
            tasks.create(spec)?;
        }
    }

    // The supervisor: if any driver panics, stop serving and exit with an error.
    let panicked = Arc::new(Notify::new());
    let supervisor = {
        let panicked = panicked.clone();
        tokio::spawn(async move {
            let mut set = JoinSet::new();
            let mut failed = false;
            loop {
                tokio::select! {
                    handle = drivers.recv() => match handle {
                        Some(h) => { set.spawn(h); }
                        None => break,
                    },
                    Some(done) = set.join_next() => {
                        if matches!(done, Ok(Err(ref e)) if e.is_panic()) {
                            failed = true;
                            panicked.notify_one();
                        }
                    }
                }
            }
            while let Some(done) = set.join_next().await {
                failed |= matches!(done, Ok(Err(ref e)) if e.is_panic());
            }
            failed
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TrainingServer<TrainingService>>().await;
    health.set_serving::<AdminServer<AdminService>>().await;
    let mtls = tls.is_some();
    let training = TrainingServer::new(TrainingService::new(
        tasks.clone(),
        config.poll_timeout,
        config.max_concurrent_uploads,
        mtls,
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    let admin = AdminServer::new(AdminService::new(tasks.clone(), mtls))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    drop(tasks);

    let addrs = (listeners.training.local_addr().ok(), listeners.admin.local_addr().ok());
    tracing::info!(training = ?addrs.0, admin = ?addrs.1, mtls, "coordinator serving");
    let stop_serving = CancellationToken::new();
    {
        let (stop_serving, panicked) = (stop_serving.clone(), panicked.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown => tracing::info!("shutting down"),
                () = panicked.notified() => tracing::error!("a task driver panicked; shutting down"),
            }
            stop_serving.cancel();
        });
    }
    // Server-side limits: an idle or dead peer is found by keepalive, no single connection can
    // open unbounded streams, and every call ends (long polls and uploads end well before).
    let server = || {
        tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(
                oversized_is_resource_exhausted as fn(HttpResponse) -> HttpResponse,
            ))
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .max_concurrent_streams(Some(64))
            .concurrency_limit_per_connection(64)
            .timeout(std::time::Duration::from_secs(900))
    };
    let training_router = server().add_service(health_service).add_service(training);
    let admin_router = server().add_service(admin);
    let limits = config.limits;
    let served = match tls {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let handshake = move |tcp| {
                let acceptor = acceptor.clone();
                async move { acceptor.accept(tcp).await }
            };
            let (a, b) = (handshake.clone(), handshake);
            let t = tls::incoming(listeners.training, limits, stop_serving.clone(), a);
            let ad = tls::incoming(listeners.admin, limits, stop_serving.clone(), b);
            tokio::try_join!(
                training_router
                    .serve_with_incoming_shutdown(t, stop_serving.clone().cancelled_owned()),
                admin_router
                    .serve_with_incoming_shutdown(ad, stop_serving.clone().cancelled_owned()),
            )
        }
        None => {
            let plain = |tcp| async move { Ok::<_, std::io::Error>(tcp) };
            let t = tls::incoming(listeners.training, limits, stop_serving.clone(), plain);
            let ad = tls::incoming(listeners.admin, limits, stop_serving.clone(), plain);
            tokio::try_join!(
                training_router
                    .serve_with_incoming_shutdown(t, stop_serving.clone().cancelled_owned()),
                admin_router
                    .serve_with_incoming_shutdown(ad, stop_serving.clone().cancelled_owned()),
            )
        }
    }
    .map(|_| ());
    cancel.cancel();
    let failed = supervisor.await.unwrap_or(true);
    served?;
    if failed {
        return Err(RunError::DriverPanicked);
    }
    tracing::info!("coordinator stopped");
    Ok(())
}
