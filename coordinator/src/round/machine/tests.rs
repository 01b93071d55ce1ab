//! Tests of the round state machine: pure, with time passed in.

use super::*;
use crate::round::{Assignment, Reject, TrainSummary, Upload};
use fedretail_core::aggregate::AggregateError;
use fedretail_core::optim::ServerOptimizer;
use fedretail_core::plan::{ModelSpec, TaskSpec, TrainingPlan};
use proptest::prelude::*;
use std::time::Duration;

const N: usize = 4;

fn spec(cohort: u32, min: u32, rounds: u64) -> Arc<TaskSpec> {
    Arc::new(TaskSpec {
        name: "t".into(),
        model: ModelSpec::Bench { n_params: N },
        privacy: None,
        plan: TrainingPlan {
            rounds,
            cohort_size: cohort,
            min_clients: min,
            local_epochs: 1,
            clip_norm: 1.0,
            server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
            eval_every: 0,
            eval_fraction: 1.0,
            select_timeout_secs: 5.0,
            configure_timeout_secs: 10.0,
            collect_timeout_secs: 20.0,
            evaluate_timeout_secs: 30.0,
            seed: 7,
            weight_by_examples: true,
            secure_aggregation: Default::default(),
        },
    })
}

fn clients(n: u64) -> Vec<ClientId> {
    (1..=n).map(ClientId).collect()
}

fn upload(client: u64, round: RoundId, values: Vec<f32>) -> Upload {
    Upload {
        client: ClientId(client),
        round,
        values,
        weight: 1.0,
        summary: TrainSummary::default(),
    }
}

fn good(client: u64, round: RoundId) -> Upload {
    upload(client, round, vec![0.1, 0.2, 0.3, 0.4])
}

/// A round past selection, with every cohort member having fetched its plan.
fn collecting(cohort: u32, min: u32, rounds: u64, t0: Instant) -> Round {
    let mut r = Round::new(
        RoundId(9),
        1,
        spec(cohort, min, rounds),
        ModelVersion(3),
        t0,
        derive_seed(7, 1),
    );
    r.tick(t0, &clients(u64::from(cohort)));
    for c in clients(u64::from(cohort)) {
        assert!(matches!(r.poll(t0, c), Assignment::Train { .. }));
    }
    assert!(matches!(r.phase(), Phase::Collecting { .. }), "{:?}", r.phase());
    r
}

#[test]
fn selecting_waits_for_the_cohort_then_settles_for_the_quorum_at_its_deadline() {
    let t0 = Instant::now();
    let mut r = Round::new(RoundId(1), 1, spec(3, 2, 1), ModelVersion(0), t0, derive_seed(7, 1));
    r.tick(t0, &clients(1));
    assert!(matches!(r.phase(), Phase::Selecting { .. }));
    r.tick(t0 + Duration::from_secs(1), &clients(2));
    assert!(
        matches!(r.phase(), Phase::Selecting { .. }),
        "waits for the full cohort until the deadline"
    );
    r.tick(t0 + Duration::from_secs(5), &clients(2));
    assert!(matches!(r.phase(), Phase::Configuring { .. }));
    assert_eq!(r.summary().cohort_size, 2);
}

#[test]
fn the_cohort_is_a_seeded_sample_without_replacement() {
    let t0 = Instant::now();
    let pick = |order: Vec<ClientId>| {
        let mut r =
            Round::new(RoundId(1), 1, spec(3, 3, 1), ModelVersion(0), t0, derive_seed(7, 1));
        r.tick(t0, &order);
        r.cohort.clone()
    };
    let a = pick(clients(10));
    let mut reversed = clients(10);
    reversed.reverse();
    assert_eq!(a, pick(reversed), "arrival order does not matter");
    assert_eq!(a.len(), 3);
    let mut r = Round::new(RoundId(1), 2, spec(3, 3, 2), ModelVersion(0), t0, derive_seed(7, 2));
    r.tick(t0, &clients(10));
    assert_ne!(r.cohort, a, "another round index draws another cohort");
}

