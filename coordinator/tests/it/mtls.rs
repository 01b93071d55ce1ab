//! The trust boundary over real TLS on loopback: who may connect, who a store is, and what each
//! administrator role may do (issue 10; findings C1, C2, H9).

use crate::support::{bench_task, channel, start_secured};
use fedretail_coordinator::config::Security;
use fedretail_coordinator::pki::{self, PkiDir, Role};
use fedretail_coordinator::tls::TlsFiles;
use fedretail_proto::pb;
use fedretail_proto::pb::admin_client::AdminClient;
use fedretail_proto::pb::training_client::TrainingClient;
use tonic::Code;
use tonic::transport::Channel;

struct Pki {
    _dir: tempfile::TempDir,
    pki: PkiDir,
    /// Another deployment's CA with a store named like ours.
    foreign: PkiDir,
    revoked_file: std::path::PathBuf,
}

fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::ephemeral(
        &dir.path().join("pki"),
        &["a", "b"],
        &[("ann", Role::Auditor), ("otto", Role::Operator), ("eve", Role::Exporter)],
    )
    .unwrap();
    let revoked = pki::issue_store(&pki, "lost").unwrap();
    let revoked_file = dir.path().join("revoked.txt");
    std::fs::write(&revoked_file, format!("# a stolen laptop\n{}\n", revoked.serial)).unwrap();
    let foreign = pki::ephemeral(&dir.path().join("foreign"), &["a"], &[]).unwrap();
    Pki { _dir: dir, pki, foreign, revoked_file }
}

fn security(p: &Pki) -> Security {
    Security::Mtls(TlsFiles {
        ca: p.pki.ca_cert(),
        cert: p.pki.coordinator_cert(),
        key: p.pki.coordinator_key(),
        revoked: Some(p.revoked_file.clone()),
    })
}

async fn store(url: &str, p: &PkiDir, name: &str) -> TrainingClient<Channel> {
    let (cert, key) = p.store(name);
    TrainingClient::new(channel(url, &p.ca_cert(), Some((&cert, &key))).await.unwrap())
}

async fn admin(url: &str, p: &PkiDir, name: &str) -> AdminClient<Channel> {
    let (cert, key) = p.admin(name);
    AdminClient::new(channel(url, &p.ca_cert(), Some((&cert, &key))).await.unwrap())
}

fn enroll_request(store_name: &str) -> pb::EnrollRequest {
    pb::EnrollRequest {
        task_name: "t".into(),
        store_name: store_name.into(),
        client_version: env!("CARGO_PKG_VERSION").into(),
    }
}

