//! A malicious store with a valid certificate sends hostile messages of every kind, generated
//! by proptest, over real gRPC with mTLS on 127.0.0.1, while two honest stores train. Every
//! message gets one of its expected codes, nothing panics, and the task completes its rounds
//! (issue 10, item 7). 100,000 messages with `RUN_SLOW_TESTS=1`, 3,000 without.

use crate::support::{bench_task, create_task_over, start_secured};
use fedretail_client::participant::{LocalData, Participant, ParticipantConfig};
use fedretail_client::transport::{GrpcTransport, StoreTls};
use fedretail_coordinator::config::Security;
use fedretail_coordinator::pki::{self, Role};
use fedretail_proto::pb;
use fedretail_proto::pb::training_client::TrainingClient;
use pb::upload_update_request::Part;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// One hostile request.
#[derive(Debug, Clone)]
enum Hostile {
    EnrollUnknownTask(String),
    EnrollHugeTaskName(usize),
    /// A version that is not one, or one of another series.
    EnrollBadVersion(String),
    PollUnknownClient(u64),
    PollStolenId,
    PollUnknownTask(u64),
    FetchStolen(u64),
    ReportNoSums,
    ReportNonFinite(f64),
    ReportStolen,
    UploadNoHeader(Vec<u8>),
    UploadEmptyStream,
    UploadBadEncoding(i32),
    UploadStaleRound(u64),
    UploadStolen,
    /// Against the current round: NaN values, wrong size, bad checksum, empty chunk, a huge
    /// weight, a NaN unclipped count, an unclipped norm.
    UploadBadPayload(u8, f64),
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        "[a-z]{1,20}".prop_map(Hostile::EnrollUnknownTask),
        (129usize..4096).prop_map(Hostile::EnrollHugeTaskName),
        prop_oneof!["[a-z]{0,8}", "(0\\.[2-9]|[1-9]\\.[0-9])\\.[0-9]"]
            .prop_map(Hostile::EnrollBadVersion),
        any::<u64>().prop_map(Hostile::PollUnknownClient),
        Just(Hostile::PollStolenId),
        (2u64..u64::MAX).prop_map(Hostile::PollUnknownTask),
        any::<u64>().prop_map(Hostile::FetchStolen),
        Just(Hostile::ReportNoSums),
        prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-1.0)]
            .prop_map(Hostile::ReportNonFinite),
        Just(Hostile::ReportStolen),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Hostile::UploadNoHeader),
        Just(Hostile::UploadEmptyStream),
        (2i32..100).prop_map(Hostile::UploadBadEncoding),
        prop_oneof![Just(0u64), 1_000_000u64..u64::MAX].prop_map(Hostile::UploadStaleRound),
        Just(Hostile::UploadStolen),
        (0u8..7, prop_oneof![Just(f64::NAN), Just(1e308), Just(-5.0)])
            .prop_map(|(k, v)| Hostile::UploadBadPayload(k, v)),
    ]
}

struct Attacker {
    t: TrainingClient<Channel>,
    own: pb::EnrollResponse,
    stolen: pb::EnrollResponse,
}

fn header(
    e: &pb::EnrollResponse,
    round_id: u64,
    encoding: i32,
    weight: f64,
) -> pb::UploadUpdateRequest {
    pb::UploadUpdateRequest {
        part: Some(Part::Header(pb::UploadHeader {
            client_id: e.client_id,
            task_id: e.task_id,
            round_id,
            n_params: 4,
            encoding,
            weight,
        })),
    }
}

fn chunk(offset: u64, values: &[f32]) -> pb::UploadUpdateRequest {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    pb::UploadUpdateRequest { part: Some(Part::Chunk(pb::UploadChunk { offset, data })) }
}