#[test]
fn configure_deadline_without_quorum_fails_and_applies_nothing() {
    let t0 = Instant::now();
    let mut r = Round::new(RoundId(1), 1, spec(3, 2, 1), ModelVersion(0), t0, derive_seed(7, 1));
    r.tick(t0, &clients(3));
    assert!(matches!(r.poll(t0, ClientId(1)), Assignment::Train { .. }));
    r.tick(t0 + Duration::from_secs(10), &clients(3));
    assert_eq!(*r.phase(), Phase::Failed(FailReason::TooFewAcks { acked: 1, min: 2 }));
    assert!(r.take_outputs().is_empty(), "a failed round emits no compute and no commit");
    assert_eq!(r.poll(t0, ClientId(2)), Assignment::Wait);
}

#[test]
fn configure_deadline_with_quorum_drops_the_silent_clients() {
    let t0 = Instant::now();
    let mut r = Round::new(RoundId(1), 1, spec(3, 2, 1), ModelVersion(0), t0, derive_seed(7, 1));
    r.tick(t0, &clients(3));
    let members: Vec<ClientId> = r.cohort.iter().copied().collect();
    r.poll(t0, members[0]);
    r.poll(t0, members[1]);
    r.tick(t0 + Duration::from_secs(10), &clients(3));
    assert!(matches!(r.phase(), Phase::Collecting { .. }));
    assert_eq!(r.begin_upload(members[2], RoundId(1)), Err(Reject::NotInCohort(members[2])));
    r.upload(good(members[0].0, RoundId(1))).unwrap();
    r.upload(good(members[1].0, RoundId(1))).unwrap();
    assert_eq!(*r.phase(), Phase::Aggregating, "everyone left in the cohort uploaded");
}

#[test]
fn collect_deadline_without_quorum_fails_and_applies_nothing() {
    let t0 = Instant::now();
    let mut r = collecting(3, 2, 1, t0);
    r.upload(good(1, RoundId(9))).unwrap();
    r.tick(t0 + Duration::from_secs(19), &clients(3));
    assert!(matches!(r.phase(), Phase::Collecting { .. }));
    r.tick(t0 + Duration::from_secs(20), &clients(3));
    assert_eq!(*r.phase(), Phase::Failed(FailReason::TooFewUploads { uploaded: 1, min: 2 }));
    assert!(r.take_outputs().is_empty());
    assert_eq!(r.summary().model_version, ModelVersion(3), "the base model stays");
}

#[test]
fn collect_deadline_with_quorum_aggregates_what_arrived() {
    let t0 = Instant::now();
    let mut r = collecting(3, 2, 1, t0);
    r.upload(good(1, RoundId(9))).unwrap();
    r.upload(upload(2, RoundId(9), vec![0.3, 0.0, 0.1, 0.0])).unwrap();
    r.tick(t0 + Duration::from_secs(20), &clients(3));
    let outputs = r.take_outputs();
    let sum = match <[Output; 1]>::try_from(outputs) {
        Ok([Output::Compute(Sum::Plain(sum), None)]) => sum,
        other => panic!("expected one compute, got {other:?}"),
    };
    let sum = sum.finish();
    assert_eq!(sum.n_updates(), 2);
    assert_eq!(sum.mean(), vec![0.2, 0.1, 0.2, 0.2]);
}

