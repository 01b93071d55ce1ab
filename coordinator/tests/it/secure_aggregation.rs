//! Secure aggregation end to end over gRPC and mTLS (issue 12): ten stores, three of them
//! vanishing in the middle of a round; the round commits, and the model moves by exactly the
//! mean of the survivors' inputs although the coordinator never saw one of them.

use crate::support::{channel, start_secured};
use fedretail_client::identity::{self, StoreSigner};
use fedretail_client::transport::{Assignment, GrpcTransport, StoreTls, Transport};
use fedretail_coordinator::config::Security;
use fedretail_coordinator::pki::{self, Role};
use fedretail_coordinator::tls::TlsFiles;
use fedretail_core::plan::{ModelSpec, SecureAggregation, TaskSpec, TrainingPlan};
use fedretail_core::secagg::ddg::Encoder;
use fedretail_core::secagg::protocol::{Client, Identity};
use fedretail_proto::pb;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;

const N_PARAMS: usize = 300;

/// A coordinator over mTLS with a throwaway PKI: certificates for `stores` and an operator.
struct Deployment {
    _dir: tempfile::TempDir,
    pki: pki::PkiDir,
    c: crate::support::TestCoordinator,
    admin: pb::admin_client::AdminClient<tonic::transport::Channel>,
}

async fn deployment(stores: &[String]) -> Deployment {
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&str> = stores.iter().map(String::as_str).collect();
    let pki = pki::ephemeral(dir.path(), &refs, &[("otto", Role::Operator)]).unwrap();
    let security = Security::Mtls(TlsFiles {
        ca: pki.ca_cert(),
        cert: pki.coordinator_cert(),
        key: pki.coordinator_key(),
        revoked: None,
    });
    let c = start_secured(None, security).await;
    let (cert, key) = pki.admin("otto");
    let admin = pb::admin_client::AdminClient::new(
        channel(&c.admin_url, &pki.ca_cert(), Some((&cert, &key))).await.unwrap(),
    );
    Deployment { _dir: dir, pki, c, admin }
}

/// Where a store stops taking part.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Vanish {
    Never,
    BeforeAdvertising,
    AfterSharing,
}

/// One store, driving the protocol's pure steps over the real transport. Returns the model
/// the task ended with, if it stayed to the end.
async fn store(
    url: String,
    tls: StoreTls,
    spec: TaskSpec,
    input: Vec<f32>,
    vanish: Vanish,
) -> Option<Vec<f32>> {
    let mut t = GrpcTransport::with_tls(&url, &tls).unwrap();
    let e = t.enroll(&spec.name, "ignored").await.unwrap();
    let mut rng = fedretail_core::privacy::noise::os_seeded();
    // The store signs its keys with its TLS key; neighbours check them against its certificate.
    let signer = StoreSigner::new(Some(&tls.key_pem)).unwrap();
    let mut client: Option<Client> = None;
    loop {
        match t.next_assignment(&e).await.unwrap() {
            Assignment::Wait => {}
            Assignment::Advertise(plan) => {
                if vanish == Vanish::BeforeAdvertising {
                    return None;
                }
                plan.params.check(&spec, None).unwrap();
                assert_eq!(plan.cohort[plan.index as usize], e.client_id);
                let ctx = plan.params.context(plan.round_id);
                let (c, advert) = Client::new(ctx, plan.index, &signer, &mut rng);
                client = Some(c);
                t.advertise_keys(&e, plan.round_id, advert, signer.bare_key()).await.unwrap();
            }
            Assignment::ShareKeys { round_id, adverts } => {
                let ids: BTreeMap<u32, Identity> =
                    adverts.iter().map(|(a, id)| (a.index, id.clone())).collect();
                assert!(ids.values().all(|id| matches!(id, Identity::Certificate(_))));
                let adverts: Vec<_> = adverts.into_iter().map(|(a, _)| a).collect();
                let verify = |i: u32, message: &[u8], signature: &[u8]| {
                    identity::verify(Some(&tls.ca_pem), &ids[&i], message, signature)
                };
                let sealed =
                    client.as_mut().unwrap().share_keys(&adverts, verify, &mut rng).unwrap();
                t.share_keys(&e, round_id, sealed).await.unwrap();
                if vanish == Vanish::AfterSharing {
                    return None;
                }
            }
            Assignment::Train(plan) => {
                let m = plan.masked.expect("a secure-aggregation round masks");
                let p = &m.params;
                let encoded =
                    Encoder::new(p.ddg, p.rotation_seed, p.input_len).encode(&input, &mut rng);
                let masked = client.as_mut().unwrap().masked_input(&m.shares, &encoded).unwrap();
                t.upload_masked(&e, plan.round_id, masked).await.unwrap();
            }
            Assignment::Unmask { round_id, survivors, dropped } => {
                let revealed = client.as_mut().unwrap().unmask(&survivors, &dropped).unwrap();
                t.unmask(&e, round_id, revealed).await.unwrap();
            }
            Assignment::Evaluate(plan) => {
                let sums = fedretail_core::model::metrics::EvalSums::default();
                t.report(&e, plan.round_id, sums).await.unwrap();
            }
            Assignment::Finished { state, reason } => {
                assert_eq!(state, "finished", "{reason}");
                return Some(t.fetch_model(&e, 1, N_PARAMS).await.unwrap());
            }
        }
    }
}

