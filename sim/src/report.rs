//! The simulation report: JSON for machines, Markdown for people. Deterministic given a seed
//! (no wall-clock times in it).

use crate::dataset::{Partition, StoreData};
use crate::runner::RoundRecord;
use crate::scenario::ScenarioKind;
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::plan::TaskSpec;
use serde_json::{Value, json};
use std::fmt::Write;

/// Test metrics of one method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MethodResult {
    /// Root mean squared error.
    pub rmse: f64,
    /// Mean absolute error.
    pub mae: f64,
    /// HR@10.
    pub hr_at_10: f64,
    /// NDCG@10.
    pub ndcg_at_10: f64,
    /// Held-out ratings scored.
    pub n_ratings: u64,
    /// Users ranked.
    pub n_ranked: u64,
}

impl From<&EvalSums> for MethodResult {
    fn from(e: &EvalSums) -> MethodResult {
        MethodResult {
            rmse: e.rmse(),
            mae: e.mae(),
            hr_at_10: e.hr_at_10(),
            ndcg_at_10: e.ndcg_at_10(),
            n_ratings: e.n_ratings,
            n_ranked: e.n_ranked,
        }
    }
}

/// A store's share of the data.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreRow {
    /// Name.
    pub name: String,
    /// Users.
    pub users: usize,
    /// Training ratings.
    pub train: usize,
    /// Held-out ratings.
    pub test: usize,
}

impl From<&StoreData> for StoreRow {
    fn from(s: &StoreData) -> StoreRow {
        StoreRow {
            name: s.name.clone(),
            users: s.users.len(),
            train: s.data.train.len(),
            test: s.data.test.len(),
        }
    }
}

/// Everything a run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Scenario.
    pub scenario: ScenarioKind,
    /// Dataset name.
    pub dataset: String,
    /// Seed.
    pub seed: u64,
    /// Partition.
    pub partition: Partition,
    /// Rounds.
    pub rounds: u64,
    /// Clients.
    pub n_clients: usize,
    /// Ratings in the dataset.
    pub n_ratings: usize,
    /// Training ratings.
    pub n_train: usize,
    /// Held-out ratings.
    pub n_test: usize,
    /// The task run.
    pub spec: TaskSpec,
    /// Epochs of the references.
    pub reference_epochs: u32,
    /// Federated, after the last round.
    pub federated: MethodResult,
    /// All data pooled.
    pub central: MethodResult,
    /// Each store alone.
    pub local_only: MethodResult,
    /// Further baselines (ranking: popularity, global and per store), by name.
    pub baselines: Vec<(String, MethodResult)>,
    /// Whether the recommender was trained for ranking (then RMSE and MAE do not apply).
    pub ranking: bool,
    /// Failed rounds.
    pub failed_rounds: u64,
    /// The privacy the federated model carries, if the run had DP.
    pub privacy: Option<crate::runner::PrivacyOutcome>,
    /// Committed rounds.
    pub history: Vec<RoundRecord>,
    /// Stores.
    pub stores: Vec<StoreRow>,
}

fn round4(x: f64) -> Value {
    if x.is_finite() { json!((x * 1e6).round() / 1e6) } else { Value::Null }
}

fn method(m: &MethodResult) -> Value {
    json!({ "test": {
        "rmse": round4(m.rmse), "mae": round4(m.mae), "hr_at_10": round4(m.hr_at_10), "ndcg_at_10": round4(m.ndcg_at_10),
        "n_ratings": m.n_ratings, "n_ranked": m.n_ranked,
    }})
}

/// The JSON report. Metrics are rounded to 6 decimals.
pub fn to_json(r: &Report) -> Value {
    let history: Vec<Value> = r
        .history
        .iter()
        .map(|h| {
            let mut v = json!({ "round": h.index, "n_uploads": h.n_uploads, "train_loss": round4(h.train_loss) });
            if let Some(e) = &h.eval {
                v["test"] = method(&MethodResult::from(e))["test"].clone();
            }
            v
        })
        .collect();
    json!({
        "scenario": r.scenario,
        "dataset": r.dataset,
        "seed": r.seed,
        "partition": r.partition,
        "rounds": r.rounds,
        "n_clients": r.n_clients,
        "n_ratings": r.n_ratings,
        "n_train": r.n_train,
        "n_test": r.n_test,
        "task": serde_json::to_value(&r.spec).expect("plain data serialises"),
        "reference_epochs": r.reference_epochs,
        "federated": { "failed_rounds": r.failed_rounds, "history": history, "test": method(&r.federated)["test"] },
        "central": method(&r.central),
        "local_only": method(&r.local_only),
        "objective": if r.ranking { "ranking" } else { "rating" },
        "baselines": r.baselines.iter().map(|(name, m)| json!({"name": name, "test": method(m)["test"]})).collect::<Vec<_>>(),
        "privacy": r.privacy.as_ref().map(crate::runner::PrivacyOutcome::to_json),
        "stores": r.stores.iter().map(|s| json!({"name": s.name, "users": s.users, "train": s.train, "test": s.test})).collect::<Vec<_>>(),
    })
}