#[test]
fn bad_uploads_are_rejected_precisely_and_the_round_goes_on() {
    let t0 = Instant::now();
    let mut r = collecting(2, 2, 1, t0);
    let round = RoundId(9);
    assert_eq!(
        r.upload(upload(1, round, vec![0.0; 3])),
        Err(Reject::InvalidUpdate(AggregateError::WrongShape { expected: 4, got: 3 }))
    );
    assert_eq!(
        r.upload(upload(1, round, vec![f32::NAN, 0.0, 0.0, 0.0])),
        Err(Reject::InvalidUpdate(AggregateError::NonFinite))
    );
    assert!(matches!(
        r.upload(upload(1, round, vec![1.0, 1.0, 0.0, 0.0])),
        Err(Reject::InvalidUpdate(AggregateError::NotClipped { .. }))
    ));
    assert!(matches!(r.upload(good(1, RoundId(8))), Err(Reject::StaleRound { .. })));
    assert_eq!(r.upload(good(5, round)), Err(Reject::NotInCohort(ClientId(5))));
    r.upload(good(1, round)).unwrap();
    assert_eq!(r.upload(good(1, round)), Err(Reject::Duplicate(ClientId(1))));
    assert_eq!(r.begin_upload(ClientId(1), round), Err(Reject::Duplicate(ClientId(1))));
    assert_eq!(r.begin_upload(ClientId(2), round).map(|(n, _)| n), Ok(N));
    r.upload(good(2, round)).unwrap();
    assert_eq!(*r.phase(), Phase::Aggregating);
    assert_eq!(r.summary().n_rejected, 7);
    assert_eq!(r.summary().n_uploads, 2);
}

#[test]
fn evaluation_then_commit_and_metrics_are_optional() {
    let t0 = Instant::now();
    let mut r = collecting(2, 2, 1, t0);
    r.upload(good(1, RoundId(9))).unwrap();
    r.upload(good(2, RoundId(9))).unwrap();
    r.take_outputs();
    r.computed(t0, ModelVersion(4), &clients(2));
    assert!(matches!(r.phase(), Phase::Evaluating { .. }), "the last round evaluates");
    assert!(matches!(
        r.poll(t0, ClientId(1)),
        Assignment::Evaluate { version: ModelVersion(4), .. }
    ));
    let sums = EvalSums { n_ratings: 2, squared_error: 2.0, ..EvalSums::default() };
    r.report(ClientId(1), RoundId(9), &sums).unwrap();
    assert_eq!(r.report(ClientId(1), RoundId(9), &sums), Err(Reject::Duplicate(ClientId(1))));
    r.tick(t0 + Duration::from_secs(30), &clients(2));
    assert_eq!(*r.phase(), Phase::Committing, "the deadline commits with the reports that came");
    let outputs = r.take_outputs();
    let [Output::Commit(summary)] = &outputs[..] else {
        panic!("expected one commit, got {outputs:?}")
    };
    assert_eq!(summary.eval.map(|e| e.rmse()), Some(1.0));
    assert_eq!(summary.model_version, ModelVersion(4));
    r.fail(FailReason::Shutdown);
    assert_eq!(*r.phase(), Phase::Committing, "a commit in flight is never abandoned");
    r.stored(Err("disk full".into()));
    assert_eq!(*r.phase(), Phase::Failed(FailReason::Store("disk full".into())));
}

#[test]
fn rounds_that_do_not_evaluate_commit_at_once() {
    let t0 = Instant::now();
    let mut r = collecting(2, 2, 5, t0);
    r.upload(good(1, RoundId(9))).unwrap();
    r.upload(good(2, RoundId(9))).unwrap();
    r.take_outputs();
    r.computed(t0, ModelVersion(4), &clients(2));
    assert!(matches!(r.take_outputs()[..], [Output::Commit(_)]));
    r.stored(Ok(()));
    assert!(r.is_over());
    assert_eq!(*r.phase(), Phase::Committed);
}