#[tokio::test]
async fn ten_stores_with_three_vanishing_mid_round_commit_the_survivors_exact_mean() {
    let names: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    let Deployment { _dir, pki, c, admin } = deployment(&names).await;
    let spec = TaskSpec {
        name: "sa".into(),
        model: ModelSpec::Bench { n_params: N_PARAMS },
        plan: TrainingPlan {
            select_timeout_secs: 30.0,
            configure_timeout_secs: 2.0,
            collect_timeout_secs: 3.0,
            evaluate_timeout_secs: 1.0,
            weight_by_examples: false,
            secure_aggregation: SecureAggregation::SecAggPlus,
            ..TrainingPlan::new(1, 10, 6, 1.0)
        },
        privacy: None,
    };
    crate::support::create_task_over(&admin, &spec).await.unwrap();

    // Inputs within the clipping norm; one store vanishes before advertising its keys, two
    // after sharing them (their pairwise masks must then be recovered from the neighbours).
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(12);
    let inputs: Vec<Vec<f32>> = (0..10)
        .map(|_| (0..N_PARAMS).map(|_| rng.random_range(-0.05f32..0.05)).collect())
        .collect();
    let vanish = |i: usize| match i {
        0 => Vanish::BeforeAdvertising,
        1 | 2 => Vanish::AfterSharing,
        _ => Vanish::Never,
    };
    let mut handles = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let (cert, key) = pki.store(&names[i]);
        let tls = StoreTls::read(&pki.ca_cert(), &cert, &key).unwrap();
        handles.push(tokio::spawn(store(
            c.url.clone(),
            tls,
            spec.clone(),
            input.clone(),
            vanish(i),
        )));
    }
    let mut models = Vec::new();
    for h in handles {
        models.extend(h.await.unwrap());
    }
    assert_eq!(models.len(), 7, "seven stores stay to the end");
    let survivors: Vec<&Vec<f32>> = inputs
        .iter()
        .enumerate()
        .filter(|(i, _)| vanish(*i) == Vanish::Never)
        .map(|(_, x)| x)
        .collect();
    for j in 0..N_PARAMS {
        let mean = survivors.iter().map(|x| f64::from(x[j])).sum::<f64>() / 7.0;
        for m in &models {
            assert!((f64::from(m[j]) - mean).abs() < 1e-6, "coordinate {j}: {} vs {mean}", m[j]);
        }
    }
    c.stop().await;
}

/// Everything a store hands its transport, recorded on the way to the wire.
#[derive(Default)]
struct Captured {
    plaintext_uploads: usize,
    masked: Vec<Vec<u32>>,
    reports: usize,
}

struct Capture {
    inner: GrpcTransport,
    seen: std::sync::Arc<std::sync::Mutex<Captured>>,
}

impl Transport for Capture {
    fn peer(&self) -> String {
        self.inner.peer()
    }
    fn tls(&self) -> Option<&StoreTls> {
        self.inner.tls()
    }
    async fn enroll(
        &mut self,
        task: &str,
        store: &str,
    ) -> Result<fedretail_client::transport::Enrollment, fedretail_client::transport::TransportError>
    {
        self.inner.enroll(task, store).await
    }
    async fn next_assignment(
        &mut self,
        e: &fedretail_client::transport::Enrollment,
    ) -> Result<Assignment, fedretail_client::transport::TransportError> {
        self.inner.next_assignment(e).await
    }
    async fn fetch_model(
        &mut self,
        e: &fedretail_client::transport::Enrollment,
        version: u64,
        n: usize,
    ) -> Result<Vec<f32>, fedretail_client::transport::TransportError> {
        self.inner.fetch_model(e, version, n).await
    }
    async fn upload(
        &mut self,
        e: &fedretail_client::transport::Enrollment,
        round: u64,
        update: fedretail_core::privacy::Contribution,
        summary: fedretail_client::transport::UpdateSummary,
    ) -> Result<(), fedretail_client::transport::TransportError> {
        self.seen.lock().unwrap().plaintext_uploads += 1;
        self.inner.upload(e, round, update, summary).await
    }
    async fn report(
        &mut self,
        e: &fedretail_client::transport::Enrollment,
        round: u64,
        sums: fedretail_core::model::metrics::EvalSums,
    ) -> Result<(), fedretail_client::transport::TransportError> {
        self.seen.lock().unwrap().reports += 1;
        self.inner.report(e, round, sums).await
    }
    async fn advertise_keys(
        &mut self,
        e: &fedretail_client::transport::Enrollment,
        round: u64,
        advert: fedretail_core::secagg::protocol::Advertised,
        bare_key: Option<[u8; 32]>,
    ) -> Result<(), fedretail_client::transport::TransportError> {
        self.inner.advertise_keys(e, round, advert, bare_key).await
    }
    async fn share_keys(
        &mut self,
        e: &fedretail_client::transport::Enrollment,
        round: u64,
        sealed: Vec<fedretail_core::secagg::protocol::Sealed>,
    ) -> Result<(), fedretail_client::transport::TransportError> {
        self.inner.share_keys(e, round, sealed).await
    }
    async fn upload_masked(
        &mut self,
        e: &fedretail_client::transport::Enrollment,
        round: u64,
        values: Vec<u32>,
    ) -> Result<(), fedretail_client::transport::TransportError> {
        self.seen.lock().unwrap().masked.push(values.clone());
        self.inner.upload_masked(e, round, values).await
    }
    async fn unmask(
        &mut self,
        e: &fedretail_client::transport::Enrollment,
        round: u64,
        revealed: Vec<fedretail_core::secagg::protocol::Revealed>,
    ) -> Result<(), fedretail_client::transport::TransportError> {
        self.inner.unmask(e, round, revealed).await
    }
}

