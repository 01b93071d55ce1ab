//! Participant tests with a recording fake transport.

use super::*;
use crate::transport::{EvalPlan, TrainPlan, UpdateSummary};
use fedretail_core::model::mf::{MfData, MfSpec, Rating};
use fedretail_core::privacy::Contribution;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Record {
    enrolls: u32,
    /// Per upload: values sent, and audit-log lines that existed when the bytes left.
    uploads: Vec<(Vec<f32>, usize)>,
    reports: Vec<EvalSums>,
}

struct Fake {
    record: Arc<Mutex<Record>>,
    enroll_results: VecDeque<Result<Enrollment, TransportError>>,
    assignments: VecDeque<Result<Assignment, TransportError>>,
    audit_dir: Option<PathBuf>,
    model: Vec<f32>,
}

impl Transport for Fake {
    fn peer(&self) -> String {
        "fake".into()
    }
    async fn enroll(&mut self, _task: &str, _store: &str) -> Result<Enrollment, TransportError> {
        self.record.lock().unwrap().enrolls += 1;
        self.enroll_results.pop_front().unwrap_or_else(|| Ok(enrollment()))
    }
    async fn next_assignment(&mut self, _e: &Enrollment) -> Result<Assignment, TransportError> {
        self.assignments
            .pop_front()
            .unwrap_or(Ok(Assignment::Finished { state: "finished".into(), reason: "done".into() }))
    }
    async fn fetch_model(
        &mut self,
        _e: &Enrollment,
        _v: u64,
        n: usize,
    ) -> Result<Vec<f32>, TransportError> {
        assert_eq!(n, self.model.len());
        Ok(self.model.clone())
    }
    async fn upload(
        &mut self,
        _e: &Enrollment,
        _round: u64,
        update: Contribution,
        _summary: UpdateSummary,
    ) -> Result<(), TransportError> {
        let logged =
            self.audit_dir.as_deref().map_or(0, |d| AuditLog::new(d).read().unwrap().len());
        self.record.lock().unwrap().uploads.push((update.into_values(), logged));
        Ok(())
    }
    async fn report(
        &mut self,
        _e: &Enrollment,
        _round: u64,
        sums: EvalSums,
    ) -> Result<(), TransportError> {
        self.record.lock().unwrap().reports.push(sums);
        Ok(())
    }
}

fn spec() -> MfSpec {
    MfSpec {
        n_items: 10,
        dim: 2,
        learning_rate: 0.05,
        regularization: 0.01,
        init_std: 0.1,
        rating_min: 1.0,
        rating_max: 5.0,
        init_mean: 0.0,
        local_item_offsets: None,
    }
}

fn enrollment() -> Enrollment {
    Enrollment {
        client_id: 1,
        task_id: 1,
        model: ModelSpec::MatrixFactorization(spec()),
        poll_timeout: Duration::from_secs(1),
    }
}

fn ratings() -> StoreRatings {
    let user_keys = vec!["alice".to_string(), "bob".to_string()];
    let train = (0..20)
        .map(|k| Rating { user: k % 2, item: k % 10, value: 1.0 + (k % 5) as f32, timestamp: 0 })
        .collect();
    let test = vec![Rating { user: 0, item: 3, value: 4.0, timestamp: 1 }];
    StoreRatings { data: MfData { user_seeds: vec![1, 2], train, test }, user_keys }
}

fn train(round_id: u64) -> Assignment {
    Assignment::Train(TrainPlan {
        round_id,
        model_version: 0,
        n_params: spec().n_global(),
        local_epochs: 2,
        clip_norm: 0.05,
        round_seed: 9,
        upload_timeout: Duration::from_secs(60),
        privacy: None,
    })
}

fn participant(
    dir: Option<&Path>,
    enroll_results: Vec<Result<Enrollment, TransportError>>,
    assignments: Vec<Result<Assignment, TransportError>>,
) -> (Participant<Fake>, Arc<Mutex<Record>>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let fake = Fake {
        record: record.clone(),
        enroll_results: enroll_results.into(),
        assignments: assignments.into(),
        audit_dir: dir.map(Path::to_path_buf),
        model: vec![0.01; spec().n_global()],
    };
    let config = ParticipantConfig {
        task: "t".into(),
        store_name: "store".into(),
        state_dir: dir.map(Path::to_path_buf),
        max_backoff: Duration::from_secs(4),
        seeded_privacy: false,
    };
    (Participant::new(fake, config, LocalData::Ratings(ratings())), record)
}

