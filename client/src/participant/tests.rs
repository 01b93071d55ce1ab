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
    /// Secure aggregation: what each step sent.
    adverts: Vec<fedretail_core::secagg::protocol::Advertised>,
    masked: Vec<Vec<u32>>,
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
    async fn advertise_keys(
        &mut self,
        _e: &Enrollment,
        _round: u64,
        advert: fedretail_core::secagg::protocol::Advertised,
        _bare_key: Option<[u8; 32]>,
    ) -> Result<(), TransportError> {
        self.record.lock().unwrap().adverts.push(advert);
        Ok(())
    }
    async fn share_keys(
        &mut self,
        _e: &Enrollment,
        _round: u64,
        _sealed: Vec<fedretail_core::secagg::protocol::Sealed>,
    ) -> Result<(), TransportError> {
        Ok(())
    }
    async fn upload_masked(
        &mut self,
        _e: &Enrollment,
        _round: u64,
        values: Vec<u32>,
    ) -> Result<(), TransportError> {
        self.record.lock().unwrap().masked.push(values);
        Ok(())
    }
    async fn unmask(
        &mut self,
        _e: &Enrollment,
        _round: u64,
        _revealed: Vec<fedretail_core::secagg::protocol::Revealed>,
    ) -> Result<(), TransportError> {
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
        objective: fedretail_core::model::mf::Objective::Rating,
        category_affinity: None,
    }
}

fn enrollment() -> Enrollment {
    Enrollment {
        client_id: 1,
        task_id: 1,
        model: ModelSpec::MatrixFactorization(spec()),
        poll_timeout: Duration::from_secs(1),
        spec: None,
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
        masked: None,
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
        dropout: 0.0,
        policy: crate::policy::StorePolicy::permissive(),
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
        privacy: None,
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
        // After the enrolment; the second upload follows one metrics entry and the first update.
        assert_eq!(*logged_when_sent, [2, 4][k], "the audit entry is on disk before the upload");
    }
    assert_eq!(record.reports[0].n_ratings, 1);
    let log = AuditLog::new(dir.path()).read().unwrap();
    let kinds: Vec<&str> = log.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["enrolled", "update", "metrics", "update"]);
    assert!(log[1]["norm_before_clip"].is_number(), "sent without privacy, so logged");
    assert!(log[1]["privacy"].is_null());
    assert!(dir.path().join(personal::FILE).is_file(), "personal parameters are kept on disk");
}

#[tokio::test]
async fn nothing_is_sent_when_the_audit_log_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("does-not-exist");
    let (p, record) = participant(Some(&missing), vec![], vec![Ok(train(1))]);
    // Not even the enrolment can be recorded: the store stops before it trains.
    let err = p.run(CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, ParticipantError::Audit { .. }), "{err}");
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
        privacy: None,
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
        relative_to_recent: false,
        hidden_units: 0,
        trees: None,
        lad: None,
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
        promotions: Default::default(),
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
        dropout: 0.0,
        policy: crate::policy::StorePolicy::permissive(),
    };
    (Participant::new(fake, config, data), record)
}