#[derive(Debug, Clone)]
enum Event {
    Advance(u64),
    Poll(u64),
    Upload(u64, bool),
    Report(u64),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (1u64..25).prop_map(Event::Advance),
        (1u64..6).prop_map(Event::Poll),
        ((1u64..6), any::<bool>()).prop_map(|(c, ok)| Event::Upload(c, ok)),
        (1u64..6).prop_map(Event::Report),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    /// Whatever arrives in whatever order: at most one compute and one commit, never a commit
    /// without a quorum of accepted uploads, never a commit from a failed round, and phases only
    /// move forward.
    #[test]
    fn random_interleavings_keep_the_invariants(events in proptest::collection::vec(event(), 1..60)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut r = Round::new(RoundId(1), 1, spec(4, 2, 1), ModelVersion(0), t0, derive_seed(7, 1));
        let (mut computes, mut commits) = (0, 0);
        let order = |p: &Phase| match p {
            Phase::Selecting { .. } => 0, Phase::Configuring { .. } | Phase::Advertising { .. } => 1,
            Phase::Sharing { .. } => 2, Phase::Collecting { .. } => 3, Phase::Unmasking { .. } => 4,
            Phase::Aggregating => 5, Phase::Evaluating { .. } => 6, Phase::Committing => 7,
            Phase::Committed | Phase::Failed(_) => 8,
        };
        let mut last = 0;
        for e in events {
            match e {
                Event::Advance(s) => now += Duration::from_secs(s),
                Event::Poll(c) => { r.poll(now, ClientId(c)); }
                Event::Upload(c, ok) => {
                    let values = if ok { vec![0.1; N] } else { vec![f32::NAN; N] };
                    let _ = r.upload(upload(c, RoundId(1), values));
                }
                Event::Report(c) => { let _ = r.report(ClientId(c), RoundId(1), &EvalSums::default()); }
            }
            r.tick(now, &clients(5));
            for out in r.take_outputs() {
                match out {
                    Output::Compute(Sum::Plain(sum), _) => {
                        computes += 1;
                        prop_assert!(sum.n_updates() >= 2, "compute without quorum");
                        r.computed(now, ModelVersion(1), &clients(5));
                    }
                    Output::Compute(Sum::Masked(_), _) => prop_assert!(false, "masked without secure aggregation"),
                    Output::Commit(summary) => {
                        commits += 1;
                        prop_assert!(summary.n_uploads >= 2);
                        prop_assert!(summary.failure.is_none());
                        r.stored(Ok(()));
                    }
                }
            }
            let o = order(r.phase());
            prop_assert!(o >= last, "phase went back");
            last = o;
        }
        prop_assert!(computes <= 1 && commits <= 1);
        prop_assert!(commits <= computes);
        if let Phase::Failed(_) = r.phase() {
            prop_assert_eq!(commits, 0);
        }
    }
}

/// Issue 10 (L1): the seed a cohort member receives is the one set for local order, not the
/// seed that drew the cohort.
#[test]
fn cohort_members_get_the_local_seed_not_the_cohort_seed() {
    let t0 = Instant::now();
    let cohort_seed = derive_seed(7, 1);
    let mut r = Round::new(RoundId(1), 1, spec(2, 2, 1), ModelVersion(0), t0, cohort_seed);
    r.set_local_seed(cohort_seed ^ 0x5eed);
    r.tick(t0, &clients(2));
    match r.poll(t0, clients(2)[0]) {
        Assignment::Train { round_seed, .. } => assert_eq!(round_seed, cohort_seed ^ 0x5eed),
        other => panic!("{other:?}"),
    }
}

fn customer_privacy(max_stores_per_customer: u32) -> fedretail_core::privacy::PrivacySpec {
    use fedretail_core::privacy::accountant::AccountantKind;
    use fedretail_core::privacy::{NoisePlacement, PrivacySpec, PrivacyUnit};
    PrivacySpec {
        unit: PrivacyUnit::Customer,
        noise_placement: NoisePlacement::Distributed,
        target_epsilon: 4.0,
        delta: 1e-5,
        sampling_rate: 0.5,
        noise_multiplier: Some(2.0),
        population: Some(10),
        adaptive_clipping: None,
        accountant: AccountantKind::Rdp,
        domain: "d".into(),
        evaluation_epsilon: 1.0,
        evaluation_noise_multiplier: Some(5.0),
        max_stores_per_customer,
    }
}