#[tokio::test]
async fn only_certified_stores_get_through_the_handshake() {
    let p = make_pki();
    let c = start_secured(None, security(&p)).await;
    crate::support::create_task_over(
        &admin(&c.admin_url, &p.pki, "otto").await,
        &bench_task("t", 4, 1, 1),
    )
    .await
    .unwrap();

    // No certificate, another deployment's certificate, a revoked one: no connection at all.
    let no_cert = channel(&c.url, &p.pki.ca_cert(), None).await;
    let refused = match no_cert {
        Err(e) => e,
        Ok(ch) => {
            format!("{:?}", TrainingClient::new(ch).enroll(enroll_request("x")).await.unwrap_err())
        }
    };
    assert!(
        !refused.contains("store certificate is required"),
        "refused by TLS, not by the service: {refused}"
    );
    let (fc, fk) = p.foreign.store("a");
    let foreign = match channel(&c.url, &p.pki.ca_cert(), Some((&fc, &fk))).await {
        Err(e) => e,
        Ok(ch) => {
            format!("{:?}", TrainingClient::new(ch).enroll(enroll_request("a")).await.unwrap_err())
        }
    };
    assert!(!foreign.contains("code: Ok"), "{foreign}");
    let (rc, rk) = p.pki.store("lost");
    let revoked = match channel(&c.url, &p.pki.ca_cert(), Some((&rc, &rk))).await {
        Err(e) => e,
        Ok(ch) => {
            let status = TrainingClient::new(ch).enroll(enroll_request("lost")).await.unwrap_err();
            assert_ne!(status.code(), Code::NotFound, "the handshake must fail before any RPC");
            format!("{status:?}")
        }
    };
    assert!(!revoked.is_empty());
    // The client pins the deployment CA: a coordinator certificate from another CA is refused.
    assert!(
        channel(&c.url, &p.foreign.ca_cert(), Some((&fc, &fk))).await.is_err()
            || TrainingClient::new(
                channel(&c.url, &p.foreign.ca_cert(), Some((&fc, &fk))).await.unwrap()
            )
            .enroll(enroll_request("a"))
            .await
            .is_err()
    );

    // A certified store gets in, under its certificate's name whatever the request says.
    let mut a = store(&c.url, &p.pki, "a").await;
    let first = a.enroll(enroll_request("b")).await.unwrap().into_inner();
    let second = a.enroll(enroll_request("a")).await.unwrap().into_inner();
    assert_ne!(first.client_id, second.client_id);
    let poll = |id: u64, task: u64| pb::NextAssignmentRequest { client_id: id, task_id: task };
    // One active enrolment per store: the new id replaced the old one.
    let old = a.next_assignment(poll(first.client_id, first.task_id)).await.unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated, "{old:?}");
    // Another store cannot use a's id.
    let mut b = store(&c.url, &p.pki, "b").await;
    let stolen = b.next_assignment(poll(second.client_id, second.task_id)).await.unwrap_err();
    assert_eq!(stolen.code(), Code::PermissionDenied, "{stolen:?}");
    // An administrator's certificate gets nothing from the Training service.
    let (oc, ok) = p.pki.admin("otto");
    let mut as_admin =
        TrainingClient::new(channel(&c.url, &p.pki.ca_cert(), Some((&oc, &ok))).await.unwrap());
    let denied = as_admin.enroll(enroll_request("otto")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    c.stop().await;
}