fn trailer(values: &[f32], unclipped: f64, good_sha: bool) -> pb::UploadUpdateRequest {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let sha = if good_sha {
        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().to_vec()
    } else {
        vec![7; 32]
    };
    let summary = pb::TrainSummary { unclipped, ..Default::default() };
    pb::UploadUpdateRequest {
        part: Some(Part::Trailer(pb::UploadTrailer { sha256: sha, summary: Some(summary) })),
    }
}

impl Attacker {
    /// Sends `h`; returns the code and the codes it may be answered with.
    async fn send(&mut self, h: &Hostile, round: u64) -> (Code, &'static [Code]) {
        use Code::*;
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Ok, |s| s.code());
        let own = self.own.clone();
        let poll = |client_id, task_id| pb::NextAssignmentRequest { client_id, task_id };
        let upload = |t: &mut TrainingClient<Channel>, msgs: Vec<pb::UploadUpdateRequest>| {
            let mut t = t.clone();
            async move { t.upload_update(tokio_stream::iter(msgs)).await.map(|_| ()) }
        };
        match h {
            Hostile::EnrollUnknownTask(name) => {
                let r = self
                    .t
                    .enroll(pb::EnrollRequest {
                        task_name: format!("no-{name}"),
                        client_version: VERSION.into(),
                        ..Default::default()
                    })
                    .await;
                (code(r.map(|_| ())), &[NotFound])
            }
            Hostile::EnrollHugeTaskName(n) => {
                let r = self
                    .t
                    .enroll(pb::EnrollRequest {
                        task_name: "x".repeat(*n),
                        client_version: VERSION.into(),
                        ..Default::default()
                    })
                    .await;
                (code(r.map(|_| ())), &[InvalidArgument])
            }
            Hostile::EnrollBadVersion(version) => {
                let r = self
                    .t
                    .enroll(pb::EnrollRequest {
                        task_name: "stress".into(),
                        client_version: version.clone(),
                        ..Default::default()
                    })
                    .await;
                (code(r.map(|_| ())), &[InvalidArgument, FailedPrecondition])
            }
            Hostile::PollUnknownClient(id) => {
                let id =
                    if *id == own.client_id || *id == self.stolen.client_id { id ^ 1 } else { *id };
                let r = self.t.next_assignment(poll(id, own.task_id)).await;
                (code(r.map(|_| ())), &[Unauthenticated])
            }
            Hostile::PollStolenId => {
                let r = self.t.next_assignment(poll(self.stolen.client_id, own.task_id)).await;
                (code(r.map(|_| ())), &[PermissionDenied])
            }
            Hostile::PollUnknownTask(task) => {
                let r = self.t.next_assignment(poll(own.client_id, *task)).await;
                (code(r.map(|_| ())), &[NotFound])
            }
            Hostile::FetchStolen(version) => {
                let req = pb::FetchModelRequest {
                    client_id: self.stolen.client_id,
                    task_id: own.task_id,
                    model_version: *version,
                };
                (code(self.t.fetch_model(req).await.map(|_| ())), &[PermissionDenied])
            }
            Hostile::ReportNoSums | Hostile::ReportNonFinite(_) | Hostile::ReportStolen => {
                let (client, sums) = match h {
                    Hostile::ReportNoSums => (own.client_id, None),
                    Hostile::ReportNonFinite(v) => (
                        own.client_id,
                        Some(pb::EvalSums {
                            squared_error: *v,
                            n_ratings: 1,
                            ..Default::default()
                        }),
                    ),
                    _ => (self.stolen.client_id, Some(pb::EvalSums::default())),
                };
                let req = pb::ReportMetricsRequest {
                    client_id: client,
                    task_id: own.task_id,
                    round_id: round,
                    sums,
                };
                let expected: &'static [Code] = if matches!(h, Hostile::ReportStolen) {
                    &[PermissionDenied]
                } else {
                    &[InvalidArgument]
                };
                (code(self.t.report_metrics(req).await.map(|_| ())), expected)
            }
            Hostile::UploadNoHeader(bytes) => {
                let msgs = vec![pb::UploadUpdateRequest {
                    part: Some(Part::Chunk(pb::UploadChunk { offset: 0, data: bytes.clone() })),
                }];
                (code(upload(&mut self.t, msgs).await), &[InvalidArgument])
            }
            Hostile::UploadEmptyStream => {
                (code(upload(&mut self.t, Vec::new()).await), &[InvalidArgument])
            }
            Hostile::UploadBadEncoding(encoding) => {
                let msgs = vec![header(&own, round, *encoding, 1.0)];
                (code(upload(&mut self.t, msgs).await), &[InvalidArgument])
            }
            Hostile::UploadStaleRound(r) => {
                let msgs = vec![
                    header(&own, *r, 1, 1.0),
                    chunk(0, &[0.0; 4]),
                    trailer(&[0.0; 4], 0.0, true),
                ];
                (code(upload(&mut self.t, msgs).await), &[FailedPrecondition])
            }
            Hostile::UploadStolen => {
                let msgs = vec![header(&self.stolen, round, 1, 1.0)];
                (code(upload(&mut self.t, msgs).await), &[PermissionDenied])
            }
            Hostile::UploadBadPayload(kind, v) => {
                let good = [0.1f32, 0.1, 0.1, 0.1];
                let nan = [f32::NAN, 0.0, 0.0, 0.0];
                let big = [10.0f32, 0.0, 0.0, 0.0];
                let msgs = match kind {
                    0 => {
                        vec![header(&own, round, 1, 1.0), chunk(0, &nan), trailer(&nan, 0.0, true)]
                    }
                    1 => vec![
                        header(&own, round, 1, 1.0),
                        chunk(0, &good[..3]),
                        trailer(&good[..3], 0.0, true),
                    ],
                    2 => vec![
                        header(&own, round, 1, 1.0),
                        chunk(0, &good),
                        trailer(&good, 0.0, false),
                    ],
                    3 => vec![
                        header(&own, round, 1, 1.0),
                        chunk(0, &[]),
                        chunk(0, &good),
                        trailer(&good, 0.0, true),
                    ],
                    4 => {
                        vec![header(&own, round, 1, *v), chunk(0, &good), trailer(&good, 0.0, true)]
                    }
                    5 => {
                        vec![header(&own, round, 1, 1.0), chunk(0, &good), trailer(&good, *v, true)]
                    }
                    _ => {
                        vec![header(&own, round, 1, 1.0), chunk(0, &big), trailer(&big, 0.0, true)]
                    }
                };
                // Depending on where the round is: refused for the payload, or before it for the
                // phase, the cohort or a duplicate. Never accepted.
                let r = code(upload(&mut self.t, msgs).await);
                (r, &[InvalidArgument, FailedPrecondition, PermissionDenied, AlreadyExists])
            }
        }
    }
}

