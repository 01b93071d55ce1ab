//! gRPC services: thin adapters from `pb` messages to [`RoundHandle`] calls.

pub(crate) mod admin;
mod convert;
mod status;

use crate::round::{MaskedUpload, Reject, RoundHandle, TrainSummary, Upload};
use crate::tasks::Tasks;
use fedretail_core::aggregate::AggregateError;
use fedretail_core::ids::{ClientId, ModelVersion, RoundId, TaskId};
use fedretail_core::update::{CHUNK_PARAMS, Reassembler, encode_f32s};
use fedretail_proto::pb;
use fedretail_proto::pb::training_server::Training;
use status::to_status;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// A boxed stream of model chunks.
pub(crate) type ChunkStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `Training` service that store clients call.
#[derive(Debug, Clone)]
pub struct TrainingService {
    tasks: Arc<Tasks>,
    poll_timeout: Duration,
    /// Bounds the uploads being reassembled at once, so staging memory is
    /// O(max_concurrent_uploads × model), whatever the cohort size.
    upload_permits: Arc<Semaphore>,
    /// Whether callers present certificates: then a store is its certificate.
    mtls: bool,
}

/// The store a request comes from: over mTLS the verified certificate's name (a certificate
/// of another role gets nothing here); in insecure mode nobody is authenticated (`None`).
pub(crate) fn caller_store<T>(mtls: bool, request: &Request<T>) -> Result<Option<String>, Status> {
    if !mtls {
        return Ok(None);
    }
    match crate::tls::peer(request) {
        None => Err(Status::unauthenticated("a store certificate is required")),
        Some(Err(m)) => Err(Status::unauthenticated(m)),
        Some(Ok(id)) if id.role == crate::pki::Role::Store => Ok(Some(id.name)),
        Some(Ok(id)) => Err(Status::permission_denied(format!(
            "the Training service is for stores; {id} holds no store certificate"
        ))),
    }
}

impl TrainingService {
    pub(crate) fn new(
        tasks: Arc<Tasks>,
        poll_timeout: Duration,
        max_concurrent_uploads: usize,
        mtls: bool,
    ) -> TrainingService {
        TrainingService {
            tasks,
            poll_timeout,
            upload_permits: Arc::new(Semaphore::new(max_concurrent_uploads)),
            mtls,
        }
    }

    fn task(&self, id: u64) -> Result<RoundHandle, Status> {
        self.tasks.get(TaskId(id)).map_err(|r| to_status(&r))
    }

    /// The task, after checking that `client` belongs to the store the certificate names.
    async fn task_for<T>(
        &self,
        request: &Request<T>,
        task: u64,
        client: u64,
    ) -> Result<RoundHandle, Status> {
        let store = caller_store(self.mtls, request)?;
        let handle = self.task(task)?;
        if let Some(store) = store {
            handle.check_owner(ClientId(client), store).await.map_err(|r| to_status(&r))?;
        }
        Ok(handle)
    }

    /// Reads the chunks and trailer of an upload whose header was accepted, holding one of the
    /// staging permits while it does.
    async fn receive(
        &self,
        stream: &mut Streaming<pb::UploadUpdateRequest>,
        client: ClientId,
        round: RoundId,
        n_params: usize,
        announced: u64,
        weight: f64,
    ) -> Result<Upload, Status> {
        use pb::upload_update_request::Part;
        let malformed = |m: String| to_status(&Reject::Malformed(m));
        if announced as usize != n_params {
            let wrong = AggregateError::WrongShape { expected: n_params, got: announced as usize };
            return Err(to_status(&Reject::InvalidUpdate(wrong)));
        }
        let _permit =
            self.upload_permits.acquire().await.map_err(|_| to_status(&Reject::ShuttingDown))?;
        let mut reassembler = Reassembler::new(n_params);
        let trailer = loop {
            match stream.message().await? {
                Some(pb::UploadUpdateRequest { part: Some(Part::Chunk(c)) }) => {
                    reassembler
                        .push(c.offset as usize, &c.data)
                        .map_err(|e| malformed(e.to_string()))?;
                }
                Some(pb::UploadUpdateRequest { part: Some(Part::Trailer(t)) }) => break t,
                Some(_) => {
                    return Err(malformed("expected an UploadChunk or UploadTrailer".into()));
                }
                None => return Err(malformed("the stream ended before the UploadTrailer".into())),
            }
        };
        let values =
            reassembler.finish(Some(&trailer.sha256)).map_err(|e| malformed(e.to_string()))?;
        let s = trailer.summary.unwrap_or_default();
        let summary = TrainSummary {
            n_examples: s.n_examples,
            train_loss: s.train_loss,
            norm_before_clip: s.norm_before_clip,
            unclipped: s.unclipped,
        };
        Ok(Upload { client, round, values, weight, summary })
    }
}