/// Issue 10 (M3): a customer who shops in k stores is clipped by each of them, so the noise
/// is scaled by k: the guarantee is per customer, not per (customer, store) pair.
#[test]
fn customers_in_several_stores_get_noise_for_all_of_them() {
    let noise_std = |k: u32| {
        let mut s = (*spec(2, 2, 1)).clone();
        s.privacy = Some(customer_privacy(k));
        let t0 = Instant::now();
        let mut r = Round::new(RoundId(1), 1, Arc::new(s), ModelVersion(0), t0, derive_seed(7, 1));
        r.tick(t0, &clients(2));
        match r.poll(t0, clients(2)[0]) {
            Assignment::Train { privacy: Some(p), .. } => p.noise_std,
            other => panic!("{other:?}"),
        }
    };
    let one = noise_std(1);
    assert!(one > 0.0);
    assert!((noise_std(3) / one - 3.0).abs() < 1e-9);
}

/// Issue 11: under customer-level privacy the ranking recommender's uploads carry its
/// statistics after the model's coordinates; the stores still fetch and train the model alone.
#[test]
fn ranking_uploads_under_customer_privacy_carry_the_statistics() {
    use fedretail_core::model::mf::{MfModel, MfSpec, Objective};
    let mf = MfSpec {
        n_items: 3,
        dim: 2,
        learning_rate: 0.5,
        regularization: 1.0,
        init_std: 0.1,
        rating_min: 0.0,
        rating_max: 1.0,
        init_mean: 0.0,
        local_item_offsets: None,
        objective: Objective::Ranking { alpha: 1.0, item_regularization: 0.01 },
        category_affinity: None,
    };
    let (n_params, stats) = (mf.n_global(), MfModel::new(mf.clone()).statistics_len());
    assert_eq!(stats, 6, "the upper triangle of a 3 × 3 matrix");
    let mut s = (*spec(2, 2, 1)).clone();
    s.model = ModelSpec::MatrixFactorization(mf);
    s.privacy = Some(customer_privacy(1));
    let t0 = Instant::now();
    let mut r = Round::new(RoundId(9), 1, Arc::new(s), ModelVersion(0), t0, derive_seed(7, 1));
    r.tick(t0, &clients(2));
    for c in clients(2) {
        match r.poll(t0, c) {
            Assignment::Train { n_params: n, .. } => assert_eq!(n, n_params),
            other => panic!("{other:?}"),
        }
    }
    let round = RoundId(9);
    assert_eq!(r.begin_upload(ClientId(1), round).map(|(n, _)| n), Ok(n_params + stats));
    assert_eq!(
        r.upload(upload(1, round, vec![0.0; n_params])),
        Err(Reject::InvalidUpdate(AggregateError::WrongShape {
            expected: n_params + stats,
            got: n_params
        }))
    );
    r.upload(upload(1, round, vec![0.01; n_params + stats])).unwrap();
}