/// Issue 12: what a store sends in a secure-aggregation task, captured at its transport, is
/// never a plaintext update: no plaintext upload at all, and every masked upload is uniform
/// (a chi-square test on each value's top four bits), where the quantised update itself would
/// sit next to zero. The recommender still learns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_sends_nothing_but_masked_integers_in_a_secure_aggregation_task() {
    use fedretail_client::participant::{LocalData, Participant, ParticipantConfig};
    let names: Vec<String> = (0..4).map(|i| format!("m{i}")).collect();
    let Deployment { _dir, pki, c, admin } = deployment(&names).await;
    let spec = TaskSpec {
        name: "masked-mf".into(),
        model: ModelSpec::MatrixFactorization(crate::happy_path::mf_spec()),
        plan: TrainingPlan {
            local_epochs: 3,
            clip_norm: 10.0,
            eval_every: 1,
            weight_by_examples: false,
            secure_aggregation: SecureAggregation::SecAggPlus,
            ..TrainingPlan::new(6, 4, 4, 1.0)
        },
        privacy: None,
    };
    let task_id = crate::support::create_task_over(&admin, &spec).await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Captured::default()));
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut joins = Vec::new();
    for (s, name) in names.iter().enumerate() {
        let (cert, key) = pki.store(name);
        let tls = StoreTls::read(&pki.ca_cert(), &cert, &key).unwrap();
        let transport =
            Capture { inner: GrpcTransport::with_tls(&c.url, &tls).unwrap(), seen: seen.clone() };
        let config = ParticipantConfig {
            task: spec.name.clone(),
            store_name: name.clone(),
            state_dir: None,
            max_backoff: std::time::Duration::from_millis(200),
            seeded_privacy: false,
            dropout: 0.0,
            policy: fedretail_client::policy::StorePolicy::permissive(),
        };
        let data = LocalData::Ratings(crate::happy_path::store(s as u32, 12));
        joins.push(tokio::spawn(Participant::new(transport, config, data).run(cancel.clone())));
    }
    for j in joins {
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(120), j)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(outcome.state, "finished", "{}", outcome.reason);
        assert_eq!(outcome.rounds_trained, 6);
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.plaintext_uploads, 0, "no plaintext update ever left a store");
    assert_eq!(seen.masked.len(), 4 * 6);
    let n_params = spec.upload_len();
    for masked in &seen.masked {
        assert_eq!(masked.len(), n_params.next_power_of_two());
        let mut bins = [0f64; 16];
        for v in masked {
            bins[(v >> 28) as usize] += 1.0;
        }
        let expected = masked.len() as f64 / 16.0;
        let chi2: f64 = bins.iter().map(|o| (o - expected).powi(2) / expected).sum();
        // 15 degrees of freedom: above 60 has probability below 1e-6 for a uniform upload; a
        // quantised update (values next to 0 mod 2^32) lands in two bins.
        assert!(chi2 < 60.0, "a masked upload is not uniform: chi2 {chi2:.1}");
    }
    let status = admin
        .clone()
        .get_task(pb::GetTaskRequest { task_id, max_rounds: 100 })
        .await
        .unwrap()
        .into_inner();
    let rmse = |r: &pb::RoundStatus| {
        fedretail_core::model::metrics::EvalSums::try_from(r.eval.unwrap()).unwrap().rmse()
    };
    let (last, first) = (rmse(&status.rounds[0]), rmse(&status.rounds[5]));
    assert!(last < 0.9 * first, "the masked rounds train the model: {first} -> {last}");
    cancel.cancel();
}
