//! The coordinator's privacy policy refuses tasks at creation, naming the rule (issue 10; H4,
//! H5).

use crate::support::{bench_task, create_task, start_full};
use fedretail_coordinator::config::Security;
use fedretail_coordinator::policy::Policy;
use fedretail_core::privacy::accountant::AccountantKind;
use fedretail_core::privacy::{NoisePlacement, PrivacySpec, PrivacyUnit};
use tonic::Code;

fn private(name: &str, epsilon: f64) -> fedretail_core::plan::TaskSpec {
    let mut spec = bench_task(name, 4, 3, 2);
    spec.plan.weight_by_examples = false;
    spec.privacy = Some(PrivacySpec {
        unit: PrivacyUnit::Client,
        noise_placement: NoisePlacement::Central,
        target_epsilon: epsilon,
        delta: 1e-6,
        sampling_rate: 1.0,
        noise_multiplier: None,
        population: None,
        adaptive_clipping: None,
        accountant: AccountantKind::Rdp,
        domain: "stores".into(),
        evaluation_epsilon: fedretail_core::privacy::default_evaluation_epsilon(),
        evaluation_noise_multiplier: None,
        max_stores_per_customer: 1,
    });
    spec
}

#[tokio::test]
async fn the_default_policy_refuses_what_it_should_with_failed_precondition() {
    let dir = tempfile::tempdir().unwrap();
    let c = start_full(Some(dir.path().join("c.db")), Security::Insecure, Policy::default()).await;
    let refused = |e: tonic::Status, rule: &str| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(&format!("policy rule {rule}")), "{}", e.message());
    };
    refused(
        create_task(&c.admin_url, &bench_task("plain", 4, 3, 2)).await.unwrap_err(),
        "allow_without_privacy",
    );
    refused(create_task(&c.admin_url, &private("greedy", 50.0)).await.unwrap_err(), "max_epsilon");
    let mut alone = private("alone", 4.0);
    alone.plan.min_clients = 1;
    refused(create_task(&c.admin_url, &alone).await.unwrap_err(), "min_cohort");
    let mut huge = private("huge", 4.0);
    huge.model = fedretail_core::plan::ModelSpec::Bench { n_params: 60_000_000 };
    refused(create_task(&c.admin_url, &huge).await.unwrap_err(), "max_model_params");
    create_task(&c.admin_url, &private("fine", 4.0)).await.unwrap();
    // A caller cannot hand the coordinator less noise than the budget needs.
    let mut weak = private("weak", 4.0);
    weak.privacy.as_mut().unwrap().noise_multiplier = Some(0.01);
    let e = create_task(&c.admin_url, &weak).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("privacy.noise_multiplier"), "{}", e.message());
    c.stop().await;
}

#[tokio::test]
async fn a_private_task_needs_a_durable_ledger() {
    let c = start_full(None, Security::Insecure, Policy::permissive()).await;
    let e = create_task(&c.admin_url, &private("p", 4.0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("durable_store"), "{}", e.message());
    c.stop().await;
}
