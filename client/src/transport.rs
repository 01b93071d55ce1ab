//! How the client talks to a coordinator: the [`Transport`] trait over domain types, and
//! [`GrpcTransport`], the only place in the client where `pb` types appear.

use fedretail_core::model::metrics::EvalSums;
use fedretail_core::plan::ModelSpec;
use fedretail_core::privacy::{Contribution, TrainPrivacy};
use fedretail_core::secagg::protocol::{Advertised, Identity, Revealed, Sealed, SeedKind};
use fedretail_core::secagg::round::RoundParams;
use fedretail_core::update::{CHUNK_PARAMS, Reassembler, encode_f32s};
use fedretail_proto::pb;
use fedretail_proto::pb::training_client::TrainingClient;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

/// What enrolment returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrollment {
    /// This client's id.
    pub client_id: u64,
    /// The task's id.
    pub task_id: u64,
    /// The task's model.
    pub model: ModelSpec,
    /// How long the coordinator holds a poll open.
    pub poll_timeout: Duration,
    /// The whole task as the coordinator states it (plan, privacy with its noise multiplier),
    /// checked against the store's policy; `None` from a coordinator that does not send it.
    pub spec: Option<fedretail_core::plan::TaskSpec>,
}

/// A training assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    /// The round.
    pub round_id: u64,
    /// Model version to start from.
    pub model_version: u64,
    /// Parameter count.
    pub n_params: usize,
    /// Local epochs.
    pub local_epochs: u32,
    /// Clip to this L2 norm.
    pub clip_norm: f32,
    /// Seed for this round.
    pub round_seed: u64,
    /// Time left to upload.
    pub upload_timeout: Duration,
    /// What differential privacy asks of this client; `None` without privacy.
    pub privacy: Option<TrainPrivacy>,
    /// Under secure aggregation: how to mask the update.
    pub masked: Option<MaskedPlan>,
}

/// Secure aggregation, step 3: the round's parameters and the shares to mask with.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedPlan {
    /// The round's public parameters.
    pub params: RoundParams,
    /// This client's index.
    pub index: u32,
    /// The shares its neighbours sealed for it.
    pub shares: Vec<Sealed>,
}

/// Secure aggregation, step 1.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvertisePlan {
    /// The round.
    pub round_id: u64,
    /// Its public parameters.
    pub params: RoundParams,
    /// Client ids in index order.
    pub cohort: Vec<u64>,
    /// This client's index.
    pub index: u32,
}

/// An evaluation assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPlan {
    /// The round.
    pub round_id: u64,
    /// Model version to evaluate.
    pub model_version: u64,
    /// Parameter count.
    pub n_params: usize,
    /// Seed for ranking negatives.
    pub seed: u64,
    /// Under privacy: how to bound and noise the sums, and whether customers are the units.
    pub privacy: Option<(fedretail_core::privacy::evaluation::EvalPrivacy, bool)>,
}

/// What the coordinator asks of this client.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    /// Nothing now.
    Wait,
    /// Train and upload.
    Train(TrainPlan),
    /// Evaluate and report.
    Evaluate(EvalPlan),
    /// The task has ended.
    Finished {
        /// Final state (`finished`, `failed`, ...).
        state: String,
        /// Why.
        reason: String,
    },
    /// Secure aggregation, step 1: make and sign the round's keys.
    Advertise(AdvertisePlan),
    /// Secure aggregation, step 2: the neighbours' keys (with the identity keys they are
    /// signed with) to share seeds with.
    ShareKeys {
        /// The round.
        round_id: u64,
        /// The neighbours' adverts.
        adverts: Vec<(Advertised, Identity)>,
    },
    /// Secure aggregation, step 4: reveal shares.
    Unmask {
        /// The round.
        round_id: u64,
        /// Indices that uploaded.
        survivors: Vec<u32>,
        /// Indices that shared keys but did not upload.
        dropped: Vec<u32>,
    },
}

/// What accompanies an update: facts about local training, all aggregate. Under privacy the
/// participant zeroes the example count and loss (they depend on the data and are not noised).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateSummary {
    /// FedAvg weight (local example count).
    pub n_examples: usize,
    /// Mean local training loss.
    pub train_loss: f64,
}

