//! Driver tests under paused time: deadlines pass instantly and deterministically.

use crate::round::{Assignment, TrainSummary, Upload};
use crate::store::MemoryStore;
use crate::store::Store;
use crate::tasks::Tasks;
use fedretail_core::ids::{ClientId, ModelVersion, RoundId};
use fedretail_core::optim::ServerOptimizer;
use fedretail_core::plan::{ModelSpec, TaskSpec, TrainingPlan};
use fedretail_core::privacy::accountant::{Accountant, AccountantKind, Charge, PldAccountant};
use fedretail_core::privacy::{NoisePlacement, PrivacySpec, PrivacyUnit};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn spec(rounds: u64) -> TaskSpec {
    TaskSpec {
        name: "t".into(),
        model: ModelSpec::Bench { n_params: 3 },
        privacy: None,
        plan: TrainingPlan {
            rounds,
            cohort_size: 2,
            min_clients: 2,
            local_epochs: 1,
            clip_norm: 1.0,
            server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
            eval_every: 0,
            eval_fraction: 1.0,
            select_timeout_secs: 5.0,
            configure_timeout_secs: 10.0,
            collect_timeout_secs: 20.0,
            evaluate_timeout_secs: 30.0,
            seed: 1,
            weight_by_examples: false,
            secure_aggregation: Default::default(),
        },
    }
}

struct Fixture {
    handle: crate::round::RoundHandle,
    store: Arc<MemoryStore>,
    clients: [ClientId; 2],
    _cancel: CancellationToken,
}

async fn start(rounds: u64) -> Fixture {
    start_with(spec(rounds)).await
}

fn private_spec(rounds: u64) -> TaskSpec {
    let mut s = spec(rounds);
    s.privacy = Some(PrivacySpec {
        unit: PrivacyUnit::Client,
        noise_placement: NoisePlacement::Central,
        target_epsilon: 5.0,
        delta: 1e-5,
        sampling_rate: 1.0,
        noise_multiplier: None,
        population: None,
        adaptive_clipping: None,
        accountant: AccountantKind::Rdp,
        domain: fedretail_core::privacy::default_domain(),
        evaluation_epsilon: fedretail_core::privacy::default_evaluation_epsilon(),
        evaluation_noise_multiplier: None,
        max_stores_per_customer: 1,
    });
    s
}

async fn start_with(spec: TaskSpec) -> Fixture {
    let (tasks, store, cancel) = tasks_with_ceiling(f64::INFINITY);
    let id = tasks.create(spec).unwrap();
    let handle = tasks.get(id).unwrap();
    let a = handle.enroll("a".into()).await.unwrap();
    let b = handle.enroll("b".into()).await.unwrap();
    Fixture { handle, store, clients: [a, b], _cancel: cancel }
}

async fn train(f: &Fixture, client: ClientId) -> RoundId {
    match f.handle.poll(client, Duration::from_secs(1)).await.unwrap() {
        Assignment::Train { round, version, n_params: 3, .. } => {
            assert_eq!(version, ModelVersion(0));
            round
        }
        other => panic!("expected a training assignment, got {other:?}"),
    }
}

