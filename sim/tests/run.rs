//! The simulator end to end: a seeded synthetic scenario over loopback gRPC, twice.

use fedretail_sim::scenario::{self, RunArgs};

/// A quiet synthetic run writing into `out`, with `options` added.
fn synthetic(out: &std::path::Path, options: &[&str]) -> RunArgs {
    let base = ["--scenario", "synthetic", "--quiet", "--out", out.to_str().unwrap()];
    RunArgs::parse_options(base.iter().chain(options)).expect("valid test options")
}

fn args(out: &std::path::Path) -> RunArgs {
    synthetic(out, &["--rounds", "6", "--eval-every", "3", "--dim", "8", "--reference-epochs", "6"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_run_writes_the_same_report_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let args = args(out);
        let report = scenario::run(&args).await.unwrap();
        scenario::write_report(&args.out_dir(), &report).unwrap();
    }
    let text = std::fs::read_to_string(a.join("report.json")).unwrap();
    assert_eq!(
        text,
        std::fs::read_to_string(b.join("report.json")).unwrap(),
        "deterministic given a seed"
    );
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for method in ["federated", "central", "local_only"] {
        for metric in ["rmse", "hr_at_10", "ndcg_at_10"] {
            assert!(json[method]["test"][metric].is_f64(), "{method}.test.{metric} missing");
        }
    }
    assert_eq!(json["rounds"], 6);
    assert_eq!(json["n_clients"], 6);
    assert_eq!(json["seed"], 42);
    assert_eq!(json["federated"]["history"].as_array().unwrap().len(), 6);
    let rmse = |m: &str| json[m]["test"]["rmse"].as_f64().unwrap();
    let first = json["federated"]["history"][2]["test"]["rmse"].as_f64().unwrap();
    assert!(
        rmse("federated") < first,
        "later rounds improve on round 3: {first} -> {}",
        rmse("federated")
    );
    assert!(std::fs::read_to_string(a.join("report.md")).unwrap().contains("| federated |"));
}

/// A run with client-level DP carries the coordinator's privacy report, within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_run_reports_what_it_spent() {
    let dir = tempfile::tempdir().unwrap();
    let args = synthetic(
        dir.path(),
        &[
            "--rounds",
            "4",
            "--dim",
            "4",
            "--reference-epochs",
            "2",
            "--privacy-unit",
            "client",
            "--target-epsilon",
            "4",
            "--sampling-rate",
            "0.5",
        ],
    );
    let report = scenario::run(&args).await.unwrap();
    let p = report.privacy.expect("a privacy report");
    assert_eq!((p.unit.as_str(), p.noise_placement.as_str()), ("client", "central"));
    assert_eq!(p.sampling_rate, 0.5);
    assert!(p.epsilon > 0.0 && p.epsilon <= 4.0, "epsilon {}", p.epsilon);
    assert!(p.rounds >= 4, "every committed round was charged: {}", p.rounds);
    assert!(p.noise_multiplier > 0.5);
}

/// Customer-level DP with adaptive clipping, end to end over gRPC: the report names the unit
/// and placement, the ledger holds every round within the budget, and adaptive clipping moved
/// the clipping norm from where it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_level_run_with_adaptive_clipping() {
    let dir = tempfile::tempdir().unwrap();
    let args = synthetic(
        dir.path(),
        &[
            "--rounds",
            "5",
            "--reference-epochs",
            "2",
            "--privacy-unit",
            "customer",
            "--target-epsilon",
            "8",
            "--adaptive-clipping",
            "0.5",
            "--clip-norm",
            "2",
        ],
    );
    let report = scenario::run(&args).await.unwrap();
    let p = report.privacy.expect("a privacy report");
    assert_eq!((p.unit.as_str(), p.noise_placement.as_str()), ("customer", "central"));
    assert_eq!(p.sampling_rate, 0.3);
    assert_eq!(p.rounds, 5);
    assert!(p.epsilon > 0.0 && p.epsilon <= 8.0, "epsilon {}", p.epsilon);
    // Contributions are far below a norm of 2, so the unclipped fraction is about 1 and the
    // norm shrinks geometrically from the second round on.
    assert!(p.clip_norm < 2.0 * (-0.2f32 * 0.4 * 3.0).exp(), "clip norm {}", p.clip_norm);
    assert!(report.federated.rmse.is_finite());
}