/// Issue 12: the secure-aggregation phases, pure, with time passed in. Of six stores, one
/// never advertises (Advertising closes at its deadline with a quorum), one shares keys and
/// never uploads (Collecting closes at its deadline; its masks are recovered), and the
/// survivors' revealed shares unmask exactly the sum of their quantised inputs. A plaintext
/// upload is refused in such a round.
#[test]
fn secure_aggregation_phases_close_on_deadlines_with_a_quorum_and_unmask_the_survivors() {
    use fedretail_core::secagg::keys::SigningKey;
    use fedretail_core::secagg::protocol::{Client, Identity, ed25519};
    let mut plan = (*spec(6, 3, 1)).clone();
    plan.plan.secure_aggregation = fedretail_core::plan::SecureAggregation::SecAggPlus;
    plan.plan.weight_by_examples = false;
    let t0 = Instant::now();
    let mut r = Round::new(RoundId(1), 1, Arc::new(plan), ModelVersion(0), t0, 7);
    r.tick(t0, &clients(6));
    assert_eq!(r.phase().name(), "Advertising");
    let mut rng = fedretail_core::privacy::noise::os_seeded();
    let ids: Vec<SigningKey> = (0..6u8).map(|i| SigningKey::from_seed(&[i + 1; 32])).collect();
    let mut parties: Vec<Option<Client>> = (0..6).map(|_| None).collect();
    let mut params = None;
    for c in 1..=5u64 {
        let Assignment::Advertise { round, params: p, index, .. } = r.poll(t0, ClientId(c)) else {
            panic!("expected keys")
        };
        let (client, advert) =
            Client::new(p.context(round.0), index, &ids[index as usize], &mut rng);
        parties[index as usize] = Some(client);
        r.advertise(t0, ClientId(c), round, advert, Identity::Key(ids[index as usize].public()))
            .unwrap();
        params = Some(p);
    }
    let params = params.unwrap();
    assert_eq!(r.phase().name(), "Advertising", "waits for the sixth until the deadline");
    let t1 = t0 + Duration::from_secs(11);
    r.tick(t1, &clients(6));
    assert_eq!(r.phase().name(), "Sharing");
    for c in 1..=5u64 {
        let Assignment::ShareKeys { round, adverts } = r.poll(t1, ClientId(c)) else {
            panic!("expected shares")
        };
        let keys: std::collections::BTreeMap<u32, [u8; 32]> = adverts
            .iter()
            .map(|(a, id)| match id {
                Identity::Key(k) => (a.index, *k),
                Identity::Certificate(_) => unreachable!(),
            })
            .collect();
        let list: Vec<_> = adverts.into_iter().map(|(a, _)| a).collect();
        let index = (c - 1) as usize; // clients 1..=6 sort to indices 0..=5
        let sealed = parties[index]
            .as_mut()
            .unwrap()
            .share_keys(&list, ed25519(|i| keys.get(&i).copied()), &mut rng)
            .unwrap();
        r.share(t1, ClientId(c), round, sealed).unwrap();
    }
    assert_eq!(r.phase().name(), "Collecting", "every advertiser shared");
    let plain = upload(1, RoundId(1), vec![0.1; N]);
    assert!(matches!(r.upload(plain), Err(Reject::Malformed(_))), "only masked uploads");
    let mut expected = vec![0u32; params.masked_len()];
    for c in 1..=4u64 {
        let Assignment::Train { masked: Some(m), round, .. } = r.poll(t1, ClientId(c)) else {
            panic!("expected a masked plan")
        };
        let input: Vec<u32> = (0..params.masked_len() as u32).map(|j| j * 7 + c as u32).collect();
        fedretail_core::secagg::sum::add_wrapping(&mut expected, &input);
        let y =
            parties[(c - 1) as usize].as_mut().unwrap().masked_input(&m.shares, &input).unwrap();
        let masked = MaskedUpload {
            client: ClientId(c),
            round,
            values: y,
            summary: TrainSummary::default(),
        };
        r.masked_upload(t1, masked).unwrap();
    }
    let t2 = t1 + Duration::from_secs(21);
    r.tick(t2, &clients(6));
    assert_eq!(r.phase().name(), "Unmasking");
    for c in 1..=4u64 {
        let Assignment::Unmask { round, survivors, dropped } = r.poll(t2, ClientId(c)) else {
            panic!("expected unmasking")
        };
        assert_eq!((survivors.as_slice(), dropped.as_slice()), (&[0, 1, 2, 3][..], &[4][..]));
        let revealed =
            parties[(c - 1) as usize].as_mut().unwrap().unmask(&survivors, &dropped).unwrap();
        r.reveal(ClientId(c), round, revealed).unwrap();
    }
    let mut outputs = r.take_outputs();
    assert_eq!(outputs.len(), 1);
    let Some(Output::Compute(Sum::Masked(masked), None)) = outputs.pop() else {
        panic!("expected one masked compute")
    };
    let summary = r.summary().secure.unwrap();
    assert_eq!(
        (summary.cohort, summary.dropped_before_advertising, summary.dropped_before_upload),
        (6, 1, 1)
    );
    let sum = masked.unmasker.finish(&masked.revealed).unwrap();
    assert_eq!(sum, expected, "the survivors' inputs, summed mod 2^32");
}