/// A transport call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TransportError {
    /// The coordinator cannot be reached or is shutting down: retry with backoff.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The coordinator does not know this client (it restarted): enrol again.
    #[error("the coordinator does not know this client: {0}")]
    UnknownClient(String),
    /// No such task (yet): retry with backoff.
    #[error("task not found: {0}")]
    TaskNotFound(String),
    /// The coordinator refused this request; the round goes on without it.
    #[error("rejected ({code}): {message}")]
    Rejected {
        /// The gRPC code's name.
        code: String,
        /// The coordinator's message.
        message: String,
    },
    /// The coordinator sent something this client cannot use.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The store's own policy refuses what the coordinator asked; nothing was sent for it.
    #[error("refused by the store's policy: {0}")]
    Refused(crate::policy::Refusal),
}

impl From<tonic::Status> for TransportError {
    fn from(s: tonic::Status) -> TransportError {
        use tonic::Code;
        let message = s.message().to_string();
        match s.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
                TransportError::Unavailable(format!("{}: {message}", s.code()))
            }
            Code::Unauthenticated => TransportError::UnknownClient(message),
            Code::NotFound if message.starts_with("no task") => {
                TransportError::TaskNotFound(message)
            }
            code => TransportError::Rejected { code: format!("{code:?}"), message },
        }
    }
}

