//! The coordinator's tasks: creates them, resumes them from the store, and finds their handles.

use crate::round::driver::{self, DriverConfig};
use crate::round::{Reject, RoundHandle};
use crate::store::{Store, StoreError};
use fedretail_core::ids::TaskId;
use fedretail_core::plan::{SpecError, TaskSpec};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Creating a task failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateTaskError {
    /// The spec is invalid.
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// The store refused (duplicate name) or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The coordinator's policy refuses the task.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyViolation),
}

/// All tasks of one coordinator.
#[derive(Debug)]
pub struct Tasks {
    store: Arc<dyn Store>,
    config: DriverConfig,
    policy: crate::policy::Policy,
    /// A simulation may keep a private task's ledger in memory: it lives as long as the
    /// simulation, and nothing it trains is deployed. A coordinator from a TOML config cannot.
    volatile_ledger_allowed: bool,
    cancel: CancellationToken,
    handles: Mutex<BTreeMap<TaskId, (String, RoundHandle)>>,
    /// The supervisor receives every driver's join handle, to stop the process if one panics.
    drivers: mpsc::UnboundedSender<JoinHandle<()>>,
}

impl Tasks {
    /// Resumes every task in `store`; returns the registry and the receiver of driver handles.
    pub(crate) fn resume(
        store: Arc<dyn Store>,
        config: DriverConfig,
        policy: crate::policy::Policy,
        volatile_ledger_allowed: bool,
        cancel: CancellationToken,
    ) -> Result<(Arc<Tasks>, mpsc::UnboundedReceiver<JoinHandle<()>>), StoreError> {
        // Unbounded is fine here: one message per task ever created.
        let (drivers, rx) = mpsc::unbounded_channel();
        let tasks = Arc::new(Tasks {
            store: store.clone(),
            config,
            policy,
            volatile_ledger_allowed,
            cancel,
            handles: Mutex::new(BTreeMap::new()),
            drivers,
        });
        for stored in store.tasks()? {
            // Charged rounds that a crash kept from committing are recorded failed, so the
            // round log explains every charge (M8).
            let interrupted = store.recover_interrupted(stored.id)?;
            if interrupted > 0 {
                tracing::warn!(task_id = %stored.id, interrupted, "charged rounds were lost to a crash; recorded as failed");
            }
            let snapshot = store.load(stored.id)?.ok_or(StoreError::UnknownTask(stored.id))?;
            tracing::info!(task_id = %stored.id, name = %stored.spec.name, state = stored.state.as_str(), "resuming task");
            tasks.start(stored.id, stored.spec, (stored.state, stored.reason), snapshot);
        }
        Ok((tasks, rx))
    }

    fn start(
        &self,
        id: TaskId,
        spec: TaskSpec,
        state: (crate::round::TaskState, String),
        snapshot: crate::store::Snapshot,
    ) -> RoundHandle {
        let name = spec.name.clone();
        let (handle, join) = driver::spawn(
            id,
            Arc::new(spec),
            state,
            snapshot,
            self.store.clone(),
            self.config,
            self.cancel.clone(),
        );
        let _ = self.drivers.send(join);
        self.lock().insert(id, (name, handle.clone()));
        handle
    }

