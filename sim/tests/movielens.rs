//! MovieLens-100K checks on the real data. They fetch the recbole wheel with pip, so they run
//! only when `RUN_SLOW_TESTS=1` (as `.ci/run` sets); otherwise they say so and return.

mod common;

use fedretail_sim::dataset::{self, Partition};
use fedretail_sim::scenario::{self, RunArgs};

/// A quiet MovieLens run with `options`.
fn args(options: &[&str]) -> RunArgs {
    common::args(&[&["--scenario", "movielens"], options].concat())
}

fn slow() -> bool {
    common::slow("MovieLens")
}

#[test]
fn movielens_loads_and_splits_into_eleven_regions() {
    if !slow() {
        return;
    }
    let args = args(&[]);
    let data = scenario::load_dataset(&args).unwrap();
    assert_eq!(data.ratings.len(), 100_000);
    assert_eq!(data.n_items, 1682);
    assert_eq!(data.user_region.len(), 943);
    let (train, test) = dataset::split(&data.ratings, 0.2, 42);
    assert_eq!((train.len(), test.len()), (80_000, 20_000));
    let stores = dataset::partition(&data, &train, &test, Partition::Region);
    let names: Vec<&str> = stores.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), 11, "{names:?}");
    assert!(names.contains(&"non-us") && names.contains(&"zip-0") && names.contains(&"zip-9"));
    assert_eq!(dataset::partition(&data, &train, &test, Partition::Device).len(), 943);
}

/// Issue 2's accuracy targets: federated RMSE <= 0.935 and within 1 % of central; local-only worse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_movielens_run_meets_the_accuracy_targets() {
    if !slow() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = args(&["--out", dir.path().to_str().unwrap()]);
    let r = scenario::run(&args).await.unwrap();
    assert_eq!(r.n_clients, 11);
    assert!(r.federated.rmse <= 0.935, "federated RMSE {}", r.federated.rmse);
    assert!(
        r.federated.rmse <= 1.01 * r.central.rmse,
        "federated {} vs central {}",
        r.federated.rmse,
        r.central.rmse
    );
    assert!(
        r.local_only.rmse > r.federated.rmse + 0.03,
        "local-only {} should be clearly worse",
        r.local_only.rmse
    );
    assert_eq!(r.failed_rounds, 0);
}

/// Issue 3's customer-level targets (δ = 1e-5): RMSE <= 0.96 at ε = 8 and <= 1.00 at ε = 1,
/// each within its budget, and better than each store alone (0.9743, from the run above's
/// reference) at ε = 8 and 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_level_dp_meets_its_targets() {
    if !slow() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (epsilon, bound) in [(8.0, 0.96), (2.0, 0.9743), (1.0, 1.0)] {
        let target = epsilon.to_string();
        let args = args(&[
            "--out",
            dir.path().to_str().unwrap(),
            "--privacy-unit",
            "customer",
            "--target-epsilon",
            &target,
            "--reference-epochs",
            "1",
        ]);
        let r = scenario::run(&args).await.unwrap();
        let p = r.privacy.expect("a privacy report");
        assert_eq!(p.unit, "customer");
        assert_eq!(p.accountant, "rdp");
        assert!(p.epsilon <= epsilon && p.epsilon > 0.99 * epsilon, "epsilon {}", p.epsilon);
        assert!(
            r.federated.rmse <= bound,
            "ε = {epsilon}: customer-level DP RMSE {}",
            r.federated.rmse
        );
    }
}

/// Issue 11's MovieLens ranking target: federated HR@10 >= 0.66 under strict leave-one-out,
/// within 2 % of the pooled ALS reference, and each store alone measurably worse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ranking_run_meets_its_targets() {
    if !slow() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = args(&["--out", dir.path().to_str().unwrap(), "--objective", "ranking"]);
    let r = scenario::run(&args).await.unwrap();
    assert!(r.ranking);
    assert_eq!(r.n_test, 943, "one held-out interaction per user");
    assert!(r.federated.hr_at_10 >= 0.66, "federated HR@10 {}", r.federated.hr_at_10);
    assert!(
        r.federated.hr_at_10 >= 0.98 * r.central.hr_at_10,
        "federated {} vs central {}",
        r.federated.hr_at_10,
        r.central.hr_at_10
    );
    assert!(
        r.local_only.hr_at_10 < r.federated.hr_at_10 - 0.05,
        "local-only {}",
        r.local_only.hr_at_10
    );
    let popularity =
        &r.baselines.iter().find(|(n, _)| n.starts_with("popularity (global")).unwrap().1;
    assert!(popularity.hr_at_10 < r.federated.hr_at_10 - 0.2, "popularity {}", popularity.hr_at_10);
    assert_eq!(r.failed_rounds, 0);
    // The report per store: every method's HR@10 in each of the 11 stores, pooled back to the
    // totals, with its fairness section and plot.
    let federated = r.per_store.iter().find(|(m, _)| m == "federated").unwrap();
    assert_eq!(federated.1.len(), 11);
    let pooled = fedretail_sim::baselines::merge_all(&federated.1);
    assert!((pooled.hr_at_10() - r.federated.hr_at_10).abs() < 1e-9);
    scenario::write_report(&args.out_dir(), &r).unwrap();
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("## Fairness across stores") && md.contains("## Per store (HR@10)"));
    let svg = std::fs::read_to_string(dir.path().join("hr_per_store.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), 4 * 11 + 4, "4 methods × 11 stores and a legend");
    // Customer-level DP through the coordinator (each sampled customer sends their own items'
    // terms and their statistics; the coordinator forms the unobserved items' term from the
    // noised statistics): measured 0.3680, 0.4284 and 0.4867 at ε = 1, 3 and 8.
    common::check_dp_ranking_runs(&r);
    assert!(
        r.dp_runs[2].0.hr_at_10 >= popularity.hr_at_10 + 0.05,
        "DP ε = 8 HR@10 {} vs popularity {}",
        r.dp_runs[2].0.hr_at_10,
        popularity.hr_at_10
    );
    assert!(md.contains("Customer-level DP at ε = 8.00 (training"), "{md}");
}
