//! The `Admin` gRPC service: create tasks, show their status, export models.

use super::status::to_status;
use super::{ChunkStream, model_chunks};
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

/// The `Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    tasks: Arc<Tasks>,
}

impl AdminService {
    pub(crate) fn new(tasks: Arc<Tasks>) -> AdminService {
        AdminService { tasks }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_task(
        &self,
        request: Request<pb::CreateTaskRequest>,
    ) -> Result<Response<pb::CreateTaskResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let spec = TaskSpec::try_from(spec)
            .map_err(|e| Status::invalid_argument(format!("invalid task spec: {e}")))?;
        let tasks = self.tasks.clone();
        let created = tokio::task::spawn_blocking(move || tasks.create(spec))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match created {
            Ok(id) => Ok(Response::new(pb::CreateTaskResponse { task_id: id.0 })),
            Err(CreateTaskError::Invalid(e)) => Err(Status::invalid_argument(e.to_string())),
            Err(CreateTaskError::Store(crate::store::StoreError::DuplicateTask(n))) => {
                Err(Status::already_exists(format!("a task named {n:?} already exists")))
            }
            Err(CreateTaskError::Store(e)) => Err(Status::internal(e.to_string())),
        }
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        let req = request.into_inner();
        let handle = self.tasks.get(TaskId(req.task_id)).map_err(|r| to_status(&r))?;
        let max_rounds = if req.max_rounds == 0 { DEFAULT_ROUNDS } else { req.max_rounds as usize };
        let status = handle.status(max_rounds).await.map_err(|r| to_status(&r))?;
        Ok(Response::new((&status).into()))
    }

    async fn list_tasks(
        &self,
        _request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let mut tasks = Vec::new();
        for handle in self.tasks.all() {
            let status = handle.status(0).await.map_err(|r| to_status(&r))?;
            tasks.push((&status).into());
        }
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    type ExportModelStream = ChunkStream<pb::ExportModelChunk>;

    async fn export_model(
        &self,
        request: Request<pb::ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let handle =
            self.tasks.get(TaskId(request.into_inner().task_id)).map_err(|r| to_status(&r))?;
        let status = handle.status(0).await.map_err(|r| to_status(&r))?;
        let blob = handle.latest_model().await.map_err(|r| to_status(&r))?;
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