    /// The coordinator's store (the audit log lives there).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<TaskId, (String, RoundHandle)>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates and persists a task, then starts running it.
    ///
    /// # Errors
    ///
    /// An invalid spec, a duplicate name, or a store failure.
    pub fn create(&self, mut spec: TaskSpec) -> Result<TaskId, CreateTaskError> {
        spec.validate()?;
        let live = self.store.tasks()?.iter().filter(|t| !t.state.is_final()).count();
        self.policy.check(&spec, live)?;
        if spec.privacy.is_some() && !self.store.is_durable() && !self.volatile_ledger_allowed {
            return Err(crate::policy::PolicyViolation {
                rule: "durable_store",
                message: "a private task needs a durable store for its ledger (`store = \"coordinator.db\"` in the config): a ledger in memory is forgotten on restart".into(),
            }
            .into());
        }
        if let Some(privacy) = spec.privacy.as_mut() {
            use fedretail_core::privacy::accountant::calibrate_noise;
            let z = calibrate_noise(
                &privacy.accountant,
                privacy.sampling_rate,
                spec.plan.rounds,
                privacy.target_epsilon,
                privacy.delta,
            )
            .map_err(|e| SpecError { field: "privacy.target_epsilon", message: e.to_string() })?;
            // The coordinator calibrates; a caller may ask for more noise, never for less.
            match privacy.noise_multiplier {
                Some(given) if given < z * (1.0 - 1e-9) => {
                    return Err(SpecError {
                        field: "privacy.noise_multiplier",
                        message: format!(
                            "{given} is below {z}, the noise {} rounds need to stay within epsilon {}",
                            spec.plan.rounds, privacy.target_epsilon
                        ),
                    }
                    .into());
                }
                Some(_) => {}
                None => privacy.noise_multiplier = Some(z),
            }
            // The evaluation metrics have their own budget, spread over the evaluating rounds.
            let evaluations = driver::evaluating_rounds(&spec.plan);
            let z_eval = calibrate_noise(
                &privacy.accountant,
                1.0,
                evaluations,
                privacy.evaluation_epsilon,
                privacy.delta,
            )
            .map_err(|e| SpecError {
                field: "privacy.evaluation_epsilon",
                message: e.to_string(),
            })?;
            if privacy.evaluation_noise_multiplier.is_none_or(|given| given < z_eval) {
                privacy.evaluation_noise_multiplier = Some(z_eval);
            }
            tracing::info!(
                noise_multiplier = privacy.noise_multiplier,
                epsilon = privacy.target_epsilon,
                rounds = spec.plan.rounds,
                "noise calibrated"
            );
            // Adaptive clipping's count noise must leave room for the update noise.
            spec.validate()?;
            // Distributed noise under secure aggregation: the stores' discrete Gaussian must
            // reach the target too (the same calibration every store repeats).
            fedretail_core::secagg::round::task_noise(&spec)
                .map_err(|message| SpecError { field: "privacy.target_epsilon", message })?;
        }
        let initial = Arc::new(driver::initial_model(&spec));
        let id = self.store.create_task(&spec, initial)?;
        let snapshot = self.store.load(id)?.ok_or(StoreError::UnknownTask(id))?;
        tracing::info!(task_id = %id, name = %spec.name, n_params = spec.model.n_params(), "task created");
        self.store.append_audit(&crate::store::AuditEvent::coordinator(
            "task_started",
            id,
            serde_json::json!({
                "name": spec.name,
                "n_params": spec.model.n_params(),
                "rounds": spec.plan.rounds,
                "privacy": spec.privacy.as_ref().map(|p| serde_json::json!({
                    "target_epsilon": p.target_epsilon,
                    "delta": p.delta,
                    "noise_multiplier": p.noise_multiplier,
                })),
            }),
        ))?;
        self.start(id, spec, (crate::round::TaskState::Running, String::new()), snapshot);
        Ok(id)
    }

    /// The task with this id.
    ///
    /// # Errors
    ///
    /// [`Reject::UnknownTask`].
    pub fn get(&self, id: TaskId) -> Result<RoundHandle, Reject> {
        self.lock()
            .get(&id)
            .map(|(_, h)| h.clone())
            .ok_or_else(|| Reject::UnknownTask(id.to_string()))
    }

    /// The task with this name.
    ///
    /// # Errors
    ///
    /// [`Reject::UnknownTask`].
    pub fn by_name(&self, name: &str) -> Result<RoundHandle, Reject> {
        self.lock()
            .values()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.clone())
            .ok_or_else(|| Reject::UnknownTask(format!("named {name:?}")))
    }

    /// Every task's handle.
    pub fn all(&self) -> Vec<RoundHandle> {
        self.lock().values().map(|(_, h)| h.clone()).collect()
    }

    /// Whether a task with this name exists.
    pub fn contains_name(&self, name: &str) -> bool {
        self.lock().values().any(|(n, _)| n == name)
    }
}