#[tokio::test]
async fn each_role_does_exactly_what_it_should() {
    let p = make_pki();
    let c = start_secured(None, security(&p)).await;
    let mut otto = admin(&c.admin_url, &p.pki, "otto").await;
    let mut ann = admin(&c.admin_url, &p.pki, "ann").await;
    let mut eve = admin(&c.admin_url, &p.pki, "eve").await;
    let (sc, sk) = p.pki.store("a");
    let mut as_store =
        AdminClient::new(channel(&c.admin_url, &p.pki.ca_cert(), Some((&sc, &sk))).await.unwrap());
    let spec =
        |name: &str| pb::CreateTaskRequest { spec: Some((&bench_task(name, 4, 5, 1)).into()) };
    let action = |task_id: u64| pb::TaskActionRequest { task_id, reason: "test".into() };

    // Operator: creates, pauses, resumes, cancels; reads; does not export.
    let task = otto.create_task(spec("t")).await.unwrap().into_inner().task_id;
    let paused = otto.pause_task(action(task)).await.unwrap().into_inner();
    assert_eq!(paused.state, pb::TaskState::Paused as i32);
    let again = otto.pause_task(action(task)).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    let resumed = otto.resume_task(action(task)).await.unwrap().into_inner();
    assert_eq!(resumed.state, pb::TaskState::Running as i32);
    otto.get_task(pb::GetTaskRequest { task_id: task, max_rounds: 1 }).await.unwrap();
    let export = |task_id| pb::ExportModelRequest { task_id };
    let e = otto.export_model(export(task)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("exporter"), "the refusal names the role needed: {}", e.message());

    // Auditor: reads status and the audit log; nothing else.
    ann.list_tasks(pb::ListTasksRequest {}).await.unwrap();
    ann.get_task(pb::GetTaskRequest { task_id: task, max_rounds: 1 }).await.unwrap();
    for refused in [
        ann.create_task(spec("u")).await.map(|_| ()),
        ann.pause_task(action(task)).await.map(|_| ()),
        ann.cancel_task(action(task)).await.map(|_| ()),
        ann.export_model(export(task)).await.map(|_| ()),
    ] {
        let e = refused.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("ann holds auditor"), "{}", e.message());
    }

    // Exporter: exports and reads; does not manage.
    let mut stream = eve.export_model(export(task)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.chunk.unwrap().n_params, 4);
    assert_eq!(eve.create_task(spec("v")).await.unwrap_err().code(), Code::PermissionDenied);

    // A store certificate gets nothing from Admin.
    for refused in [
        as_store.list_tasks(pb::ListTasksRequest {}).await.map(|_| ()),
        as_store.create_task(spec("w")).await.map(|_| ()),
        as_store.get_audit_log(pb::GetAuditLogRequest { after: 0, limit: 0 }).await.map(|_| ()),
    ] {
        assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    }

    // Cancel: the task ends for good.
    let cancelled = otto.cancel_task(action(task)).await.unwrap().into_inner();
    assert_eq!(cancelled.state, pb::TaskState::Cancelled as i32);
    assert_eq!(otto.resume_task(action(task)).await.unwrap_err().code(), Code::FailedPrecondition);

    // The audit log holds every admin call, refusals included, with who and which role.
    let log = ann
        .get_audit_log(pb::GetAuditLogRequest { after: 0, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    let calls: Vec<(String, String, String, bool)> = log
        .entries
        .iter()
        .map(|e| (e.actor.clone(), e.role.clone(), e.action.clone(), e.outcome == "ok"))
        .collect();
    for expected in [
        ("otto", "operator", "CreateTask", true),
        ("otto", "operator", "PauseTask", true),
        ("otto", "operator", "PauseTask", false),
        ("otto", "operator", "ResumeTask", true),
        ("otto", "operator", "ExportModel", false),
        ("ann", "auditor", "CreateTask", false),
        ("eve", "exporter", "ExportModel", true),
        ("a", "store", "ListTasks", false),
        ("otto", "operator", "CancelTask", true),
    ] {
        let e =
            (expected.0.to_string(), expected.1.to_string(), expected.2.to_string(), expected.3);
        assert!(calls.contains(&e), "missing {expected:?} in {calls:?}");
    }
    let export_entry =
        log.entries.iter().find(|e| e.action == "ExportModel" && e.outcome == "ok").unwrap();
    assert!(export_entry.detail.contains("\"model_version\":0"), "{}", export_entry.detail);
    assert!(log.entries.iter().any(|e| e.action == "task_started"));
    assert!(log.entries.iter().any(|e| e.action == "task_state" && e.detail.contains("cancelled")));
    c.stop().await;
}

#[tokio::test]
async fn a_cancelled_task_stays_cancelled_after_a_restart() {
    let p = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let c = start_secured(Some(db.clone()), security(&p)).await;
    let mut otto = admin(&c.admin_url, &p.pki, "otto").await;
    let task = otto
        .create_task(pb::CreateTaskRequest { spec: Some((&bench_task("t", 4, 5, 1)).into()) })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    otto.cancel_task(pb::TaskActionRequest { task_id: task, reason: "wrong data".into() })
        .await
        .unwrap();
    drop(otto);
    c.stop().await;
    let c = start_secured(Some(db), security(&p)).await;
    let mut otto = admin(&c.admin_url, &p.pki, "otto").await;
    let status = otto
        .get_task(pb::GetTaskRequest { task_id: task, max_rounds: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, pb::TaskState::Cancelled as i32, "{}", status.state_reason);
    // A store that enrols is told the task ended; it never gets a round.
    let mut a = store(&c.url, &p.pki, "a").await;
    let e = a.enroll(enroll_request("a")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    c.stop().await;
}
