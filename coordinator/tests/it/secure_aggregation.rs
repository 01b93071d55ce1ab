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
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = pki::ephemeral(dir.path(), &refs, &[("otto", Role::Operator)]).unwrap();
    let security = Security::Mtls(TlsFiles {
        ca: pki.ca_cert(),
        cert: pki.coordinator_cert(),
        key: pki.coordinator_key(),
        revoked: None,
    });
    let c = start_secured(None, security).await;
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
    let (cert, key) = pki.admin("otto");
    let admin = pb::admin_client::AdminClient::new(
        channel(&c.admin_url, &pki.ca_cert(), Some((&cert, &key))).await.unwrap(),
    );
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
        let tls = StoreTls {
            ca_pem: std::fs::read(pki.ca_cert()).unwrap(),
            cert_pem: std::fs::read(cert).unwrap(),
            key_pem: std::fs::read(key).unwrap(),
        };
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