#[tokio::test]
async fn a_demand_store_trains_evaluates_and_keeps_its_levels() {
    let dir = tempfile::tempdir().unwrap();
    let n = demand_spec(&["Paper"]).n_global();
    let plan = |round_id| {
        Ok(Assignment::Train(TrainPlan {
            masked: None,
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
    let eval = Ok(Assignment::Evaluate(EvalPlan {
        round_id: 2,
        model_version: 1,
        n_params: n,
        seed: 0,
        privacy: None,
    }));
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

/// A customer-level private task over [`spec`]: central noise, z = 2, q = 0.5.
fn private_task(epsilon: f64) -> fedretail_core::plan::TaskSpec {
    use fedretail_core::optim::ServerOptimizer;
    use fedretail_core::plan::{TaskSpec, TrainingPlan};
    use fedretail_core::privacy::accountant::AccountantKind;
    use fedretail_core::privacy::{NoisePlacement, PrivacySpec, PrivacyUnit};
    TaskSpec {
        name: "t".into(),
        model: ModelSpec::MatrixFactorization(spec()),
        plan: TrainingPlan {
            rounds: 10,
            cohort_size: 2,
            min_clients: 2,
            local_epochs: 2,
            clip_norm: 0.05,
            server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
            eval_every: 0,
            eval_fraction: 1.0,
            select_timeout_secs: 1.0,
            configure_timeout_secs: 1.0,
            collect_timeout_secs: 1.0,
            evaluate_timeout_secs: 1.0,
            seed: 0,
            weight_by_examples: false,
            secure_aggregation: Default::default(),
        },
        privacy: Some(PrivacySpec {
            unit: PrivacyUnit::Customer,
            noise_placement: NoisePlacement::Central,
            target_epsilon: epsilon,
            delta: 1e-5,
            sampling_rate: 0.5,
            noise_multiplier: Some(2.0),
            population: Some(2),
            adaptive_clipping: None,
            accountant: AccountantKind::Rdp,
            domain: "stores".into(),
            evaluation_epsilon: fedretail_core::privacy::default_evaluation_epsilon(),
            evaluation_noise_multiplier: None,
            max_stores_per_customer: 1,
        }),
    }
}

fn private_train(
    round_id: u64,
    privacy: Option<fedretail_core::privacy::TrainPrivacy>,
) -> Assignment {
    match train(round_id) {
        Assignment::Train(plan) => Assignment::Train(TrainPlan { privacy, ..plan }),
        _ => unreachable!(),
    }
}

fn customer_privacy() -> fedretail_core::privacy::TrainPrivacy {
    fedretail_core::privacy::TrainPrivacy {
        per_customer: true,
        sampling_rate: 0.5,
        noise_std: 0.0,
        report_unclipped: false,
        count_noise_std: 0.0,
    }
}

/// A participant under the strict default policy, enrolled in `task`.
fn strict(
    dir: &Path,
    task: fedretail_core::plan::TaskSpec,
    policy: crate::policy::StorePolicy,
    assignments: Vec<Result<Assignment, TransportError>>,
) -> (Participant<Fake>, Arc<Mutex<Record>>) {
    let enrolled = Enrollment { spec: Some(task), ..enrollment() };
    let (mut p, record) = participant(Some(dir), vec![Ok(enrolled)], assignments);
    p.config.policy = policy;
    (p, record)
}

fn audit_kinds(dir: &Path) -> Vec<serde_json::Value> {
    AuditLog::new(dir).read().unwrap()
}

/// Issue 10 (H6): a store refuses a task beyond its policy before it allocates anything.
#[tokio::test]
async fn a_task_beyond_the_store_policy_is_refused_at_enrolment() {
    let dir = tempfile::tempdir().unwrap();
    let (p, record) = strict(
        dir.path(),
        private_task(50.0),
        crate::policy::StorePolicy::default(),
        vec![Ok(private_train(1, Some(customer_privacy())))],
    );
    let err = p.run(CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("max_epsilon_per_task"), "{err}");
    assert!(record.lock().unwrap().uploads.is_empty());
    let log = audit_kinds(dir.path());
    assert_eq!(log[1]["kind"], "refused");
    assert_eq!(log[1]["rule"], "max_epsilon_per_task");
    // Without privacy at all, the default policy refuses too.
    let dir = tempfile::tempdir().unwrap();
    let mut plain = private_task(5.0);
    plain.privacy = None;
    let (p, _) = strict(dir.path(), plain, crate::policy::StorePolicy::default(), vec![]);
    let err = p.run(CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("allow_without_privacy"), "{err}");
}

/// Issue 10 (H6, M4): a coordinator cannot switch privacy off, lower the noise, or change the
/// model's size for one round: the store refuses the round and sends nothing.
#[tokio::test]
async fn assignments_that_break_the_task_or_the_policy_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // (Local noise: the store adds its noise itself, so it checks how much it is asked to add.)
    let mut distributed = private_task(8.0);
    distributed.privacy.as_mut().unwrap().noise_placement =
        fedretail_core::privacy::NoisePlacement::Local;
    let too_little_noise =
        fedretail_core::privacy::TrainPrivacy { noise_std: 1e-9, ..customer_privacy() };
    let wrong_size = match train(3) {
        Assignment::Train(plan) => Assignment::Train(TrainPlan {
            n_params: 1 << 40,
            privacy: Some(fedretail_core::privacy::TrainPrivacy {
                noise_std: 1.0,
                ..customer_privacy()
            }),
            ..plan
        }),
        _ => unreachable!(),
    };
    let (p, record) = strict(
        dir.path(),
        distributed,
        crate::policy::StorePolicy::default(),
        vec![
            Ok(private_train(1, None)),
            Ok(private_train(2, Some(too_little_noise))),
            Ok(wrong_size),
        ],
    );
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.rounds_trained, 0);
    assert!(record.lock().unwrap().uploads.is_empty(), "nothing leaves");
    let rules: Vec<String> = audit_kinds(dir.path())
        .iter()
        .filter(|e| e["kind"] == "refused")
        .map(|e| e["rule"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(rules, ["consistent_privacy", "min_noise_multiplier", "model_shape"]);
}

/// Issue 10 (H6): the store keeps its own ledger, synced before each upload, logs every privacy
/// parameter of each upload, and stops taking part when its own budget is spent.
#[tokio::test]
async fn the_store_ledger_is_charged_before_each_upload_and_enforces_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let policy = crate::policy::StorePolicy { max_epsilon_per_task: 3.0, ..Default::default() };
    let rounds: Vec<_> = (1..=20).map(|r| Ok(private_train(r, Some(customer_privacy())))).collect();
    // The task states a budget within the store's, but its coordinator keeps asking for rounds.
    let (p, record) = strict(dir.path(), private_task(3.0), policy, rounds);
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.state, "refused", "{}", outcome.reason);
    assert!(outcome.reason.contains("max_epsilon_per_task"), "{}", outcome.reason);
    let uploads = record.lock().unwrap().uploads.len();
    assert!((1..20).contains(&uploads), "{uploads}");
    let ledger = crate::ledger::Ledger::open(Some(dir.path())).unwrap();
    assert_eq!(ledger.entries().len(), uploads, "one charge per upload, none for the refusal");
    let spent = ledger.by_task()[0].epsilon;
    assert!(spent <= 3.0, "the store never spends beyond its policy: {spent}");
    let log = audit_kinds(dir.path());
    let update = log.iter().find(|e| e["kind"] == "update").unwrap();
    assert_eq!(update["privacy"]["unit"], "customer");
    assert_eq!(update["privacy"]["placement"], "central");
    assert_eq!(update["privacy"]["sampling_rate"], 0.5);
    assert_eq!(update["privacy"]["noise_multiplier"], 2.0);
    assert!(update["norm_before_clip"].is_null(), "not sent under privacy, so not logged as sent");
    assert!(log.iter().any(|e| e["kind"] == "refused" && e["rule"] == "max_epsilon_per_task"));
}

/// Issue 10 (M4): a global model with NaN is refused before training.
#[tokio::test]
async fn a_model_that_is_not_finite_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, record) = strict(
        dir.path(),
        private_task(8.0),
        crate::policy::StorePolicy::default(),
        vec![Ok(private_train(1, Some(customer_privacy())))],
    );
    p.transport.model[0] = f32::NAN;
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.rounds_trained, 0);
    assert!(record.lock().unwrap().uploads.is_empty());
    assert!(audit_kinds(dir.path()).iter().any(|e| e["rule"] == "finite_model"));
}

