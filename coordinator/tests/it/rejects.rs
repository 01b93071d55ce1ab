//! Every kind of bad request gets its precise gRPC status, and the round goes on.

use crate::support::{bench_task, create_task, start_coordinator, task_status};
use fedretail_proto::pb;
use fedretail_proto::pb::training_client::TrainingClient;
use pb::upload_update_request::Part;
use tonic::Code;
use tonic::transport::Channel;

pub(crate) async fn enroll(
    t: &mut TrainingClient<Channel>,
    task: &str,
    store: &str,
) -> pb::EnrollResponse {
    let req = pb::EnrollRequest {
        task_name: task.into(),
        store_name: store.into(),
        client_version: env!("CARGO_PKG_VERSION").into(),
    };
    t.enroll(req).await.unwrap().into_inner()
}

pub(crate) async fn poll(
    t: &mut TrainingClient<Channel>,
    e: &pb::EnrollResponse,
) -> Result<pb::NextAssignmentResponse, tonic::Status> {
    t.next_assignment(pb::NextAssignmentRequest { client_id: e.client_id, task_id: e.task_id })
        .await
        .map(|r| r.into_inner())
}

fn bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// An upload as a client would stream it; `n_params` and `sha` can lie.
pub(crate) async fn upload(
    t: &mut TrainingClient<Channel>,
    e: &pb::EnrollResponse,
    round_id: u64,
    n_params: u64,
    values: &[f32],
    sha: Option<Vec<u8>>,
) -> Result<(), Code> {
    let data = bytes(values);
    let sha =
        sha.unwrap_or_else(|| ring::digest::digest(&ring::digest::SHA256, &data).as_ref().to_vec());
    let header = pb::UploadHeader {
        client_id: e.client_id,
        task_id: e.task_id,
        round_id,
        n_params,
        encoding: pb::UpdateEncoding::Float32Le.into(),
        weight: 1.0,
    };
    let messages = vec![
        pb::UploadUpdateRequest { part: Some(Part::Header(header)) },
        pb::UploadUpdateRequest { part: Some(Part::Chunk(pb::UploadChunk { offset: 0, data })) },
        pb::UploadUpdateRequest {
            part: Some(Part::Trailer(pb::UploadTrailer { sha256: sha, summary: None })),
        },
    ];
    t.upload_update(tokio_stream::iter(messages)).await.map(|_| ()).map_err(|s| s.code())
}

pub(crate) fn train_round(a: &pb::NextAssignmentResponse) -> u64 {
    match &a.assignment {
        Some(pb::next_assignment_response::Assignment::Train(t)) => t.round_id,
        other => panic!("expected a training assignment, got {other:?}"),
    }
}

#[tokio::test]
async fn each_reject_has_its_status_code_and_the_round_goes_on() {
    let c = start_coordinator().await;
    let task_id = create_task(&c.admin_url, &bench_task("rejects", 4, 1, 2)).await.unwrap();
    let mut t = TrainingClient::connect(c.url.clone()).await.unwrap();
    let a = enroll(&mut t, "rejects", "a").await;
    let b = enroll(&mut t, "rejects", "b").await;
    let round = train_round(&poll(&mut t, &a).await.unwrap());
    assert_eq!(train_round(&poll(&mut t, &b).await.unwrap()), round);
    let late = enroll(&mut t, "rejects", "late").await;

    let good = [0.1f32, 0.2, 0.3, 0.4];
    let stranger = pb::EnrollResponse { client_id: 42, ..a.clone() };
    assert_eq!(poll(&mut t, &stranger).await.unwrap_err().code(), Code::Unauthenticated);
    let lost = pb::EnrollResponse { task_id: 999, ..a.clone() };
    assert_eq!(poll(&mut t, &lost).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        upload(&mut t, &a, round, 3, &good[..3], None).await,
        Err(Code::InvalidArgument),
        "wrong shape"
    );
    assert_eq!(
        upload(&mut t, &a, round, 4, &[f32::NAN, 0.0, 0.0, 0.0], None).await,
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        upload(&mut t, &a, round, 4, &[1.0, 1.0, 0.0, 0.0], None).await,
        Err(Code::InvalidArgument),
        "unclipped"
    );
    assert_eq!(
        upload(&mut t, &a, round, 4, &good, Some(vec![0; 32])).await,
        Err(Code::InvalidArgument),
        "checksum"
    );
    assert_eq!(
        upload(&mut t, &a, round + 100, 4, &good, None).await,
        Err(Code::FailedPrecondition),
        "stale"
    );
    assert_eq!(
        upload(&mut t, &late, round, 4, &good, None).await,
        Err(Code::PermissionDenied),
        "not in cohort"
    );
    let no_header = t
        .upload_update(tokio_stream::iter(vec![pb::UploadUpdateRequest {
            part: Some(Part::Chunk(pb::UploadChunk { offset: 0, data: bytes(&good) })),
        }]))
        .await;
    assert_eq!(no_header.unwrap_err().code(), Code::InvalidArgument);
    let no_sums = t.report_metrics(pb::ReportMetricsRequest {
        client_id: a.client_id,
        task_id,
        round_id: round,
        sums: None,
    });
    assert_eq!(no_sums.await.unwrap_err().code(), Code::InvalidArgument);

    assert_eq!(upload(&mut t, &a, round, 4, &good, None).await, Ok(()));
    assert_eq!(
        upload(&mut t, &a, round, 4, &good, None).await,
        Err(Code::AlreadyExists),
        "duplicate"
    );
    assert_eq!(upload(&mut t, &b, round, 4, &good, None).await, Ok(()), "the round went on");

    let status = task_status(&c.admin_url, task_id).await;
    let current = status.rounds.iter().find(|r| r.round_id == round).unwrap();
    assert_eq!(current.n_uploads, 2);
    assert_eq!(current.n_rejected, 7);
    assert_ne!(current.phase, "Failed");
}

