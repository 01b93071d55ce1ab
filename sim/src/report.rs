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
    /// Under secure aggregation: clients per round, dropouts per step, bits, k, and ε against
    /// the coordinator.
    pub secure_aggregation: Option<crate::runner::SecureOutcome>,
    /// The ranking recommender's customer-level DP runs (`--dp-epsilons`), when the run itself
    /// has no DP: each one's results and privacy.
    pub dp_runs: Vec<(MethodResult, crate::runner::PrivacyOutcome)>,
    /// The model the DP runs trained, in words ([`crate::scenario::describe_model`]), when
    /// there are DP runs.
    pub dp_model: Option<String>,
    /// Committed rounds.
    pub history: Vec<RoundRecord>,
    /// Stores.
    pub stores: Vec<StoreRow>,
    /// Ranking only: each method's sums per store (in the order of `stores`), federated first,
    /// then local-only and the popularity baselines.
    pub per_store: Vec<(String, Vec<EvalSums>)>,
}

/// How the ranking methods fare across stores.
#[derive(Debug, Clone, PartialEq)]
pub struct RankingFairness {
    /// Stores with a held-out interaction.
    pub stores_compared: usize,
    /// Of those, stores where federated HR@10 is above local-only's.
    pub federated_beats_local_only: usize,
    /// Of those, stores where they are equal.
    pub ties: usize,
    /// Per method, the pooled HR@10 of its worst tenth of stores (by its own HR@10).
    pub worst_decile: Vec<(String, f64)>,
    /// Per method, the pooled HR@10 of the quarter of stores with the fewest users.
    pub small_stores: Vec<(String, f64)>,
    /// How many stores that quarter holds.
    pub n_small: usize,
}