/// Issue 10 (H1): under privacy, evaluation sums leave the store bounded per customer and
/// noised, after the store charged its own ledger; the store keeps the exact sums to itself.
#[tokio::test]
async fn private_evaluation_is_bounded_noised_and_charged() {
    let dir = tempfile::tempdir().unwrap();
    let mut task = private_task(8.0);
    task.privacy.as_mut().unwrap().evaluation_noise_multiplier = Some(3.0);
    let eval_privacy = fedretail_core::privacy::evaluation::EvalPrivacy {
        noise_multiplier: 3.0,
        count_bound: 10,
        error_bound: 4.0,
        actual_bound: 0.0,
    };
    let eval = |round_id, privacy| {
        Ok(Assignment::Evaluate(EvalPlan {
            round_id,
            model_version: 1,
            n_params: spec().n_global(),
            seed: 3,
            privacy,
        }))
    };
    let (p, record) = strict(
        dir.path(),
        task,
        crate::policy::StorePolicy::default(),
        vec![eval(1, Some((eval_privacy, true))), eval(2, None)],
    );
    let outcome = p.run(CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.evaluations, 1, "the evaluation without privacy parameters is refused");
    let record = record.lock().unwrap();
    assert_eq!(record.reports.len(), 1);
    let exact = outcome.last_eval.unwrap();
    assert_eq!(exact.n_ratings, 1, "the store's own view is exact");
    assert_ne!(record.reports[0], exact, "what left is noised");
    let ledger = crate::ledger::Ledger::open(Some(dir.path())).unwrap();
    assert_eq!(ledger.entries().len(), 1);
    assert_eq!(
        (ledger.entries()[0].kind.as_str(), ledger.entries()[0].noise_multiplier),
        ("evaluate", 3.0)
    );
    let log = audit_kinds(dir.path());
    let metrics = log.iter().find(|e| e["kind"] == "metrics").unwrap();
    assert_eq!(metrics["privacy"]["noise_multiplier"], 3.0);
    assert!(log.iter().any(|e| e["kind"] == "refused" && e["rule"] == "consistent_privacy"));
}