#[tokio::test]
async fn updates_are_clipped_global_only_and_logged_before_they_leave() {
    let dir = tempfile::tempdir().unwrap();
    let eval = Assignment::Evaluate(EvalPlan {
        round_id: 1,
        model_version: 1,
        n_params: spec().n_global(),
        seed: 3,
    });
    let (p, record) = participant(
        Some(dir.path()),
        vec![],
        vec![Ok(train(1)), Ok(Assignment::Wait), Ok(eval), Ok(train(2))],
    );
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!(
        (outcome.rounds_trained, outcome.evaluations, outcome.state.as_str()),
        (2, 1, "finished")
    );
    let record = record.lock().unwrap();
    assert_eq!(record.uploads.len(), 2);
    for (k, (values, logged_when_sent)) in record.uploads.iter().enumerate() {
        // Only the global vector leaves: user factors and biases have no place in it.
        assert_eq!(values.len(), spec().n_global());
        assert!(fedretail_core::update::l2_norm(values) <= 0.05 * (1.0 + 1e-6));
        // The second upload follows one metrics entry and the first update.
        assert_eq!(*logged_when_sent, [1, 3][k], "the audit entry is on disk before the upload");
    }
    assert_eq!(record.reports[0].n_ratings, 1);
    let log = AuditLog::new(dir.path()).read().unwrap();
    let kinds: Vec<&str> = log.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["update", "metrics", "update"]);
    assert!(dir.path().join(personal::FILE).is_file(), "personal parameters are kept on disk");
}

#[tokio::test]
async fn nothing_is_sent_when_the_audit_log_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("does-not-exist");
    let (p, record) = participant(Some(&missing), vec![], vec![Ok(train(1))]);
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.rounds_trained, 0);
    assert!(record.lock().unwrap().uploads.is_empty());
}

#[tokio::test(start_paused = true)]
async fn outages_are_retried_and_a_forgotten_client_enrols_again() {
    fn down<T>() -> Result<T, TransportError> {
        Err(TransportError::Unavailable("connection refused".into()))
    }
    let (p, record) = participant(
        None,
        vec![down(), down(), Ok(enrollment())],
        vec![down(), Err(TransportError::UnknownClient("restarted".into())), Ok(train(5))],
    );
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.state, "finished");
    let record = record.lock().unwrap();
    assert_eq!(record.enrolls, 4, "two failed attempts, one success, one re-enrolment");
    assert_eq!(record.uploads.len(), 1);
}

#[tokio::test]
async fn data_that_does_not_fit_the_task_is_refused_before_anything_is_sent() {
    let mut e = enrollment();
    if let ModelSpec::MatrixFactorization(s) = &mut e.model {
        s.n_items = 5;
    }
    let (p, record) = participant(None, vec![Ok(e)], vec![Ok(train(1))]);
    let err = p.run(CancellationToken::new()).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "the store's data does not fit task \"t\": item id 5 is not below the task's n_items 5"
    );
    assert!(record.lock().unwrap().uploads.is_empty());
}

/// Customer-level privacy: what the transport is handed holds no user parameter, no user key and
/// no single customer's contribution. Every byte the participant gives the transport (enrolment
/// strings, update values as the wire encodes them, evaluation sums) is searched for each
/// customer's personal parameters (every adjacent pair of values: 8 bytes, so a chance match is
/// negligible) and ids.
#[tokio::test]
async fn customer_level_uploads_hold_only_the_sum_of_clipped_contributions() {
    let dir = tempfile::tempdir().unwrap();
    let private = |round_id| {
        let Assignment::Train(mut plan) = train(round_id) else { unreachable!() };
        plan.privacy = Some(fedretail_core::privacy::TrainPrivacy {
            per_customer: true,
            sampling_rate: 1.0,
            noise_std: 0.0,
            report_unclipped: false,
            count_noise_std: 0.0,
        });
        Assignment::Train(plan)
    };
    let eval = Assignment::Evaluate(EvalPlan {
        round_id: 2,
        model_version: 1,
        n_params: spec().n_global(),
        seed: 3,
    });
    let (p, record) =
        participant(Some(dir.path()), vec![], vec![Ok(private(1)), Ok(private(2)), Ok(eval)]);
    p.run(CancellationToken::new()).await.unwrap();
    let record = record.lock().unwrap();
    assert_eq!(record.uploads.len(), 2, "one vector per round, not one per customer");

    let mut sent: Vec<u8> = b"tstore".to_vec();
    for (values, _) in &record.uploads {
        // Both customers are sampled (q = 1) and each contribution is clipped to C = 0.05, in
        // different directions: the norm shows a sum of two, not one contribution.
        let norm = fedretail_core::update::l2_norm(values);
        assert!(norm > 0.05 * 1.01 && norm <= 0.1 * (1.0 + 1e-6), "norm {norm}");
        values.iter().for_each(|v| sent.extend(v.to_le_bytes()));
    }
    for s in &record.reports {
        for v in [s.squared_error, s.absolute_error, s.hits_at_10, s.ndcg_at_10] {
            sent.extend(v.to_le_bytes());
        }
    }
    let data = ratings();
    let model = MfModel::new(spec());
    let local = personal::load(dir.path(), &data.user_keys, model.init_local(&data.data, None))
        .unwrap()
        .expect("saved after training");
    for (u, key) in data.user_keys.iter().enumerate() {
        assert!(!sent.windows(key.len()).any(|w| w == key.as_bytes()), "user key {key} sent");
        let mut personal = vec![local.user_bias[u]];
        personal.extend(local.user_factors.row(u).iter());
        assert!(personal.iter().any(|&v| v != 0.0), "trained parameters to look for");
        for pair in personal.windows(2) {
            let needle: Vec<u8> = pair.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(
                !sent.windows(8).any(|w| w == needle.as_slice()),
                "user {key}'s parameters {pair:?} appear in what was sent"
            );
        }
    }
}