/// A reference's row name: how it was trained.
fn reference_label(what: &str, r: &Report) -> String {
    if r.ranking {
        format!("{what}, ALS, {} iterations)", r.reference_epochs.min(15))
    } else {
        format!("{what}, {} epochs)", r.reference_epochs)
    }
}

/// The head of [`to_markdown`]: title, setup and the table of methods with the gap to central.
pub fn summary(r: &Report) -> String {
    let md = to_markdown(r);
    md.lines()
        .take_while(|l| !l.starts_with("## "))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// The Markdown report.
pub fn to_markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# fedretail simulation: {} ({:?} partition)\n", r.dataset, r.partition);
    let _ = writeln!(
        s,
        "{} {} ({} train, {} test, {}, seed {}), {} clients, {} rounds, {} local epochs, cohort {}.\n",
        r.n_ratings,
        if r.ranking { "interactions" } else { "ratings" },
        r.n_train,
        r.n_test,
        if r.ranking {
            "each user's newest interaction held out and ranked against 99 sampled items"
        } else {
            "seeded random split"
        },
        r.seed,
        r.n_clients,
        r.rounds,
        r.spec.plan.local_epochs,
        r.spec.plan.cohort_size
    );
    // A ranking model predicts no ratings: its table has no RMSE or MAE.
    let _ = if r.ranking {
        writeln!(s, "| method | HR@10 | NDCG@10 |\n| --- | --- | --- |")
    } else {
        writeln!(s, "| method | RMSE | MAE | HR@10 | NDCG@10 |\n| --- | --- | --- | --- | --- |")
    };
    for (name, m) in [
        ("federated", &r.federated),
        (&*reference_label("central (pooled", r), &r.central),
        (&*reference_label("local-only (each store alone", r), &r.local_only),
    ]
    .into_iter()
    .chain(r.baselines.iter().map(|(n, m)| (n.as_str(), m)))
    {
        let _ = if r.ranking {
            writeln!(s, "| {name} | {:.4} | {:.4} |", m.hr_at_10, m.ndcg_at_10)
        } else {
            writeln!(
                s,
                "| {name} | {:.4} | {:.4} | {:.4} | {:.4} |",
                m.rmse, m.mae, m.hr_at_10, m.ndcg_at_10
            )
        };
    }
    let (metric, gap) = if r.ranking {
        ("HR@10", (r.federated.hr_at_10 / r.central.hr_at_10 - 1.0) * 100.0)
    } else {
        ("RMSE", (r.federated.rmse / r.central.rmse - 1.0) * 100.0)
    };
    let _ = writeln!(
        s,
        "\nFederated {metric} is {gap:+.2} % relative to central; {} rounds failed.\n",
        r.failed_rounds
    );
    if let Some(p) = &r.privacy {
        let _ = writeln!(
            s,
            "Privacy ({} level, {} noise): epsilon {:.4} at delta {} over {} charged rounds; q = {}, z = {:.4}, C = {}.\n",
            p.unit,
            p.noise_placement,
            p.epsilon,
            p.delta,
            p.rounds,
            p.sampling_rate,
            p.noise_multiplier,
            p.clip_norm
        );
    }
    let _ = if r.ranking {
        writeln!(s, "## Learning curve\n\n| round | HR@10 | train loss |\n| --- | --- | --- |")
    } else {
        writeln!(
            s,
            "## Learning curve\n\n| round | test RMSE | HR@10 | train loss |\n| --- | --- | --- | --- |"
        )
    };
    for h in r.history.iter().filter(|h| h.eval.is_some()) {
        let e = h.eval.expect("filtered");
        let _ = if r.ranking {
            writeln!(s, "| {} | {:.4} | {:.4} |", h.index, e.hr_at_10(), h.train_loss)
        } else {
            writeln!(
                s,
                "| {} | {:.4} | {:.4} | {:.4} |",
                h.index,
                e.rmse(),
                e.hr_at_10(),
                h.train_loss
            )
        };
    }
    let _ =
        writeln!(s, "\n## Clients\n\n| client | users | train | test |\n| --- | --- | --- | --- |");
    for st in &r.stores {
        let _ = writeln!(s, "| {} | {} | {} | {} |", st.name, st.users, st.train, st.test);
    }
    s
}