/// The fairness summary of a ranking report.
pub fn ranking_fairness(r: &Report) -> RankingFairness {
    let hr = |key: &str, k: usize| {
        r.per_store.iter().find(|(m, _)| m == key).map_or(f64::NAN, |(_, v)| v[k].hr_at_10())
    };
    let compared: Vec<usize> = (0..r.stores.len())
        .filter(|&k| r.per_store.first().is_some_and(|(_, v)| v[k].n_ranked > 0))
        .collect();
    let beats = compared.iter().filter(|&&k| hr("federated", k) > hr("local-only", k)).count();
    let ties = compared.iter().filter(|&&k| hr("federated", k) == hr("local-only", k)).count();
    let pooled = |sums: &[EvalSums], ks: &[usize]| {
        let mut t = EvalSums::default();
        ks.iter().for_each(|&k| t.merge(&sums[k]));
        t.hr_at_10()
    };
    let tenth = compared.len().div_ceil(10);
    let worst_decile = r
        .per_store
        .iter()
        .map(|(m, sums)| {
            let mut ks = compared.clone();
            ks.sort_by(|&a, &b| sums[a].hr_at_10().total_cmp(&sums[b].hr_at_10()));
            (m.clone(), pooled(sums, &ks[..tenth]))
        })
        .collect();
    let mut by_size = compared.clone();
    by_size.sort_by_key(|&k| (r.stores[k].users, k));
    by_size.truncate(compared.len().div_ceil(4));
    let small_stores =
        r.per_store.iter().map(|(m, sums)| (m.clone(), pooled(sums, &by_size))).collect();
    RankingFairness {
        stores_compared: compared.len(),
        federated_beats_local_only: beats,
        ties,
        worst_decile,
        small_stores,
        n_small: by_size.len(),
    }
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
        "secure_aggregation": r.secure_aggregation.as_ref().map(crate::runner::SecureOutcome::to_json),
        "dp_runs": r.dp_runs.iter().map(|(m, p)| json!({"test": method(m)["test"], "privacy": p.to_json()})).collect::<Vec<_>>(),
        "dp_model": r.dp_model,
        "stores": r.stores.iter().enumerate().map(|(k, s)| {
            let hr: serde_json::Map<String, Value> = r.per_store.iter().map(|(m, v)| (m.clone(), round4(v[k].hr_at_10()))).collect();
            json!({"name": s.name, "users": s.users, "train": s.train, "test": s.test, "hr_at_10": hr})
        }).collect::<Vec<_>>(),
        "fairness": (!r.per_store.is_empty()).then(|| {
            let f = ranking_fairness(r);
            json!({
                "stores_compared": f.stores_compared,
                "federated_beats_local_only": f.federated_beats_local_only,
                "ties_with_local_only": f.ties,
                "worst_decile_hr_at_10": f.worst_decile.iter().map(|(m, v)| (m.clone(), round4(*v))).collect::<serde_json::Map<_, _>>(),
                "small_stores": f.n_small,
                "small_store_hr_at_10": f.small_stores.iter().map(|(m, v)| (m.clone(), round4(*v))).collect::<serde_json::Map<_, _>>(),
            })
        }),
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
    .map(|(n, m)| (n.to_string(), m))
    .chain(r.dp_runs.iter().map(|(m, p)| {
        (format!("federated, customer-level DP ε = {:.2} (δ = {})", p.epsilon, p.delta), m)
    }))
    .chain(r.baselines.iter().map(|(n, m)| (n.clone(), m)))
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
    let popularity = r.baselines.iter().find(|(n, _)| n.starts_with("popularity (global"));
    if let (Some((_, pop)), true) = (popularity, r.ranking) {
        let (base, fed) = (pop.hr_at_10, r.federated.hr_at_10);
        for (m, p) in &r.dp_runs {
            let against = if m.hr_at_10 >= base {
                let kept = (m.hr_at_10 - base) / (fed - base) * 100.0;
                format!(
                    "keeping {kept:.0} % of federation's gain over global popularity ({base:.4} → {fed:.4})"
                )
            } else {
                format!("below global popularity ({base:.4})")
            };
            let _ = writeln!(
                s,
                "- Customer-level DP at ε = {:.2} (training; {:.2} with the noised evaluation): HR@10 {:.4}, {against}.",
                p.epsilon, p.total_epsilon, m.hr_at_10
            );
        }
        if !r.dp_runs.is_empty() {
            if let Some(model) = &r.dp_model {
                let _ = writeln!(s, "- The DP runs train {model}.");
            }
            s.push('\n');
        }
    }
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
    if let Some(a) = &r.secure_aggregation {
        let [adv, share, up, unmask] = a.dropped;
        let against = match a.epsilon_against_coordinator {
            Some(e) if e.is_finite() => format!("epsilon {e:.4} against the coordinator"),
            Some(_) => "no bound against the coordinator (it adds the noise)".into(),
            None => "no differential privacy".into(),
        };
        let _ = writeln!(
            s,
            "Secure aggregation (SecAgg+): {} rounds of {:.1} stores, {} bits per coordinate, k = {}, t = {}; \
             dropped {adv} before advertising, {share} before sharing keys, {up} before uploading, \
             {unmask} before unmasking; {against}.\n",
            a.rounds, a.clients_per_round, a.bits, a.degree, a.threshold
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
    if !r.per_store.is_empty() {
        ranking_stores(&mut s, r);
        return s;
    }
    let _ =
        writeln!(s, "\n## Clients\n\n| client | users | train | test |\n| --- | --- | --- | --- |");
    for st in &r.stores {
        let _ = writeln!(s, "| {} | {} | {} | {} |", st.name, st.users, st.train, st.test);
    }
    s
}

/// Draws each store's HR@10 per method (stores with fewest users first) for a ranking report.
///
/// # Errors
///
/// Drawing errors.
pub fn plot_ranking(path: &std::path::Path, r: &Report) -> anyhow::Result<()> {
    let mut order: Vec<usize> = (0..r.stores.len()).collect();
    order.sort_by_key(|&k| (r.stores[k].users, k));
    let series: Vec<crate::plot::Series> = r
        .per_store
        .iter()
        .map(|(m, sums)| crate::plot::Series {
            label: m.clone(),
            values: order.iter().map(|&k| sums[k].hr_at_10()).collect(),
        })
        .collect();
    crate::plot::per_store(
        path,
        &format!("HR@10 per store ({})", r.dataset),
        "stores, fewest users first",
        "HR@10",
        1.0,
        &series,
    )
}

/// The ranking report's fairness section and per-store table.
fn ranking_stores(s: &mut String, r: &Report) {
    let f = ranking_fairness(r);
    let percent = |n: usize| 100.0 * n as f64 / f.stores_compared.max(1) as f64;
    let _ = writeln!(s, "\n## Fairness across stores\n");
    let _ = writeln!(
        s,
        "Federated HR@10 is above local-only's in {} of {} stores with a held-out interaction ({:.1} %), equal in {} and below in {}: not below in {:.1} % (the issue's target ≥ 90 %, counted as its reference counts: BENCHMARKS.md, \"Ranking\").\n",
        f.federated_beats_local_only,
        f.stores_compared,
        percent(f.federated_beats_local_only),
        f.ties,
        f.stores_compared - f.federated_beats_local_only - f.ties,
        percent(f.federated_beats_local_only + f.ties),
    );
    let _ = writeln!(
        s,
        "| method | HR@10 of its worst 10 % of stores | HR@10 of the {} stores with the fewest users |\n| --- | --- | --- |",
        f.n_small
    );
    for ((m, worst), (_, small)) in f.worst_decile.iter().zip(&f.small_stores) {
        let _ = writeln!(s, "| {m} | {worst:.4} | {small:.4} |");
    }
    let _ = writeln!(s, "\n![HR@10 per store](hr_per_store.svg)");
    let keys: Vec<&str> = r.per_store.iter().map(|(m, _)| m.as_str()).collect();
    let _ = writeln!(
        s,
        "\n## Per store (HR@10)\n\n| store | users | train | test | {} |\n| --- | --- | --- | --- |{}",
        keys.join(" | "),
        " --- |".repeat(keys.len())
    );
    let mut order: Vec<usize> = (0..r.stores.len()).collect();
    order.sort_by_key(|&k| (r.stores[k].users, k));
    for k in order {
        let st = &r.stores[k];
        let cells: Vec<String> =
            r.per_store.iter().map(|(_, v)| format!("{:.3}", v[k].hr_at_10())).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            st.name,
            st.users,
            st.train,
            st.test,
            cells.join(" | ")
        );
    }
}