/// A refused request is followed by a backoff, not an immediate retry: the coordinator may offer
/// the same round again at once, and retraining in a tight loop would only repeat the refusal.
#[tokio::test(start_paused = true)]
async fn a_refused_request_backs_off_before_polling_again() {
    let refused = Err(TransportError::Rejected {
        code: "InvalidArgument".into(),
        message: "update holds non-finite values".into(),
    });
    let (p, record) = participant(None, vec![], vec![refused, Ok(train(1))]);
    let start = tokio::time::Instant::now();
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.rounds_trained, 1);
    assert_eq!(record.lock().unwrap().uploads.len(), 1);
    // The first backoff step is 500 ms with ±20 % jitter.
    assert!(start.elapsed() >= Duration::from_millis(400), "waited {:?}", start.elapsed());
}

fn demand_spec(groups: &[&str]) -> fedretail_core::model::demand::DemandSpec {
    fedretail_core::model::demand::DemandSpec {
        groups: groups.iter().map(|g| g.to_string()).collect(),
        first_test_week: 100,
        horizon: 2,
        harmonics: 1,
        learning_rate: 0.01,
        regularization: 0.001,
        loss: fedretail_core::model::demand::DemandLoss::Log1pAbsolute,
        planned_discounts: false,
        personal_regularization: 10.0,
        whole_units: true,
    }
}

/// Weekly sales of one group from week 0 to 109 (the last 10 held out by `demand_spec`).
fn sales(group: &str) -> crate::data::sales::StoreSales {
    let units: Vec<f32> = (0..110).map(|t| (2 + t % 3) as f32).collect();
    let discount = vec![0.0; 110];
    crate::data::sales::StoreSales {
        first_week: 0,
        n_weeks: 110,
        groups: [(group.to_string(), (units, discount))].into(),
    }
}

fn demand_participant(
    dir: &Path,
    groups: &[&str],
    data: LocalData,
    assignments: Vec<Result<Assignment, TransportError>>,
) -> (Participant<Fake>, Arc<Mutex<Record>>) {
    let spec = demand_spec(groups);
    let n = spec.n_global();
    let enrollment = Enrollment { model: ModelSpec::Demand(spec), ..enrollment() };
    let record = Arc::new(Mutex::new(Record::default()));
    let fake = Fake {
        record: record.clone(),
        enroll_results: vec![Ok(enrollment)].into(),
        assignments: assignments.into(),
        audit_dir: Some(dir.to_path_buf()),
        model: vec![0.0; n],
    };
    let config = ParticipantConfig {
        task: "demand".into(),
        store_name: "store".into(),
        state_dir: Some(dir.to_path_buf()),
        max_backoff: Duration::from_secs(4),
        seeded_privacy: false,
    };
    (Participant::new(fake, config, data), record)
}

#[tokio::test]
async fn a_demand_store_trains_evaluates_and_keeps_its_levels() {
    let dir = tempfile::tempdir().unwrap();
    let n = demand_spec(&["Paper"]).n_global();
    let plan = |round_id| {
        Ok(Assignment::Train(TrainPlan {
            round_id,
            model_version: 0,
            n_params: n,
            local_epochs: 2,
            clip_norm: 100.0,
            round_seed: 9,
            upload_timeout: Duration::from_secs(60),
            privacy: None,
        }))
    };
    let eval =
        Ok(Assignment::Evaluate(EvalPlan { round_id: 2, model_version: 1, n_params: n, seed: 0 }));
    let (p, record) = demand_participant(
        dir.path(),
        &["Paper"],
        LocalData::Sales(sales("Paper")),
        vec![plan(1), eval],
    );
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!((outcome.rounds_trained, outcome.evaluations), (1, 1));
    let record = record.lock().unwrap();
    assert_eq!(record.uploads[0].0.len(), n);
    assert!(record.uploads[0].0.iter().any(|v| *v != 0.0), "the update moved the model");
    // 10 held-out weeks, each forecast from 2 origins, all of them sold something.
    assert_eq!(record.reports[0].n_ratings, 20);
    assert!(record.reports[0].actual_sum > 0.0);
    assert_eq!(outcome.last_eval, Some(record.reports[0]));
    let saved = std::fs::read_to_string(dir.path().join(crate::personal::DEMAND_FILE)).unwrap();
    assert!(saved.contains("\"Paper\""), "{saved}");
}

#[tokio::test]
async fn a_demand_task_needs_sales_of_its_groups() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) =
        demand_participant(dir.path(), &["Chairs"], LocalData::Sales(sales("Paper")), vec![]);
    let err = p.run(CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.ends_with("the store sells none of the task's product groups (Chairs)"), "{err}");
    let (p, _) = demand_participant(dir.path(), &["Chairs"], LocalData::Ratings(ratings()), vec![]);
    let err = p.run(CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.ends_with("the task forecasts demand, and this store has no sales"), "{err}");
}