async fn send(f: &Fixture, client: ClientId, round: RoundId, values: Vec<f32>) {
    f.handle.begin_upload(client, round).await.unwrap();
    let upload = Upload { client, round, values, weight: 1.0, summary: TrainSummary::default() };
    f.handle.upload(upload).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_round_that_misses_its_quorum_fails_and_applies_nothing() {
    let f = start(1).await;
    let round = train(&f, f.clients[0]).await;
    assert_eq!(train(&f, f.clients[1]).await, round);
    send(&f, f.clients[0], round, vec![0.5, 0.0, 0.0]).await;
    tokio::time::sleep(Duration::from_secs(21)).await;
    let status = f.handle.status(10).await.unwrap();
    assert_eq!((status.committed_rounds, status.failed_rounds), (0, 1));
    assert_eq!(status.model_version, ModelVersion(0));
    let failed = status.rounds.iter().find(|r| r.round == round).unwrap();
    assert_eq!(
        failed.failure.as_deref(),
        Some("collect deadline passed with 1 of the 2 required uploads")
    );
    assert_eq!(f.handle.latest_model().await.unwrap().values, vec![0.0; 3], "nothing applied");
    // The next round starts with a fresh id; the stale one is refused.
    let next = train(&f, f.clients[0]).await;
    assert!(next > round);
    assert!(matches!(
        f.handle.begin_upload(f.clients[0], round).await,
        Err(crate::round::Reject::StaleRound { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_full_round_applies_the_mean_and_the_task_finishes() {
    let f = start(1).await;
    let round = train(&f, f.clients[0]).await;
    train(&f, f.clients[1]).await;
    send(&f, f.clients[0], round, vec![0.5, 0.0, 0.25]).await;
    send(&f, f.clients[1], round, vec![0.0, 0.5, 0.25]).await;
    // The last round evaluates; nobody reports, so its deadline commits it.
    tokio::time::sleep(Duration::from_secs(31)).await;
    let status = f.handle.status(10).await.unwrap();
    assert_eq!(status.committed_rounds, 1);
    assert_eq!(status.state, crate::round::TaskState::Finished);
    let model = f.handle.latest_model().await.unwrap();
    assert_eq!((model.version, model.values.clone()), (ModelVersion(1), vec![0.25, 0.25, 0.25]));
    assert!(matches!(
        f.handle.poll(f.clients[0], Duration::ZERO).await.unwrap(),
        Assignment::Finished { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_failed_commit_fails_the_round_and_the_next_one_commits() {
    let f = start(2).await;
    f.store.fail_next_commits(1);
    let round = train(&f, f.clients[0]).await;
    train(&f, f.clients[1]).await;
    send(&f, f.clients[0], round, vec![0.5, 0.0, 0.0]).await;
    send(&f, f.clients[1], round, vec![0.5, 0.0, 0.0]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let status = f.handle.status(10).await.unwrap();
    assert_eq!((status.committed_rounds, status.failed_rounds), (0, 1));
    assert!(
        status.rounds[1].failure.as_deref().unwrap().starts_with("could not commit"),
        "{:?}",
        status.rounds
    );
    assert_eq!(f.handle.latest_model().await.unwrap().version, ModelVersion(0));

    let round = train(&f, f.clients[0]).await;
    train(&f, f.clients[1]).await;
    send(&f, f.clients[0], round, vec![0.5, 0.0, 0.0]).await;
    send(&f, f.clients[1], round, vec![0.5, 0.0, 0.0]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let status = f.handle.status(10).await.unwrap();
    assert_eq!(status.committed_rounds, 1);
    assert_eq!(f.handle.latest_model().await.unwrap().values, vec![0.5, 0.0, 0.0]);
}

#[tokio::test(start_paused = true)]
async fn unknown_clients_are_refused() {
    let f = start(1).await;
    let stranger = ClientId(12345);
    assert_eq!(
        f.handle.poll(stranger, Duration::ZERO).await,
        Err(crate::round::Reject::UnknownClient(stranger))
    );
}

#[tokio::test(start_paused = true)]
async fn a_private_round_is_charged_before_its_model_can_be_fetched() {
    let f = start_with(private_spec(1)).await;
    let round = train(&f, f.clients[0]).await;
    train(&f, f.clients[1]).await;
    send(&f, f.clients[0], round, vec![0.5, 0.0, 0.25]).await;
    send(&f, f.clients[1], round, vec![0.0, 0.5, 0.25]).await;
    // The first moment anything derived from the noised sum is reachable: the evaluation.
    let version = match f.handle.poll(f.clients[0], Duration::from_secs(1)).await.unwrap() {
        Assignment::Evaluate { version, .. } => version,
        other => panic!("expected an evaluation, got {other:?}"),
    };
    let task = f.handle.task();
    let ledger = f.store.load(task).unwrap().unwrap().ledger;
    // The training charge, and the evaluation's (issue 10, H1), both before anything is out.
    assert_eq!(ledger.len(), 2, "charged before the candidate could be fetched");
    assert_eq!(ledger[0].kind, fedretail_core::privacy::ChargeKind::Train);
    assert_eq!(ledger[0].round, round);
    assert!(ledger[0].noise_multiplier > 0.5, "calibrated z {}", ledger[0].noise_multiplier);
    let candidate = f.handle.model(f.clients[0], version).await.unwrap();
    // The exact mean (sum / expected count 2) would be [0.25, 0.25, 0.25]; noise of standard
    // deviation z·C / 2 per coordinate moves it.
    assert_ne!(candidate.values, vec![0.25, 0.25, 0.25]);
    let status = f.handle.status(1).await.unwrap();
    let report = status.privacy.unwrap();
    assert_eq!(report.rounds, 1);
    assert!(report.epsilon > 0.0 && report.epsilon <= report.target_epsilon, "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_pld_task_calibrates_less_noise_and_reports_its_accountant() {
    let rdp = start_with(private_spec(2)).await;
    let rdp_z = rdp.handle.status(0).await.unwrap().privacy.unwrap().noise_multiplier;
    let mut spec = private_spec(2);
    spec.privacy.as_mut().unwrap().accountant = AccountantKind::Pld;
    let f = start_with(spec).await;
    let z = f.handle.status(0).await.unwrap().privacy.unwrap().noise_multiplier;
    assert!(z < 0.95 * rdp_z, "pld z {z} against rdp z {rdp_z}");
    let round = train(&f, f.clients[0]).await;
    train(&f, f.clients[1]).await;
    send(&f, f.clients[0], round, vec![0.5, 0.0, 0.25]).await;
    send(&f, f.clients[1], round, vec![0.0, 0.5, 0.25]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let report = f.handle.status(1).await.unwrap().privacy.unwrap();
    assert_eq!(report.accountant, AccountantKind::Pld);
    assert_eq!(report.rounds, 1);
    // The PLD bound after one of two rounds, as the accountant computes it.
    assert_eq!(f.store.load(f.handle.task()).unwrap().unwrap().ledger[0].noise_multiplier, z);
    let one = Charge { sampling_rate: 1.0, noise_multiplier: z, rounds: 1 };
    let expected = PldAccountant::default().epsilon(&[one], 1e-5).unwrap().epsilon;
    assert!((report.epsilon - expected).abs() < 1e-12, "{report:?} against {expected}");
    assert!(report.epsilon < report.target_epsilon);
}

#[tokio::test(start_paused = true)]
async fn charged_rounds_that_fail_still_count_and_the_budget_ends_the_task() {
    let f = start_with(private_spec(2)).await;
    // Round 1 is charged, then its commit fails: the charge stays.
    f.store.fail_next_commits(1);
    for _ in 0..2 {
        let round = train(&f, f.clients[0]).await;
        train(&f, f.clients[1]).await;
        send(&f, f.clients[0], round, vec![0.1, 0.0, 0.0]).await;
        send(&f, f.clients[1], round, vec![0.1, 0.0, 0.0]).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = f.handle.status(10).await.unwrap();
    assert_eq!((status.committed_rounds, status.failed_rounds), (1, 1));
    assert_eq!(status.state, crate::round::TaskState::BudgetExhausted, "{}", status.state_reason);
    assert!(
        status.state_reason.starts_with("privacy budget exhausted: 2 rounds charged"),
        "{}",
        status.state_reason
    );
    assert_eq!(status.privacy.unwrap().rounds, 2);
    assert!(matches!(
        f.handle.poll(f.clients[0], Duration::ZERO).await.unwrap(),
        Assignment::Finished { .. }
    ));
}

/// A Tasks registry with a ceiling on every privacy domain.
fn tasks_with_ceiling(ceiling: f64) -> (Arc<Tasks>, Arc<MemoryStore>, CancellationToken) {
    let store = Arc::new(MemoryStore::new());
    let cancel = CancellationToken::new();
    let config = super::DriverConfig {
        liveness_timeout: Duration::from_secs(600),
        deterministic: true,
        max_clients: 10_000,
        domain_epsilon: ceiling,
        domain_delta: 1e-5,
    };
    let (tasks, drivers) = Tasks::resume(
        store.clone(),
        config,
        crate::policy::Policy::permissive(),
        true,
        cancel.clone(),
    )
    .unwrap();
    std::mem::forget(drivers);
    (tasks, store, cancel)
}

async fn run_rounds(handle: &crate::round::RoundHandle, clients: [ClientId; 2], rounds: usize) {
    for _ in 0..rounds {
        let mut round = None;
        for c in clients {
            match handle.poll(c, Duration::from_secs(1)).await.unwrap() {
                Assignment::Train { round: r, .. } => round = Some(r),
                other => panic!("expected training, got {other:?}"),
            }
        }
        let round = round.unwrap();
        for c in clients {
            handle.begin_upload(c, round).await.unwrap();
            let upload = Upload {
                client: c,
                round,
                values: vec![0.1, 0.0, 0.0],
                weight: 1.0,
                summary: TrainSummary::default(),
            };
            handle.upload(upload).await.unwrap();
        }
        // The last round evaluates; nobody reports, so its deadline (30 s) commits it.
        tokio::time::sleep(Duration::from_secs(31)).await;
    }
}

/// Issue 10 (H4): a new task name over the same data is not a new budget. Two tasks of one
/// privacy domain share the coordinator's ceiling, checked in the transaction that charges.
#[tokio::test(start_paused = true)]
async fn tasks_of_one_privacy_domain_share_one_budget() {
    let (tasks, store, _cancel) = tasks_with_ceiling(6.0);
    let mut first = private_spec(2);
    first.name = "first".into();
    let mut second = private_spec(2);
    second.name = "renamed".into();
    let a = tasks.get(tasks.create(first).unwrap()).unwrap();
    let clients = [a.enroll("s1".into()).await.unwrap(), a.enroll("s2".into()).await.unwrap()];
    run_rounds(&a, clients, 2).await;
    let done = a.status(10).await.unwrap();
    assert_eq!(done.state, crate::round::TaskState::Finished, "{}", done.state_reason);
    let spent = done.privacy.as_ref().unwrap().domain_epsilon.unwrap();
    // Training (5.0 of its own budget) and its evaluation, composed.
    assert!(spent > 5.0 && spent < 6.0, "the domain has spent {spent}");

    // Same domain, new name: its first charge would take the domain over 6.
    let b = tasks.get(tasks.create(second).unwrap()).unwrap();
    let clients = [b.enroll("s1".into()).await.unwrap(), b.enroll("s2".into()).await.unwrap()];
    run_rounds(&b, clients, 1).await;
    let status = b.status(10).await.unwrap();
    assert_eq!(status.state, crate::round::TaskState::BudgetExhausted, "{}", status.state_reason);
    assert!(status.state_reason.contains("privacy domain \"default\""), "{}", status.state_reason);
    assert_eq!((status.committed_rounds, status.failed_rounds), (0, 1), "nothing was released");
    assert!(store.load(b.task()).unwrap().unwrap().ledger.is_empty(), "and nothing charged");

    // Another domain is another budget.
    let mut other = private_spec(2);
    other.name = "elsewhere".into();
    other.privacy.as_mut().unwrap().domain = "other-stores".into();
    let c = tasks.get(tasks.create(other).unwrap()).unwrap();
    let clients = [c.enroll("s3".into()).await.unwrap(), c.enroll("s4".into()).await.unwrap()];
    run_rounds(&c, clients, 2).await;
    assert_eq!(c.status(0).await.unwrap().state, crate::round::TaskState::Finished);
}

/// Issue 10 (M2): a Poisson draw below the quorum is not redrawn for free: the round fails,
/// releases nothing, and is charged at the rate that was sampled.
#[tokio::test(start_paused = true)]
async fn a_poisson_draw_below_the_quorum_fails_and_is_charged() {
    let mut spec = private_spec(3);
    spec.privacy.as_mut().unwrap().sampling_rate = 0.01;
    spec.privacy.as_mut().unwrap().target_epsilon = 8.0;
    let f = start_with(spec).await;
    // Both stores are connected: every round samples at once, and with q = 0.01 each draw falls
    // below the quorum of 2, until the charged draws exhaust the budget.
    for c in f.clients {
        f.handle.poll(c, Duration::from_millis(1)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let status = f.handle.status(10).await.unwrap();
    assert!(status.failed_rounds >= 1, "{status:?}");
    assert_eq!(status.state, crate::round::TaskState::BudgetExhausted, "{}", status.state_reason);
    let failure = status.rounds.iter().find_map(|r| r.failure.clone()).unwrap();
    assert!(failure.contains("the draw is charged"), "{failure}");
    assert!(!failure.contains(" 0 ") && !failure.contains(" 1 "), "no drawn count: {failure}");
    let ledger = f.store.load(f.handle.task()).unwrap().unwrap().ledger;
    assert_eq!(ledger.len() as u64, status.failed_rounds, "every failed draw is charged");
    assert_eq!(ledger[0].sampling_rate, 0.01);
    assert_eq!(status.model_version, ModelVersion(0), "nothing applied");
}

/// Issue 10 (H1): under privacy an evaluating round is charged for its evaluation before any
/// store is asked, the stores are told how to bound and noise, status never shows a sum in
/// progress, and fewer reports than the quorum are withheld.
#[tokio::test(start_paused = true)]
async fn private_evaluation_is_charged_first_and_never_shown_alone() {
    let f = start_with(private_spec(1)).await;
    let round = train(&f, f.clients[0]).await;
    train(&f, f.clients[1]).await;
    send(&f, f.clients[0], round, vec![0.1, 0.0, 0.0]).await;
    send(&f, f.clients[1], round, vec![0.0, 0.1, 0.0]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let ledger = f.store.load(f.handle.task()).unwrap().unwrap().ledger;
    let kinds: Vec<_> = ledger.iter().map(|e| e.kind).collect();
    use fedretail_core::privacy::ChargeKind;
    assert_eq!(kinds, [ChargeKind::Train, ChargeKind::Evaluate], "both charged before evaluation");
    let Assignment::Evaluate { privacy: Some((p, per_customer)), .. } =
        f.handle.poll(f.clients[0], Duration::from_secs(1)).await.unwrap()
    else {
        panic!("an evaluation with privacy parameters")
    };
    assert!(!per_customer);
    assert_eq!(p.noise_multiplier, ledger[1].noise_multiplier);
    assert_eq!(p.count_bound, 1, "a store reports its means under store-level privacy");
    let sums = fedretail_core::model::metrics::EvalSums {
        n_ratings: 3,
        squared_error: 2.0,
        ..Default::default()
    };
    f.handle.report(f.clients[0], round, sums).await.unwrap();
    let during = f.handle.status(1).await.unwrap();
    assert_eq!(during.rounds[0].eval, None, "no sum in progress is shown");
    // The other store never reports: one report is below the quorum of 2, so it is withheld.
    tokio::time::sleep(Duration::from_secs(31)).await;
    let after = f.handle.status(1).await.unwrap();
    assert_eq!(after.committed_rounds, 1);
    assert_eq!(after.rounds[0].eval, None, "a lone store's report is never published");
    let report = after.privacy.unwrap();
    assert_eq!(report.evaluation_rounds, 1);
    assert!(
        report.evaluation_epsilon > 0.0
            && report.evaluation_epsilon <= report.evaluation_budget + 1e-9
    );
    assert!(report.total_epsilon > report.epsilon);
}

/// Issue 10 (L9): under customer-level privacy μ is fixed; the coordinator's noise leaves it
/// alone, so the released μ stays exactly the task's.
#[tokio::test(start_paused = true)]
async fn customer_level_noise_leaves_the_fixed_mean_alone() {
    use fedretail_core::model::mf::MfSpec;
    let mut spec = private_spec(1);
    let mf = MfSpec {
        n_items: 1,
        dim: 1,
        learning_rate: 0.01,
        regularization: 0.0,
        init_std: 0.1,
        rating_min: 1.0,
        rating_max: 5.0,
        init_mean: 3.5,
        local_item_offsets: None,
        objective: fedretail_core::model::mf::Objective::Rating,
        category_affinity: None,
    };
    spec.model = ModelSpec::MatrixFactorization(mf);
    let p = spec.privacy.as_mut().unwrap();
    p.unit = PrivacyUnit::Customer;
    p.population = Some(10);
    let f = start_with(spec).await;
    let mut round = None;
    for c in f.clients {
        if let Assignment::Train { round: r, .. } =
            f.handle.poll(c, Duration::from_secs(1)).await.unwrap()
        {
            round = Some(r);
        }
    }
    let round = round.unwrap();
    for c in f.clients {
        f.handle.begin_upload(c, round).await.unwrap();
        let upload = Upload {
            client: c,
            round,
            values: vec![0.0, 0.1, 0.1],
            weight: 1.0,
            summary: TrainSummary::default(),
        };
        f.handle.upload(upload).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(31)).await;
    let model = f.handle.latest_model().await.unwrap();
    assert_eq!(model.version, ModelVersion(1));
    assert_eq!(model.values[0], 3.5, "μ is released without noise");
}

/// Issue 10 (L8): the mean training loss is shown only once the round is over, so it cannot be
/// differenced upload by upload.
#[tokio::test(start_paused = true)]
async fn the_training_loss_is_shown_only_when_the_round_is_over() {
    let f = start(1).await;
    let round = train(&f, f.clients[0]).await;
    train(&f, f.clients[1]).await;
    f.handle.begin_upload(f.clients[0], round).await.unwrap();
    let summary = TrainSummary { n_examples: 10, train_loss: 0.7, ..TrainSummary::default() };
    let upload =
        Upload { client: f.clients[0], round, values: vec![0.1, 0.0, 0.0], weight: 1.0, summary };
    f.handle.upload(upload).await.unwrap();
    let during = f.handle.status(1).await.unwrap();
    assert_eq!(during.rounds[0].mean_train_loss, 0.0, "one store's loss would stand alone");
    send(&f, f.clients[1], round, vec![0.0, 0.1, 0.0]).await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    let after = f.handle.status(1).await.unwrap();
    assert!(after.rounds[0].mean_train_loss > 0.0);
}

/// Issue 10 (H9): the registry is bounded, and a store that enrols again replaces its old id
/// instead of taking another place.
#[tokio::test(start_paused = true)]
async fn the_registry_is_bounded_and_a_store_holds_one_place() {
    let store = Arc::new(MemoryStore::new());
    let cancel = CancellationToken::new();
    let config = super::DriverConfig {
        liveness_timeout: Duration::from_secs(600),
        deterministic: true,
        max_clients: 2,
        domain_epsilon: f64::INFINITY,
        domain_delta: 1e-5,
    };
    let (tasks, _drivers) =
        Tasks::resume(store, config, crate::policy::Policy::permissive(), true, cancel.clone())
            .unwrap();
    let handle = tasks.get(tasks.create(spec(1)).unwrap()).unwrap();
    let first = handle.enroll("a".into()).await.unwrap();
    let again = handle.enroll("a".into()).await.unwrap();
    assert_ne!(first, again);
    assert!(matches!(
        handle.check_owner(first, "a".into()).await,
        Err(crate::round::Reject::UnknownClient(_))
    ));
    handle.check_owner(again, "a".into()).await.unwrap();
    assert!(matches!(
        handle.check_owner(again, "b".into()).await,
        Err(crate::round::Reject::NotYours(_))
    ));
    handle.enroll("b".into()).await.unwrap();
    assert_eq!(handle.enroll("c".into()).await, Err(crate::round::Reject::TooManyClients(2)));
}

/// H8: a candidate that is not finite (here a legal but absurd server learning rate overflows
/// f32 in the second round) is never committed or served; the round fails and says why.
#[tokio::test(start_paused = true)]
async fn a_candidate_that_is_not_finite_is_never_committed() {
    let mut s = spec(2);
    s.plan.server_optimizer = ServerOptimizer::FedAvg { learning_rate: 3e38 };
    s.plan.eval_every = 0;
    let f = start_with(s).await;
    let round = train(&f, f.clients[0]).await;
    train(&f, f.clients[1]).await;
    send(&f, f.clients[0], round, vec![1.0, 0.0, 0.0]).await;
    send(&f, f.clients[1], round, vec![1.0, 0.0, 0.0]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let first = f.handle.latest_model().await.unwrap();
    assert_eq!((first.version, first.values[0]), (ModelVersion(1), 3e38), "finite: committed");

    let round = match f.handle.poll(f.clients[0], Duration::from_secs(1)).await.unwrap() {
        Assignment::Train { round, .. } => round,
        other => panic!("expected a training assignment, got {other:?}"),
    };
    f.handle.poll(f.clients[1], Duration::from_secs(1)).await.unwrap();
    send(&f, f.clients[0], round, vec![1.0, 0.0, 0.0]).await;
    send(&f, f.clients[1], round, vec![1.0, 0.0, 0.0]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let status = f.handle.status(10).await.unwrap();
    let failed = status.rounds.iter().find(|r| r.round == round).unwrap();
    assert_eq!(
        failed.failure.as_deref(),
        Some("the candidate model is not finite; nothing applied"),
        "{:?}",
        status.rounds
    );
    let served = f.handle.latest_model().await.unwrap();
    assert_eq!(served.version, ModelVersion(1), "the overflowed candidate is not served");
    assert!(served.values.iter().all(|v| v.is_finite()));
    assert!(f.handle.model(f.clients[0], ModelVersion(2)).await.is_err());
}

/// L3: administrators have their own queue, served first, so a task's status answers at once
/// even behind a full queue of store requests.
#[tokio::test(start_paused = true)]
async fn an_operator_is_served_before_a_flood_of_store_requests() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let f = start(1).await;
    let done = Arc::new(AtomicUsize::new(0));
    let flood = 3 * super::INBOX;
    let mut stores = Vec::new();
    for _ in 0..flood {
        let (handle, done) = (f.handle.clone(), done.clone());
        stores.push(tokio::spawn(async move {
            let _ = handle.check_owner(ClientId(1), "a".into()).await;
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    // Let every store request reach the driver's queue (or wait for room in it).
    tokio::task::yield_now().await;
    let handle = f.handle.clone();
    let status = tokio::spawn(async move {
        handle.status(1).await.unwrap();
    });
    let served_before = loop {
        tokio::task::yield_now().await;
        if status.is_finished() {
            break done.load(Ordering::SeqCst);
        }
    };
    assert!(
        served_before < super::INBOX / 4,
        "{served_before} of {flood} store requests were served before the operator"
    );
    for s in stores {
        s.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), flood);
}
