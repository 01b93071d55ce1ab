//! The `Admin` gRPC service: create, pause, resume and cancel tasks, show their status and the
//! audit log, export models; every call authorised by the role of the caller's certificate and
//! written to the audit log with its outcome.

use super::status::to_status;
use super::{ChunkStream, model_chunks};
use crate::pki::Role;
use crate::round::Control;
use crate::store::AuditEvent;
use crate::tasks::{CreateTaskError, Tasks};
use fedretail_core::ids::TaskId;
use fedretail_core::plan::TaskSpec;
use fedretail_proto::pb;
use fedretail_proto::pb::admin_server::Admin;
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

/// Rounds shown by `GetTask` when the request does not say.
const DEFAULT_ROUNDS: usize = 20;
/// Audit entries returned by one `GetAuditLog` call at most.
const MAX_AUDIT: usize = 1000;

/// What an Admin call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permission {
    /// Status, task lists, the audit log.
    Read,
    /// Create, pause, resume, cancel.
    Manage,
    /// Export models.
    Export,
}

impl Permission {
    /// The roles that hold it. Export is not an operator's: taking a model out of the system is
    /// a separate duty.
    pub(crate) fn roles(self) -> &'static [Role] {
        match self {
            Permission::Read => &[Role::Auditor, Role::Operator, Role::Exporter],
            Permission::Manage => &[Role::Operator],
            Permission::Export => &[Role::Exporter],
        }
    }
}

/// An authorised caller, for the audit log.
#[derive(Debug, Clone)]
struct Caller {
    name: String,
    role: String,
}

/// The `Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    tasks: Arc<Tasks>,
    mtls: bool,
}

impl AdminService {
    pub(crate) fn new(tasks: Arc<Tasks>, mtls: bool) -> AdminService {
        AdminService { tasks, mtls }
    }

    /// Checks the caller's certificate against `needed`; audits refusals.
    async fn authorise<T>(
        &self,
        request: &Request<T>,
        action: &'static str,
        needed: Permission,
    ) -> Result<Caller, Status> {
        if !self.mtls {
            return Ok(Caller { name: "anonymous".into(), role: "insecure".into() });
        }
        let roles = needed.roles().iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or ");
        let refusal = match crate::tls::peer(request) {
            None => Status::unauthenticated(format!(
                "{action} needs an administrator certificate with the role {roles}"
            )),
            Some(Err(m)) => Status::unauthenticated(format!("{action}: {m}")),
            Some(Ok(id)) if needed.roles().contains(&id.role) => {
                return Ok(Caller { name: id.name, role: id.role.as_str().into() });
            }
            Some(Ok(id)) => {
                let status = Status::permission_denied(format!(
                    "{action} needs the role {roles}; {} holds {}",
                    id.name, id.role
                ));
                self.audit(
                    &Caller { name: id.name, role: id.role.as_str().into() },
                    action,
                    None,
                    Err(&status),
                    serde_json::Value::Null,
                )
                .await;
                return Err(status);
            }
        };
        Err(refusal)
    }