/// Streams a model in chunks of [`CHUNK_PARAMS`], encoding each chunk only when it is sent.
pub(crate) fn model_chunks(
    blob: Arc<crate::round::ModelBlob>,
) -> impl Stream<Item = pb::ModelChunk> + Send {
    let n_chunks = blob.values.len().div_ceil(CHUNK_PARAMS).max(1);
    tokio_stream::iter(0..n_chunks).map(move |i| {
        let start = i * CHUNK_PARAMS;
        let end = (start + CHUNK_PARAMS).min(blob.values.len());
        let mut data = Vec::with_capacity((end - start) * 4);
        encode_f32s(&blob.values[start..end], &mut data);
        pb::ModelChunk {
            model_version: blob.version.0,
            offset: start as u64,
            n_params: blob.values.len() as u64,
            data,
            sha256: if i == 0 { blob.sha256.to_vec() } else { Vec::new() },
        }
    })
}

/// A client speaks this coordinator's protocol if its version has the same major version (for
/// 0.x, the same minor version: semantic versioning's rule for breaking changes). Anything else
/// is refused at enrolment with both versions named, rather than failing later in a round.
fn check_client_version(client: &str) -> Result<(), Status> {
    let ours = env!("CARGO_PKG_VERSION");
    let series = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split(['.', '-', '+']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    };
    let compatible = |(a, b): (u64, u64), (c, d): (u64, u64)| a == c && (a > 0 || b == d);
    match series(client) {
        None => Err(Status::invalid_argument(format!(
            "client_version {client:?} is not a version (MAJOR.MINOR.PATCH)"
        ))),
        Some(theirs) if compatible(theirs, series(ours).expect("our version parses")) => Ok(()),
        Some(_) => Err(Status::failed_precondition(format!(
            "client version {client} cannot work with coordinator version {ours}; \
             upgrade the client to a compatible release"
        ))),
    }
}