#[tokio::test]
async fn admin_rejects_invalid_and_duplicate_tasks_and_health_is_serving() {
    let c = start_coordinator().await;
    let mut bad = bench_task("bad", 4, 1, 2);
    bad.plan.min_clients = 3;
    let err = create_task(&c.admin_url, &bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("plan.cohort_size"), "{}", err.message());
    create_task(&c.admin_url, &bench_task("dup", 4, 1, 2)).await.unwrap();
    assert_eq!(
        create_task(&c.admin_url, &bench_task("dup", 4, 1, 2)).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let mut t = TrainingClient::connect(c.url.clone()).await.unwrap();
    let req = pb::EnrollRequest {
        task_name: "nope".into(),
        store_name: "s".into(),
        client_version: env!("CARGO_PKG_VERSION").into(),
    };
    assert_eq!(t.enroll(req).await.unwrap_err().code(), Code::NotFound);

    let channel = Channel::from_shared(c.url.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let served = health
        .check(tonic_health::pb::HealthCheckRequest { service: "fedretail.v1.Training".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        served.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// Streams header, chunks and trailer as given.
async fn send_parts(
    t: &mut TrainingClient<Channel>,
    e: &pb::EnrollResponse,
    round_id: u64,
    weight: f64,
    chunks: Vec<Vec<u8>>,
    unclipped: f64,
) -> Result<(), tonic::Status> {
    let all: Vec<u8> = chunks.concat();
    let sha = ring::digest::digest(&ring::digest::SHA256, &all).as_ref().to_vec();
    let header = pb::UploadHeader {
        client_id: e.client_id,
        task_id: e.task_id,
        round_id,
        n_params: 4,
        encoding: pb::UpdateEncoding::Float32Le.into(),
        weight,
    };
    let mut messages = vec![pb::UploadUpdateRequest { part: Some(Part::Header(header)) }];
    let mut offset = 0;
    for data in chunks {
        let n = data.len() / 4;
        messages.push(pb::UploadUpdateRequest {
            part: Some(Part::Chunk(pb::UploadChunk { offset, data })),
        });
        offset += n as u64;
    }
    let summary = pb::TrainSummary { unclipped, ..pb::TrainSummary::default() };
    messages.push(pb::UploadUpdateRequest {
        part: Some(Part::Trailer(pb::UploadTrailer { sha256: sha, summary: Some(summary) })),
    });
    t.upload_update(tokio_stream::iter(messages)).await.map(|_| ())
}

/// Issue 10: what a malicious store can send gets a precise status, and the round goes on
/// (H7: a NaN unclipped count; H8: a huge averaging weight; M1: empty chunks and a stalled
/// stream; L4: a store name that forges log lines).
#[tokio::test]
async fn hostile_uploads_are_refused_and_the_round_goes_on() {
    let c = start_coordinator().await;
    let mut spec = bench_task("hostile", 4, 1, 2);
    spec.plan.collect_timeout_secs = 2.0;
    let task_id = create_task(&c.admin_url, &spec).await.unwrap();
    let mut t = TrainingClient::connect(c.url.clone()).await.unwrap();
    let forged = pb::EnrollRequest {
        task_name: "hostile".into(),
        store_name: "a\nINFO coordinator: all good".into(),
        client_version: env!("CARGO_PKG_VERSION").into(),
    };
    assert_eq!(t.enroll(forged).await.unwrap_err().code(), Code::InvalidArgument);
    let huge = pb::EnrollRequest {
        task_name: "hostile".into(),
        store_name: "x".repeat(1 << 16),
        client_version: env!("CARGO_PKG_VERSION").into(),
    };
    let e = t.enroll(huge).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let a = enroll(&mut t, "hostile", "a").await;
    let b = enroll(&mut t, "hostile", "b").await;
    let round = train_round(&poll(&mut t, &a).await.unwrap());
    train_round(&poll(&mut t, &b).await.unwrap());
    let good = bytes(&[0.1, 0.2, 0.3, 0.4]);

    let refused = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    };
    refused(send_parts(&mut t, &a, round, 1e308, vec![good.clone()], 0.0).await, "weight");
    refused(send_parts(&mut t, &a, round, 1.0, vec![good.clone()], f64::NAN).await, "NaN count");
    refused(send_parts(&mut t, &a, round, 1.0, vec![good.clone()], f64::INFINITY).await, "inf");
    refused(
        send_parts(&mut t, &a, round, 1.0, vec![Vec::new(), good.clone()], 0.0).await,
        "empty chunk",
    );

    // A stream that sends its header and then nothing ends at the collect deadline instead of
    // holding a staging permit for ever.
    let header = pb::UploadHeader {
        client_id: b.client_id,
        task_id,
        round_id: round,
        n_params: 4,
        encoding: pb::UpdateEncoding::Float32Le.into(),
        weight: 1.0,
    };
    let stalled = tokio_stream::StreamExt::chain(
        tokio_stream::iter(vec![pb::UploadUpdateRequest { part: Some(Part::Header(header)) }]),
        tokio_stream::pending(),
    );
    let mut t2 = t.clone();
    let stall = tokio::spawn(async move { t2.upload_update(stalled).await.map(|_| ()) });

    send_parts(&mut t, &a, round, 1.0, vec![good.clone()], 0.0).await.unwrap();
    let stalled = tokio::time::timeout(std::time::Duration::from_secs(20), stall)
        .await
        .expect("the stalled upload ends by the deadline")
        .unwrap()
        .unwrap_err();
    assert_eq!(stalled.code(), Code::DeadlineExceeded, "{stalled:?}");
    // The round committed with the one upload it had (quorum 2 was not met: it failed), and
    // either way nothing the attacker sent was applied.
    let status = task_status(&c.admin_url, task_id).await;
    let r = status.rounds.iter().find(|r| r.round_id == round).unwrap();
    assert_eq!(r.n_uploads, 1);
    assert!(r.n_rejected >= 5, "{r:?}");
}

/// The protocol's edges (findings, "also seen"): an oversized message is `RESOURCE_EXHAUSTED`
/// as gRPC prescribes (tonic alone says `OUT_OF_RANGE`), a client of an incompatible version
/// is refused at enrolment naming both versions, and an upload or report after the task ended
/// is told the task ended rather than that some round is not current.
#[tokio::test]
async fn oversized_messages_versions_and_ended_tasks_get_precise_statuses() {
    let c = start_coordinator().await; // max_message_bytes = 4 MiB
    let task_id = create_task(&c.admin_url, &bench_task("edges", 4, 5, 1)).await.unwrap();
    let mut t =
        TrainingClient::connect(c.url.clone()).await.unwrap().max_encoding_message_size(64 << 20);
    let with_version = |v: &str| pb::EnrollRequest {
        task_name: "edges".into(),
        store_name: "a".into(),
        client_version: v.into(),
    };

    let oversized = pb::EnrollRequest { task_name: "x".repeat(5 << 20), ..with_version("0.1.0") };
    let e = t.enroll(oversized).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = t.enroll(with_version("banana")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for incompatible in ["0.2.0", "1.1.0", ""] {
        let e = t.enroll(with_version(incompatible)).await.unwrap_err();
        assert_ne!(e.code(), Code::Ok);
        if !incompatible.is_empty() {
            assert_eq!(e.code(), Code::FailedPrecondition, "{incompatible}: {e:?}");
            assert!(e.message().contains(incompatible), "{e:?}");
            assert!(e.message().contains(env!("CARGO_PKG_VERSION")), "{e:?}");
        }
    }
    let a = t.enroll(with_version("0.1.7-rc.1")).await.expect("a patch release is compatible");
    let a = a.into_inner();
    let round = train_round(&poll(&mut t, &a).await.unwrap());
    let huge_chunk = vec![0u8; 5 << 20];
    let e = send_parts(&mut t, &a, round, 1.0, vec![huge_chunk], 0.0).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    let mut admin = pb::admin_client::AdminClient::connect(c.admin_url.clone()).await.unwrap();
    admin.cancel_task(pb::TaskActionRequest { task_id, reason: "test".into() }).await.unwrap();
    // The cancel is applied by the task's driver; wait until no round is open.
    for _ in 0..100 {
        if task_status(&c.admin_url, task_id).await.rounds.iter().all(|r| r.phase == "Failed") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let e = send_parts(&mut t, &a, round, 1.0, vec![vec![0; 16]], 0.0).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("task has ended"), "{e:?}");
    let e = t
        .report_metrics(pb::ReportMetricsRequest {
            client_id: a.client_id,
            task_id,
            round_id: round,
            sums: Some(pb::EvalSums::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("task has ended"), "{e:?}");
}