    /// Appends an admin call to the audit log. A call whose audit entry cannot be written is
    /// refused (the caller sees `INTERNAL`), so nothing an administrator does goes unrecorded.
    async fn audit(
        &self,
        caller: &Caller,
        action: &str,
        task: Option<TaskId>,
        outcome: Result<(), &Status>,
        detail: serde_json::Value,
    ) -> bool {
        let event = AuditEvent {
            actor: caller.name.clone(),
            role: caller.role.clone(),
            action: action.into(),
            task,
            outcome: match outcome {
                Ok(()) => "ok".into(),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            },
            detail,
        };
        let tasks = self.tasks.clone();
        match tokio::task::spawn_blocking(move || tasks.store().append_audit(&event)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the audit log");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "audit write panicked");
                false
            }
        }
    }

    /// Audits the outcome of a call and passes it on.
    async fn audited<T>(
        &self,
        caller: &Caller,
        action: &str,
        task: Option<TaskId>,
        detail: serde_json::Value,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let written = self.audit(caller, action, task, result.as_ref().map(|_| ()), detail).await;
        if !written {
            return Err(Status::internal("the audit log cannot be written; nothing was done"));
        }
        result
    }

    async fn control(
        &self,
        request: Request<pb::TaskActionRequest>,
        action: &'static str,
        control: Control,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        let caller = self.authorise(&request, action, Permission::Manage).await?;
        let req = request.into_inner();
        let task = TaskId(req.task_id);
        let reason = req.reason.chars().take(500).collect::<String>();
        let result = match self.tasks.get(task) {
            Ok(handle) => handle.control(control).await.map_err(|r| to_status(&r)),
            Err(r) => Err(to_status(&r)),
        };
        let status = self
            .audited(&caller, action, Some(task), serde_json::json!({ "reason": reason }), result)
            .await?;
        tracing::info!(task_id = %task, by = %caller.name, action, "task changed by an operator");
        Ok(Response::new((&status).into()))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_task(
        &self,
        request: Request<pb::CreateTaskRequest>,
    ) -> Result<Response<pb::CreateTaskResponse>, Status> {
        let caller = self.authorise(&request, "CreateTask", Permission::Manage).await?;
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))
            .and_then(|spec| {
                TaskSpec::try_from(spec)
                    .map_err(|e| Status::invalid_argument(format!("invalid task spec: {e}")))
            });
        let name = spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        let created = match spec {
            Ok(spec) => {
                let tasks = self.tasks.clone();
                match tokio::task::spawn_blocking(move || tasks.create(spec)).await {
                    Ok(Ok(id)) => Ok(id),
                    Ok(Err(CreateTaskError::Invalid(e))) => {
                        Err(Status::invalid_argument(e.to_string()))
                    }
                    Ok(Err(CreateTaskError::Store(crate::store::StoreError::DuplicateTask(n)))) => {
                        Err(Status::already_exists(format!("a task named {n:?} already exists")))
                    }
                    Ok(Err(CreateTaskError::Store(e))) => Err(Status::internal(e.to_string())),
                    Ok(Err(CreateTaskError::Policy(v))) => {
                        Err(Status::failed_precondition(v.to_string()))
                    }
                    Err(e) => Err(Status::internal(e.to_string())),
                }
            }
            Err(status) => Err(status),
        };
        let task = created.as_ref().ok().copied();
        let id = self
            .audited(&caller, "CreateTask", task, serde_json::json!({ "name": name }), created)
            .await?;
        Ok(Response::new(pb::CreateTaskResponse { task_id: id.0 }))
    }

    async fn pause_task(
        &self,
        request: Request<pb::TaskActionRequest>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        self.control(request, "PauseTask", Control::Pause).await
    }

    async fn resume_task(
        &self,
        request: Request<pb::TaskActionRequest>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        self.control(request, "ResumeTask", Control::Resume).await
    }

    async fn cancel_task(
        &self,
        request: Request<pb::TaskActionRequest>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        self.control(request, "CancelTask", Control::Cancel).await
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        let caller = self.authorise(&request, "GetTask", Permission::Read).await?;
        let req = request.into_inner();
        let task = TaskId(req.task_id);
        let max_rounds = if req.max_rounds == 0 { DEFAULT_ROUNDS } else { req.max_rounds as usize };
        let result = match self.tasks.get(task) {
            Ok(handle) => handle.status(max_rounds.min(10_000)).await.map_err(|r| to_status(&r)),
            Err(r) => Err(to_status(&r)),
        };
        let status =
            self.audited(&caller, "GetTask", Some(task), serde_json::Value::Null, result).await?;
        Ok(Response::new((&status).into()))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let caller = self.authorise(&request, "ListTasks", Permission::Read).await?;
        let mut tasks = Vec::new();
        let mut result = Ok(());
        for handle in self.tasks.all() {
            match handle.status(0).await {
                Ok(status) => tasks.push((&status).into()),
                Err(r) => {
                    result = Err(to_status(&r));
                    break;
                }
            }
        }
        self.audited(&caller, "ListTasks", None, serde_json::Value::Null, result).await?;
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn get_audit_log(
        &self,
        request: Request<pb::GetAuditLogRequest>,
    ) -> Result<Response<pb::GetAuditLogResponse>, Status> {
        let caller = self.authorise(&request, "GetAuditLog", Permission::Read).await?;
        let req = request.into_inner();
        let limit = if req.limit == 0 { MAX_AUDIT } else { (req.limit as usize).min(MAX_AUDIT) };
        let tasks = self.tasks.clone();
        let result =
            match tokio::task::spawn_blocking(move || tasks.store().audit_log(req.after, limit))
                .await
            {
                Ok(Ok(records)) => Ok(records),
                Ok(Err(e)) => Err(Status::internal(e.to_string())),
                Err(e) => Err(Status::internal(e.to_string())),
            };
        let records = self
            .audited(
                &caller,
                "GetAuditLog",
                None,
                serde_json::json!({ "after": req.after }),
                result,
            )
            .await?;
        let entries = records
            .into_iter()
            .map(|r| pb::AuditEntry {
                seq: r.seq,
                unix_ms: r.unix_ms,
                actor: r.event.actor,
                role: r.event.role,
                action: r.event.action,
                task_id: r.event.task.map_or(0, |t| t.0),
                outcome: r.event.outcome,
                detail: r.event.detail.to_string(),
            })
            .collect();
        Ok(Response::new(pb::GetAuditLogResponse { entries }))
    }

    type ExportModelStream = ChunkStream<pb::ExportModelChunk>;

    async fn export_model(
        &self,
        request: Request<pb::ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let caller = self.authorise(&request, "ExportModel", Permission::Export).await?;
        let task = TaskId(request.into_inner().task_id);
        let found = match self.tasks.get(task) {
            Ok(handle) => match handle.status(0).await {
                Ok(status) => match handle.latest_model().await {
                    Ok(blob) => Ok((status, blob)),
                    Err(r) => Err(to_status(&r)),
                },
                Err(r) => Err(to_status(&r)),
            },
            Err(r) => Err(to_status(&r)),
        };
        let detail = match &found {
            Ok((status, blob)) => serde_json::json!({
                "model_version": blob.version.0,
                "sha256": blob.sha256.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                "privacy": status.privacy.as_ref().map(|p| serde_json::json!({
                    "epsilon": p.epsilon,
                    "delta": p.delta,
                    "unit": format!("{:?}", p.unit).to_lowercase(),
                    "noise_placement": format!("{:?}", p.noise_placement).to_lowercase(),
                    "rounds": p.rounds,
                    "sampling_rate": p.sampling_rate,
                    "noise_multiplier": p.noise_multiplier,
                    "clip_norm": p.clip_norm,
                    "accountant": format!("{:?}", p.accountant).to_lowercase(),
                })),
            }),
            Err(_) => serde_json::Value::Null,
        };
        let (status, blob) =
            self.audited(&caller, "ExportModel", Some(task), detail, found).await?;
        let mut spec = Some(pb::TaskSpec::from(status.spec.as_ref()));
        let mut privacy = status.privacy.as_ref().map(pb::PrivacyReport::from);
        let stream = model_chunks(blob).map(move |chunk| {
            Ok(pb::ExportModelChunk {
                chunk: Some(chunk),
                spec: spec.take(),
                privacy: privacy.take(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