/// The client's side of the wire, in domain types, so the same participant code runs over gRPC
/// and in the simulator.
pub trait Transport: Send {
    /// Who is at the other end, for log lines.
    fn peer(&self) -> String;
    /// The store's TLS material, when it talks mTLS: its key signs its secure-aggregation
    /// keys, and the CA checks its neighbours' certificates.
    fn tls(&self) -> Option<&StoreTls> {
        None
    }
    /// Enrols with a task.
    fn enroll(
        &mut self,
        task: &str,
        store: &str,
    ) -> impl Future<Output = Result<Enrollment, TransportError>> + Send;
    /// Waits for the next assignment (a long poll).
    fn next_assignment(
        &mut self,
        enrollment: &Enrollment,
    ) -> impl Future<Output = Result<Assignment, TransportError>> + Send;
    /// Downloads one model version.
    fn fetch_model(
        &mut self,
        enrollment: &Enrollment,
        version: u64,
        n_params: usize,
    ) -> impl Future<Output = Result<Vec<f32>, TransportError>> + Send;
    /// Uploads an update. Only a [`Contribution`] (clipped, per update or per customer, and
    /// noised where the task says so) can be sent.
    fn upload(
        &mut self,
        enrollment: &Enrollment,
        round_id: u64,
        update: Contribution,
        summary: UpdateSummary,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Reports evaluation sums.
    fn report(
        &mut self,
        enrollment: &Enrollment,
        round_id: u64,
        sums: EvalSums,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Secure aggregation, step 1: this client's signed keys (and, in insecure mode only, the
    /// bare key they verify with; over mTLS the store's certificate is its identity).
    fn advertise_keys(
        &mut self,
        enrollment: &Enrollment,
        round_id: u64,
        advert: Advertised,
        bare_key: Option<[u8; 32]>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Secure aggregation, step 2: the sealed shares for the neighbours.
    fn share_keys(
        &mut self,
        enrollment: &Enrollment,
        round_id: u64,
        sealed: Vec<Sealed>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Secure aggregation, step 3: a masked upload (integers mod 2^b; nothing else can be
    /// sent in such a round).
    fn upload_masked(
        &mut self,
        enrollment: &Enrollment,
        round_id: u64,
        values: Vec<u32>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Secure aggregation, step 4: the revealed shares.
    fn unmask(
        &mut self,
        enrollment: &Enrollment,
        round_id: u64,
        revealed: Vec<Revealed>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
}

fn protocol(e: fedretail_proto::convert::ConvertError) -> TransportError {
    TransportError::Protocol(e.to_string())
}

/// A store's TLS material: the deployment CA it pins (the only issuer it trusts for the
/// coordinator's certificate) and its own certificate and key (its identity).
#[derive(Debug, Clone)]
pub struct StoreTls {
    /// The CA certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// The store's certificate (PEM).
    pub cert_pem: Vec<u8>,
    /// The store's private key (PEM).
    pub key_pem: Vec<u8>,
}

impl StoreTls {
    /// Reads the three PEM files.
    ///
    /// # Errors
    ///
    /// A file that cannot be read, named in the message.
    pub fn read(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<StoreTls, TransportError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| TransportError::Protocol(format!("{}: {e}", p.display())))
        };
        Ok(StoreTls { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: read(key)? })
    }
}

/// [`Transport`] over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcTransport {
    url: String,
    client: TrainingClient<Channel>,
    /// Every call's deadline beyond the poll timeout.
    call_timeout: Duration,
    tls: Option<StoreTls>,
}

impl GrpcTransport {
    /// A transport to `url` (for example `http://127.0.0.1:50051`). Connects lazily, so an
    /// unreachable coordinator shows up as [`TransportError::Unavailable`] on the first call.
    /// Call it inside a tokio runtime: the channel spawns its connection task.
    ///
    /// # Errors
    ///
    /// An invalid URL.
    pub fn new(url: &str) -> Result<GrpcTransport, TransportError> {
        GrpcTransport::connect(url, None)
    }

    /// A transport over mTLS: the coordinator must present a certificate from `tls.ca_pem`
    /// (pinned: no other root is trusted), and this store presents its own.
    ///
    /// # Errors
    ///
    /// An invalid URL or unusable certificates.
    pub fn with_tls(url: &str, tls: &StoreTls) -> Result<GrpcTransport, TransportError> {
        GrpcTransport::connect(url, Some(tls))
    }

    fn connect(url: &str, tls: Option<&StoreTls>) -> Result<GrpcTransport, TransportError> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| TransportError::Protocol(format!("invalid coordinator URL {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        if let Some(tls) = tls {
            use tonic::transport::{Certificate, ClientTlsConfig, Identity};
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| TransportError::Protocol(format!("TLS configuration: {e}")))?;
        }
        let client = TrainingClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20);
        Ok(GrpcTransport {
            url: url.to_string(),
            client,
            call_timeout: Duration::from_secs(120),
            tls: tls.cloned(),
        })
    }

    fn request<T>(&self, message: T, extra: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.set_timeout(self.call_timeout + extra);
        r
    }
}

impl Transport for GrpcTransport {
    fn peer(&self) -> String {
        self.url.clone()
    }

    fn tls(&self) -> Option<&StoreTls> {
        self.tls.as_ref()
    }

    async fn enroll(&mut self, task: &str, store: &str) -> Result<Enrollment, TransportError> {
        let req = pb::EnrollRequest {
            task_name: task.into(),
            store_name: store.into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
        };
        let r = self.client.enroll(self.request(req, Duration::ZERO)).await?.into_inner();
        let model = r
            .model
            .ok_or_else(|| TransportError::Protocol("enrolment without a model spec".into()))?;
        Ok(Enrollment {
            client_id: r.client_id,
            task_id: r.task_id,
            model: model.try_into().map_err(|e: fedretail_proto::convert::ConvertError| {
                TransportError::Protocol(e.to_string())
            })?,
            poll_timeout: Duration::from_millis(r.poll_timeout_ms),
            spec: match r.spec {
                Some(spec) => {
                    Some(spec.try_into().map_err(|e: fedretail_proto::convert::ConvertError| {
                        TransportError::Protocol(format!("the task's spec: {e}"))
                    })?)
                }
                None => None,
            },
        })
    }

    async fn next_assignment(&mut self, e: &Enrollment) -> Result<Assignment, TransportError> {
        use pb::next_assignment_response::Assignment as A;
        let req = pb::NextAssignmentRequest { client_id: e.client_id, task_id: e.task_id };
        let r =
            self.client.next_assignment(self.request(req, e.poll_timeout * 2)).await?.into_inner();
        Ok(match r.assignment {
            None | Some(A::Wait(_)) => Assignment::Wait,
            Some(A::Train(t)) => {
                let wanted = if t.masked.is_some() {
                    pb::UpdateEncoding::MaskedU32Le
                } else {
                    pb::UpdateEncoding::Float32Le
                };
                if t.encoding != wanted as i32 {
                    return Err(TransportError::Protocol(format!(
                        "unsupported update encoding {}",
                        t.encoding
                    )));
                }
                let masked = match t.masked {
                    None => None,
                    Some(m) => Some(MaskedPlan {
                        params: m
                            .params
                            .ok_or_else(|| {
                                TransportError::Protocol("masked without params".into())
                            })?
                            .try_into()
                            .map_err(protocol)?,
                        index: m.index,
                        shares: m
                            .shares
                            .iter()
                            .map(TryInto::try_into)
                            .collect::<Result<_, _>>()
                            .map_err(protocol)?,
                    }),
                };
                Assignment::Train(TrainPlan {
                    round_id: t.round_id,
                    model_version: t.model_version,
                    n_params: t.n_params as usize,
                    local_epochs: t.local_epochs,
                    clip_norm: t.clip_norm,
                    round_seed: t.round_seed,
                    upload_timeout: Duration::from_millis(t.upload_timeout_ms),
                    privacy: t.privacy.map(Into::into),
                    masked,
                })
            }
            Some(A::AdvertiseKeys(a)) => Assignment::Advertise(AdvertisePlan {
                round_id: a.round_id,
                params: a
                    .params
                    .ok_or_else(|| TransportError::Protocol("keys without params".into()))?
                    .try_into()
                    .map_err(protocol)?,
                cohort: a.cohort,
                index: a.index,
            }),
            Some(A::ShareKeys(s)) => Assignment::ShareKeys {
                round_id: s.round_id,
                adverts: s
                    .neighbours
                    .iter()
                    .map(fedretail_proto::convert::secagg::advertised_from_pb)
                    .collect::<Result<_, _>>()
                    .map_err(protocol)?,
            },
            Some(A::Unmask(u)) => {
                let indices = |v: Vec<u64>| {
                    v.into_iter()
                        .map(|i| {
                            u32::try_from(i).map_err(|_| TransportError::Protocol("index".into()))
                        })
                        .collect::<Result<Vec<u32>, _>>()
                };
                Assignment::Unmask {
                    round_id: u.round_id,
                    survivors: indices(u.survivors)?,
                    dropped: indices(u.dropped)?,
                }
            }
            Some(A::Evaluate(v)) => Assignment::Evaluate(EvalPlan {
                round_id: v.round_id,
                model_version: v.model_version,
                n_params: v.n_params as usize,
                seed: v.round_seed,
                privacy: match v.privacy {
                    Some(p) => Some(p.try_into().map_err(
                        |e: fedretail_proto::convert::ConvertError| {
                            TransportError::Protocol(e.to_string())
                        },
                    )?),
                    None => None,
                },
            }),
            Some(A::Finished(f)) => Assignment::Finished {
                state: pb::TaskState::try_from(f.state).map_or("unknown".into(), |s| {
                    s.as_str_name().trim_start_matches("TASK_STATE_").to_lowercase()
                }),
                reason: f.reason,
            },
        })
    }

    async fn fetch_model(
        &mut self,
        e: &Enrollment,
        version: u64,
        n_params: usize,
    ) -> Result<Vec<f32>, TransportError> {
        let req = pb::FetchModelRequest {
            client_id: e.client_id,
            task_id: e.task_id,
            model_version: version,
        };
        let mut stream =
            self.client.fetch_model(self.request(req, Duration::ZERO)).await?.into_inner();
        let mut reassembler = Reassembler::new(n_params);
        let mut sha = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if chunk.n_params as usize != n_params || chunk.model_version != version {
                return Err(TransportError::Protocol(format!(
                    "model chunk for version {} with {} parameters, expected version {version} with {n_params}",
                    chunk.model_version, chunk.n_params
                )));
            }
            if !chunk.sha256.is_empty() {
                sha = chunk.sha256;
            }
            reassembler
                .push(chunk.offset as usize, &chunk.data)
                .map_err(|e| TransportError::Protocol(e.to_string()))?;
        }
        reassembler
            .finish(Some(&sha))
            .map_err(|e| TransportError::Protocol(format!("model download: {e}")))
    }

    async fn upload(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        update: Contribution,
        summary: UpdateSummary,
    ) -> Result<(), TransportError> {
        let norm_before_clip = if update.is_private() { 0.0 } else { update.norm_before_clip() };
        let unclipped = update.unclipped();
        let summary = pb::TrainSummary {
            n_examples: summary.n_examples as u64,
            train_loss: summary.train_loss,
            norm_before_clip,
            unclipped,
        };
        let values = update.into_values();
        self.stream_upload(e, round_id, values, pb::UpdateEncoding::Float32Le, summary).await
    }

    async fn upload_masked(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        values: Vec<u32>,
    ) -> Result<(), TransportError> {
        // The same 4-byte little-endian words: the bits are the integers.
        let words = values.into_iter().map(f32::from_bits).collect();
        let summary = pb::TrainSummary::default();
        self.stream_upload(e, round_id, words, pb::UpdateEncoding::MaskedU32Le, summary).await
    }

    async fn advertise_keys(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        advert: Advertised,
        bare_key: Option<[u8; 32]>,
    ) -> Result<(), TransportError> {
        let req = pb::AdvertiseKeysRequest {
            client_id: e.client_id,
            task_id: e.task_id,
            round_id,
            signing_public_key: bare_key.map(|k| k.to_vec()).unwrap_or_default(),
            signature: advert.signature.to_vec(),
            index: advert.index,
            cipher_public_key: advert.cipher_key.to_vec(),
            mask_public_key: advert.mask_key.to_vec(),
        };
        self.client.advertise_keys(self.request(req, Duration::ZERO)).await?;
        Ok(())
    }

    async fn share_keys(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        sealed: Vec<Sealed>,
    ) -> Result<(), TransportError> {
        let req = pb::ShareKeysRequest {
            client_id: e.client_id,
            task_id: e.task_id,
            round_id,
            shares: sealed.iter().map(Into::into).collect(),
        };
        self.client.share_keys(self.request(req, Duration::ZERO)).await?;
        Ok(())
    }

    async fn unmask(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        revealed: Vec<Revealed>,
    ) -> Result<(), TransportError> {
        let of = |kind| revealed.iter().filter(|r| r.kind == kind).map(Into::into).collect();
        let req = pb::UnmaskRequest {
            client_id: e.client_id,
            task_id: e.task_id,
            round_id,
            self_mask_shares: of(SeedKind::SelfMask),
            pairwise_shares: of(SeedKind::PairwiseKey),
        };
        self.client.unmask(self.request(req, Duration::ZERO)).await?;
        Ok(())
    }

    async fn report(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        sums: EvalSums,
    ) -> Result<(), TransportError> {
        let req = pb::ReportMetricsRequest {
            client_id: e.client_id,
            task_id: e.task_id,
            round_id,
            sums: Some((&sums).into()),
        };
        self.client.report_metrics(self.request(req, Duration::ZERO)).await?;
        Ok(())
    }
}

impl GrpcTransport {
    /// Streams an upload: header, chunks of [`CHUNK_PARAMS`] 4-byte words, trailer.
    async fn stream_upload(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        values: Vec<f32>,
        encoding: pb::UpdateEncoding,
        summary: pb::TrainSummary,
    ) -> Result<(), TransportError> {
        use pb::upload_update_request::Part;
        let values = Arc::new(values);
        let sha256 = fedretail_core::update::sha256_f32s(&values).to_vec();
        let header = pb::UploadHeader {
            client_id: e.client_id,
            task_id: e.task_id,
            round_id,
            n_params: values.len() as u64,
            encoding: encoding.into(),
            weight: summary.n_examples as f64,
        };
        let trailer = pb::UploadTrailer { sha256, summary: Some(summary) };
        let n_chunks = values.len().div_ceil(CHUNK_PARAMS);
        let chunks = tokio_stream::iter(0..n_chunks).map(move |i| {
            let start = i * CHUNK_PARAMS;
            let end = (start + CHUNK_PARAMS).min(values.len());
            let mut data = Vec::with_capacity((end - start) * 4);
            encode_f32s(&values[start..end], &mut data);
            pb::UploadUpdateRequest {
                part: Some(Part::Chunk(pb::UploadChunk { offset: start as u64, data })),
            }
        });
        let stream =
            tokio_stream::iter([pb::UploadUpdateRequest { part: Some(Part::Header(header)) }])
                .chain(chunks)
                .chain(tokio_stream::iter([pb::UploadUpdateRequest {
                    part: Some(Part::Trailer(trailer)),
                }]));
        self.client.upload_update(self.request(stream, Duration::ZERO)).await?;
        Ok(())
    }
}
