//! A coordinator restarted on the same SQLite store resumes from its last committed round:
//! committed work is kept, the interrupted round is gone, and round ids are never reused.

use crate::rejects::{enroll, poll, train_round, upload};
use crate::support::{bench_task, create_task, start_coordinator_with, task_status};
use fedretail_proto::pb::training_client::TrainingClient;
use tonic::Code;

#[tokio::test]
async fn a_restart_resumes_from_the_last_committed_round() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("coordinator.db");
    let good = [0.1f32, 0.2, 0.3, 0.4];

    let c = start_coordinator_with(Some(db.clone())).await;
    let task_id = create_task(&c.admin_url, &bench_task("resume", 4, 3, 1)).await.unwrap();
    let mut t = TrainingClient::connect(c.url.clone()).await.unwrap();
    let a = enroll(&mut t, "resume", "a").await;
    let first = train_round(&poll(&mut t, &a).await.unwrap());
    upload(&mut t, &a, first, 4, &good, None).await.unwrap();
    // Round 2 starts; the coordinator stops before it completes.
    let interrupted = train_round(&poll(&mut t, &a).await.unwrap());
    assert!(interrupted > first);
    assert_eq!(task_status(&c.admin_url, task_id).await.committed_rounds, 1);
    c.stop().await;

    let c = start_coordinator_with(Some(db)).await;
    let status = task_status(&c.admin_url, task_id).await;
    assert_eq!((status.committed_rounds, status.model_version), (1, 1), "committed work survives");
    assert_eq!(status.spec.as_ref().unwrap().name, "resume");
    let mut t = TrainingClient::connect(c.url.clone()).await.unwrap();
    assert_eq!(
        poll(&mut t, &a).await.unwrap_err().code(),
        Code::Unauthenticated,
        "clients enrol again"
    );
    let a = enroll(&mut t, "resume", "a").await;
    let next = train_round(&poll(&mut t, &a).await.unwrap());
    assert!(next > interrupted, "round ids are never reused: {next} after {interrupted}");
    assert_eq!(
        upload(&mut t, &a, interrupted, 4, &good, None).await,
        Err(Code::FailedPrecondition),
        "stale round"
    );
    upload(&mut t, &a, next, 4, &good, None).await.unwrap();
    // The commit follows the upload on the driver's blocking thread: wait for it (bounded).
    let mut status = task_status(&c.admin_url, task_id).await;
    for _ in 0..100 {
        if status.committed_rounds == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        status = task_status(&c.admin_url, task_id).await;
    }
    assert_eq!((status.committed_rounds, status.model_version), (2, 2));
    let failed: Vec<_> = status.rounds.iter().filter(|r| r.phase == "Failed").collect();
    assert_eq!(failed.len(), 1, "the interrupted round is recorded as failed, not applied");
    assert_eq!(failed[0].round_id, interrupted);
    c.stop().await;
}
