//! A complete federated run over loopback gRPC: coordinator plus store clients (the client
//! library) on generated ratings.

use crate::support::{create_task, plan, start_coordinator, task_status};
use fedretail_client::data::StoreRatings;
use fedretail_client::participant::{LocalData, Participant, ParticipantConfig};
use fedretail_client::transport::GrpcTransport;
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::model::mf::{MfData, MfSpec, Rating, user_seed};
use fedretail_core::plan::{ModelSpec, TaskSpec};
use fedretail_proto::pb;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const N_ITEMS: u32 = 60;

/// Ratings from a rank-1 model: `3 + 1.5 * a_u * b_i`, 30 per user, every fifth held out.
pub(crate) fn store(store: u32, users: u32) -> StoreRatings {
    let user_keys: Vec<String> = (0..users).map(|u| format!("s{store}-u{u}")).collect();
    let mut data = MfData {
        user_seeds: user_keys.iter().map(|k| user_seed(k)).collect(),
        ..MfData::default()
    };
    for u in 0..users {
        let a = if (u + store).is_multiple_of(2) { 1.0 } else { -1.0 };
        for k in 0..30 {
            let item = (u * 7 + k * 11 + store) % N_ITEMS;
            let b = if item.is_multiple_of(3) { 1.0 } else { -0.5 };
            let r = Rating { user: u, item, value: 3.0 + 1.5 * a * b, timestamp: i64::from(k) };
            if k % 5 == 0 { data.test.push(r) } else { data.train.push(r) }
        }
    }
    StoreRatings { user_keys, data }
}

/// The recommender the end-to-end runs train.
pub(crate) fn mf_spec() -> MfSpec {
    MfSpec {
        n_items: N_ITEMS as usize,
        dim: 4,
        learning_rate: 0.05,
        regularization: 0.02,
        init_std: 0.1,
        rating_min: 1.0,
        rating_max: 5.0,
        init_mean: 0.0,
        local_item_offsets: None,
        objective: fedretail_core::model::mf::Objective::Rating,
        category_affinity: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stores_train_a_recommender_end_to_end() {
    let c = start_coordinator().await;
    let mut p = plan(8, 3);
    p.local_epochs = 3;
    p.clip_norm = 10.0;
    p.eval_every = 1;
    let spec = TaskSpec {
        name: "mf".into(),
        model: ModelSpec::MatrixFactorization(mf_spec()),
        plan: p,
        privacy: None,
    };
    let task_id = create_task(&c.admin_url, &spec).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let mut joins = Vec::new();
    for s in 0..3 {
        let dir = state.path().join(format!("store-{s}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = ParticipantConfig {
            task: "mf".into(),
            store_name: format!("store-{s}"),
            state_dir: Some(dir),
            max_backoff: Duration::from_millis(200),
            seeded_privacy: false,
            dropout: 0.0,
            policy: fedretail_client::policy::StorePolicy::permissive(),
        };
        let participant = Participant::new(
            GrpcTransport::new(&c.url).unwrap(),
            config,
            LocalData::Ratings(store(s, 12)),
        );
        joins.push(tokio::spawn(participant.run(cancel.clone())));
    }
    for j in joins {
        let outcome =
            tokio::time::timeout(Duration::from_secs(60), j).await.unwrap().unwrap().unwrap();
        assert_eq!(outcome.state, "finished");
        assert_eq!(outcome.rounds_trained, 8);
        assert_eq!(outcome.evaluations, 8);
    }
    let status = task_status(&c.admin_url, task_id).await;
    assert_eq!((status.committed_rounds, status.failed_rounds), (8, 0));
    assert_eq!(status.state, pb::TaskState::Finished as i32);
    let rmse = |r: &pb::RoundStatus| EvalSums::try_from(r.eval.unwrap()).unwrap().rmse();
    let (last, first) = (rmse(&status.rounds[0]), rmse(&status.rounds[7]));
    assert!(last < 0.8 * first, "federated training should lower test RMSE: {first} -> {last}");

    // Each store kept its personal parameters and a log of everything it sent.
    for s in 0..3 {
        let dir = state.path().join(format!("store-{s}"));
        assert!(dir.join(fedretail_client::personal::FILE).is_file());
        let log = fedretail_client::audit_log::AuditLog::new(&dir).read().unwrap();
        let updates: Vec<_> = log.iter().filter(|e| e["kind"] == "update").collect();
        assert_eq!(updates.len(), 8);
        assert_eq!(updates[0]["n_params"], spec.model.n_params());
    }
}
