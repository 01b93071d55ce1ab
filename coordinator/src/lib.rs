//! fedretail coordinator: runs federated training tasks as a round state machine over gRPC.
//!
//! # Layout
//!
//! - [`config`]: the TOML config, raw and validated.
//! - [`run`]: wires store, tasks, gRPC services and shutdown together.
//! - `round/`: the pure round state machine, its async driver and [`round::RoundHandle`].
//! - [`tasks`]: the registry of tasks and their handles.
//! - [`store`]: the [`store::Store`] trait, SQLite and in-memory.
//! - `service/`: the `Training` and `Admin` gRPC services; the only place `pb` types meet the
//!   coordinator's domain types.

pub mod config;
pub mod round;
mod service;
pub mod store;
pub mod tasks;

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
    /// A task driver panicked: a bug; the process must not go on half-alive.
    #[error("a task driver panicked")]
    DriverPanicked,
}

/// Serves the coordinator on `listener` until `shutdown` resolves, with the store the config
/// names (SQLite), or an in-memory one.
///
/// # Errors
///
/// See [`RunError`].
pub async fn run(
    config: Config,
    listener: TcpListener,
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
    run_with_store(config, store, listener, shutdown).await
}

/// [`run`] with a given store.
///
/// # Errors
///
/// See [`RunError`].
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let cancel = CancellationToken::new();
    let driver_config = DriverConfig {
        liveness_timeout: config.poll_timeout * 3,
        deterministic: config.deterministic,
    };
    let (tasks, mut drivers) = tasks::Tasks::resume(store, driver_config, cancel.clone())?;
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
    let training = TrainingServer::new(TrainingService::new(
        tasks.clone(),
        config.poll_timeout,
        config.max_concurrent_uploads,
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    let admin = AdminServer::new(AdminService::new(tasks.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    drop(tasks);

    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "coordinator serving");
    let signal = {
        let panicked = panicked.clone();
        async move {
            tokio::select! {
                () = shutdown => tracing::info!("shutting down"),
                () = panicked.notified() => tracing::error!("a task driver panicked; shutting down"),
            }
        }
    };
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(training)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            signal,
        )
        .await;
    cancel.cancel();
    let failed = supervisor.await.unwrap_or(true);
    served?;
    if failed {
        return Err(RunError::DriverPanicked);
    }
    tracing::info!("coordinator stopped");
    Ok(())
}