async fn store_channel(url: &str, pki: &pki::PkiDir, store: &str) -> Channel {
    let (cert, key) = pki.store(store);
    crate::support::channel(url, &pki.ca_cert(), Some((&cert, &key))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_of_every_kind_are_answered_precisely_and_the_task_completes() {
    let n_messages: usize =
        if std::env::var_os("RUN_SLOW_TESTS").is_some() { 100_000 } else { 3_000 };
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::ephemeral(
        dir.path(),
        &["a", "b", "mallory", "accomplice"],
        &[("ops", Role::Operator)],
    )
    .unwrap();
    let c = start_secured(
        None,
        Security::Mtls(fedretail_coordinator::tls::TlsFiles {
            ca: pki.ca_cert(),
            cert: pki.coordinator_cert(),
            key: pki.coordinator_key(),
            revoked: None,
        }),
    )
    .await;
    let (oc, ok) = pki.admin("ops");
    let admin_tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca_cert()).unwrap()))
        .identity(Identity::from_pem(std::fs::read(oc).unwrap(), std::fs::read(ok).unwrap()));
    let admin = pb::admin_client::AdminClient::new(
        Endpoint::from_shared(c.admin_url.clone())
            .unwrap()
            .tls_config(admin_tls)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let rounds = 10;
    // Three may be sampled, the attacker among them; the two honest stores are the quorum.
    let mut spec = bench_task("stress", 4, rounds, 3);
    spec.plan.min_clients = 2;
    spec.plan.select_timeout_secs = 0.5;
    spec.plan.configure_timeout_secs = 2.0;
    spec.plan.collect_timeout_secs = 2.0;
    let task_id = create_task_over(&admin, &spec).await.unwrap();

    // Two honest stores train throughout.
    let mut honest = tokio::task::JoinSet::new();
    for store in ["a", "b"] {
        let (cert, key) = pki.store(store);
        let tls = StoreTls::read(&pki.ca_cert(), &cert, &key).unwrap();
        let transport = GrpcTransport::with_tls(&c.url, &tls).unwrap();
        let config = ParticipantConfig {
            task: "stress".into(),
            store_name: store.into(),
            state_dir: None,
            max_backoff: Duration::from_millis(200),
            seeded_privacy: false,
            dropout: 0.0,
            policy: fedretail_client::policy::StorePolicy::permissive(),
        };
        honest.spawn(async move {
            Participant::new(transport, config, LocalData::None)
                .run(tokio_util::sync::CancellationToken::new())
                .await
        });
    }

    // The attackers: certified stores that do not train. The accomplice's id is "stolen".
    let enroll = |store: &'static str| {
        let pki = pki.clone();
        let url = c.url.clone();
        async move {
            let mut t = TrainingClient::new(store_channel(&url, &pki, store).await);
            let e = t
                .enroll(pb::EnrollRequest {
                    task_name: "stress".into(),
                    client_version: VERSION.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            (t, e)
        }
    };
    let (_, stolen) = enroll("accomplice").await;
    let (t, own) = enroll("mallory").await;
    let mut attacker = Attacker { t, own, stolen };
    let mut runner = TestRunner::deterministic();
    let strategy = hostile();
    let mut answered = std::collections::BTreeMap::<String, usize>::new();
    let mut round = 1;
    let started = tokio::time::Instant::now();
    for i in 0..n_messages {
        if i % 500 == 0 {
            // Learn the current round the way a store does (a Train assignment names it).
            let poll = pb::NextAssignmentRequest { client_id: attacker.own.client_id, task_id };
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(50), attacker.t.next_assignment(poll))
                    .await
                && let Some(pb::next_assignment_response::Assignment::Train(t)) =
                    r.into_inner().assignment
            {
                round = t.round_id;
            }
        }
        let h = strategy.new_tree(&mut runner).unwrap().current();
        let (got, expected) = attacker.send(&h, round).await;
        assert!(
            expected.contains(&got),
            "message {i}: {h:?} got {got:?}, expected one of {expected:?}"
        );
        let kind = format!("{h:?}").split(['(', ' ']).next().unwrap().to_string();
        *answered.entry(kind).or_default() += 1;
    }
    assert_eq!(answered.len(), 16, "every kind was sent: {answered:?}");
    let attack = started.elapsed();

    // The honest stores finish the task despite all of it.
    let finished = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(done) = honest.join_next().await {
            assert_eq!(done.unwrap().unwrap().state, "finished");
        }
    })
    .await;
    assert!(finished.is_ok(), "the honest stores did not finish");
    let mut admin = admin.clone();
    let status =
        admin.get_task(pb::GetTaskRequest { task_id, max_rounds: 1 }).await.unwrap().into_inner();
    assert_eq!((status.state, status.committed_rounds), (pb::TaskState::Finished as i32, rounds));
    tracing::info!(?attack, n_messages, failed_rounds = status.failed_rounds, "stress test done");
    c.stop().await;
}