/// Issue 12: customer-level DP with the distributed discrete Gaussian under secure aggregation,
/// stores vanishing at random steps, over gRPC and mTLS: the rounds commit without them, the
/// report's `secure_aggregation` object counts them, and the coordinator faces the same ε as
/// the model's consumers, within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_aggregation_run_with_distributed_noise_and_dropouts() {
    let dir = tempfile::tempdir().unwrap();
    let args = synthetic(
        dir.path(),
        &[
            "--rounds",
            "4",
            "--reference-epochs",
            "2",
            "--privacy-unit",
            "customer",
            "--target-epsilon",
            "8",
            "--noise-placement",
            "distributed",
            "--secure-aggregation",
            "--dropout",
            "0.3",
            "--step-timeout",
            "1",
        ],
    );
    let report = scenario::run(&args).await.unwrap();
    let p = report.privacy.as_ref().expect("a privacy report");
    assert_eq!(p.noise_placement, "distributed");
    assert_eq!(p.rounds, 4);
    assert!(p.epsilon > 0.0 && p.epsilon <= 8.0, "epsilon {}", p.epsilon);
    assert_eq!(p.epsilon_against_coordinator, p.epsilon, "the coordinator sees only the sum");
    let s = report.secure_aggregation.as_ref().expect("a secure_aggregation object");
    assert_eq!(s.bits, fedretail_core::secagg::round::DDG_BITS);
    assert!(s.rounds >= 4 && s.clients_per_round == 6.0, "{s:?}");
    assert!(s.dropped.iter().sum::<u64>() > 0, "stores vanished: {s:?}");
    assert!(report.federated.rmse.is_finite());
    let json = fedretail_sim::report::to_json(&report);
    assert_eq!(json["secure_aggregation"]["bits"], 16);
}

/// The ranking recommender's defaults under customer-level DP (FedAdam, the PLD accountant)
/// give way to the options: `--server-optimizer` and `--accountant` were once ignored there.
#[test]
fn the_ranking_setup_takes_the_optimizer_and_accountant_it_is_given() {
    use fedretail_core::optim::ServerOptimizer;
    use fedretail_core::privacy::accountant::AccountantKind;
    let parse = |options: &[&str]| {
        let base = ["--scenario", "retail-recommend", "--privacy-unit", "customer"];
        RunArgs::parse_options(base.iter().chain(options)).expect("valid options")
    };
    let defaults = parse(&[]);
    let (_, _, optimizer) = defaults.ranking_setup(10, None);
    assert!(matches!(optimizer, ServerOptimizer::FedAdam { .. }), "{optimizer:?}");
    assert_eq!(defaults.accountant(), AccountantKind::Pld);
    let chosen =
        parse(&["--server-optimizer", "fed-avg", "--server-lr", "0.5", "--accountant", "rdp"]);
    let (_, _, optimizer) = chosen.ranking_setup(10, None);
    assert_eq!(optimizer, ServerOptimizer::FedAvg { learning_rate: 0.5 });
    assert_eq!(chosen.accountant(), AccountantKind::Rdp);
    // Elsewhere RDP stays the default: MovieLens ratings under customer-level DP.
    let ratings = RunArgs::parse_options(["--scenario", "movielens", "--privacy-unit", "customer"])
        .expect("valid options");
    assert_eq!(ratings.accountant(), AccountantKind::Rdp);
}

/// Under customer-level DP, a data set with a product catalogue gets the category-affinity model
/// (one release of the item counts), one group per label at every level, unless
/// `--dp-model gradient` asks for learned factors.
#[test]
fn categories_give_the_private_recommender_fixed_category_factors() {
    use fedretail_core::optim::ServerOptimizer;
    let parse = |options: &[&str]| {
        let base = ["--scenario", "retail-recommend", "--privacy-unit", "customer"];
        RunArgs::parse_options(base.iter().chain(options)).expect("valid options")
    };
    // Category and brand: dairy and bread, then three category-brand groups.
    let labels: Vec<Vec<String>> =
        [["dairy", "dairy / own"], ["bread", "bread / own"], ["dairy", "dairy / national"]]
            .iter()
            .map(|l| l.iter().map(|s| s.to_string()).collect())
            .collect();
    let (mf, rounds, optimizer) = parse(&[]).ranking_setup(3, Some(&labels));
    let affinity = mf.category_affinity.as_ref().expect("the category-affinity model");
    assert_eq!((affinity.categories.clone(), affinity.levels), (vec![0, 2, 1, 3, 0, 4], 2));
    assert_eq!(mf.dim, 5, "one factor per group");
    mf.validate().unwrap();
    assert_eq!((rounds, optimizer), (1, ServerOptimizer::FedAvg { learning_rate: 1.0 }));
    let (mf, rounds, _) = parse(&["--dp-model", "gradient"]).ranking_setup(3, Some(&labels));
    assert!(mf.category_affinity.is_none());
    assert_eq!(rounds, 30);
    // Without DP the model learns its factors.
    let plain = RunArgs::parse_options(["--scenario", "retail-recommend"]).unwrap();
    assert!(plain.ranking_setup(3, Some(&labels)).0.category_affinity.is_none());
}