#[tonic::async_trait]
impl Training for TrainingService {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let certified = caller_store(self.mtls, &request)?;
        let req = request.into_inner();
        // A store is its certificate: the request's name is only used without mTLS, and then
        // only if it is a plain short name (it is logged).
        let store = match certified {
            Some(name) => name,
            None => {
                crate::pki::check_name(&req.store_name)
                    .map_err(|e| Status::invalid_argument(format!("store_name: {e}")))?;
                req.store_name
            }
        };
        if req.task_name.len() > 128 {
            return Err(Status::invalid_argument("task_name is longer than 128 bytes"));
        }
        check_client_version(&req.client_version)?;
        let handle = self.tasks.by_name(&req.task_name).map_err(|r| to_status(&r))?;
        let client = handle.enroll(store).await.map_err(|r| to_status(&r))?;
        let spec = handle.spec();
        Ok(Response::new(pb::EnrollResponse {
            client_id: client.0,
            task_id: handle.task().0,
            model: Some((&spec.model).into()),
            poll_timeout_ms: self.poll_timeout.as_millis() as u64,
            spec: Some(spec.as_ref().into()),
        }))
    }

    async fn next_assignment(
        &self,
        request: Request<pb::NextAssignmentRequest>,
    ) -> Result<Response<pb::NextAssignmentResponse>, Status> {
        let handle =
            self.task_for(&request, request.get_ref().task_id, request.get_ref().client_id).await?;
        let req = request.into_inner();
        let assignment = handle
            .poll(ClientId(req.client_id), self.poll_timeout)
            .await
            .map_err(|r| to_status(&r))?;
        Ok(Response::new(assignment.into()))
    }

    type FetchModelStream = ChunkStream<pb::ModelChunk>;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let handle =
            self.task_for(&request, request.get_ref().task_id, request.get_ref().client_id).await?;
        let req = request.into_inner();
        let blob = handle
            .model(ClientId(req.client_id), ModelVersion(req.model_version))
            .await
            .map_err(|r| to_status(&r))?;
        Ok(Response::new(Box::pin(model_chunks(blob).map(Ok))))
    }

    async fn upload_update(
        &self,
        request: Request<Streaming<pb::UploadUpdateRequest>>,
    ) -> Result<Response<pb::UploadUpdateResponse>, Status> {
        use pb::upload_update_request::Part;
        let store = caller_store(self.mtls, &request)?;
        let mut stream = request.into_inner();
        let malformed = |m: String| to_status(&Reject::Malformed(m));
        let header = match stream.message().await? {
            Some(pb::UploadUpdateRequest { part: Some(Part::Header(h)) }) => h,
            _ => return Err(malformed("the first message must be an UploadHeader".into())),
        };
        let (client, round) = (ClientId(header.client_id), RoundId(header.round_id));
        let handle = self.task(header.task_id)?;
        // Under secure aggregation only masked integers are taken, and only masked integers
        // without it: a store's plaintext update never reaches a secure-aggregation round.
        let wanted = if handle.spec().plan.secure_aggregation.is_on() {
            pb::UpdateEncoding::MaskedU32Le
        } else {
            pb::UpdateEncoding::Float32Le
        };
        if header.encoding != wanted as i32 {
            return Err(malformed(format!(
                "encoding {} is not this task's ({})",
                header.encoding,
                wanted.as_str_name()
            )));
        }
        if let Some(store) = store {
            handle.check_owner(client, store).await.map_err(|r| to_status(&r))?;
        }
        let (n_params, deadline) =
            handle.begin_upload(client, round).await.map_err(|r| to_status(&r))?;
        // From here on a refusal happens in this service, not the round: tell the round, so its
        // count of rejected requests is complete.
        let received = tokio::time::timeout_at(
            deadline,
            self.receive(&mut stream, client, round, n_params, header.n_params, header.weight),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "the round's collect deadline passed before the upload ended",
            ))
        });
        let upload = match received {
            Ok(upload) => upload,
            Err(status) => {
                tracing::warn!(client_id = %client, round_id = %round, code = ?status.code(), reason = status.message(), "upload rejected");
                handle.rejected(round).await;
                return Err(status);
            }
        };
        if wanted == pb::UpdateEncoding::MaskedU32Le {
            // The reassembler reads 4-byte little-endian words; the bits are the integers.
            let values = upload.values.iter().map(|v| v.to_bits()).collect();
            let masked = MaskedUpload { client, round, values, summary: upload.summary };
            handle.masked_upload(masked).await.map_err(|r| to_status(&r))?;
        } else {
            handle.upload(upload).await.map_err(|r| to_status(&r))?;
        }
        Ok(Response::new(pb::UploadUpdateResponse {
            round_id: round.0,
            n_params_received: n_params as u64,
        }))
    }

    async fn report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let handle =
            self.task_for(&request, request.get_ref().task_id, request.get_ref().client_id).await?;
        let req = request.into_inner();
        let sums =
            req.sums.ok_or_else(|| to_status(&Reject::Malformed("sums is required".into())))?;
        let sums = sums.try_into().map_err(|e: fedretail_proto::convert::ConvertError| {
            to_status(&Reject::Malformed(e.to_string()))
        })?;
        handle
            .report(ClientId(req.client_id), RoundId(req.round_id), sums)
            .await
            .map_err(|r| to_status(&r))?;
        Ok(Response::new(pb::ReportMetricsResponse {}))
    }

    async fn advertise_keys(
        &self,
        request: Request<pb::AdvertiseKeysRequest>,
    ) -> Result<Response<pb::AdvertiseKeysResponse>, Status> {
        let handle =
            self.task_for(&request, request.get_ref().task_id, request.get_ref().client_id).await?;
        // Over mTLS the store's identity is the certificate it proved it holds in the handshake:
        // its neighbours verify the advert's signature with that certificate's key, so the
        // coordinator can forward keys but not substitute them.
        let certificate = if self.mtls {
            let certs = request
                .peer_certs()
                .ok_or_else(|| Status::unauthenticated("a store certificate is required"))?;
            certs.first().map(|c| c.as_ref().to_vec()).unwrap_or_default()
        } else {
            Vec::new()
        };
        let req = request.into_inner();
        let keys = pb::AdvertisedKeys {
            index: req.index,
            certificate,
            signing_public_key: req.signing_public_key,
            signature: req.signature,
            cipher_public_key: req.cipher_public_key,
            mask_public_key: req.mask_public_key,
        };
        let (advert, identity) = fedretail_proto::convert::secagg::advertised_from_pb(&keys)
            .map_err(|e| to_status(&Reject::Malformed(e.to_string())))?;
        handle
            .advertise(ClientId(req.client_id), RoundId(req.round_id), advert, identity)
            .await
            .map_err(|r| to_status(&r))?;
        Ok(Response::new(pb::AdvertiseKeysResponse {}))
    }

    async fn share_keys(
        &self,
        request: Request<pb::ShareKeysRequest>,
    ) -> Result<Response<pb::ShareKeysResponse>, Status> {
        let handle =
            self.task_for(&request, request.get_ref().task_id, request.get_ref().client_id).await?;
        let req = request.into_inner();
        let sealed = req
            .shares
            .iter()
            .map(TryInto::try_into)
            .collect::<Result<Vec<_>, fedretail_proto::convert::ConvertError>>()
            .map_err(|e| to_status(&Reject::Malformed(e.to_string())))?;
        handle
            .share(ClientId(req.client_id), RoundId(req.round_id), sealed)
            .await
            .map_err(|r| to_status(&r))?;
        Ok(Response::new(pb::ShareKeysResponse {}))
    }

    async fn unmask(
        &self,
        request: Request<pb::UnmaskRequest>,
    ) -> Result<Response<pb::UnmaskResponse>, Status> {
        use fedretail_core::secagg::protocol::SeedKind;
        use fedretail_proto::convert::secagg::revealed_from_pb;
        let handle =
            self.task_for(&request, request.get_ref().task_id, request.get_ref().client_id).await?;
        let req = request.into_inner();
        let revealed = req
            .self_mask_shares
            .iter()
            .map(|s| revealed_from_pb(s, SeedKind::SelfMask))
            .chain(req.pairwise_shares.iter().map(|s| revealed_from_pb(s, SeedKind::PairwiseKey)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| to_status(&Reject::Malformed(e.to_string())))?;
        handle
            .unmask(ClientId(req.client_id), RoundId(req.round_id), revealed)
            .await
            .map_err(|r| to_status(&r))?;
        Ok(Response::new(pb::UnmaskResponse {}))
    }
}
