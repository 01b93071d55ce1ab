//! The simulator end to end: a seeded synthetic scenario over loopback gRPC, twice.

use clap::Parser;
use fedretail_sim::scenario::{self, RunArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: RunArgs,
}

fn args(out: &std::path::Path) -> RunArgs {
    let out = out.to_str().unwrap();
    Cli::parse_from([
        "sim",
        "--scenario",
        "synthetic",
        "--rounds",
        "6",
        "--eval-every",
        "3",
        "--dim",
        "8",
        "--reference-epochs",
        "6",
        "--quiet",
        "--out",
        out,
    ])
    .args
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
