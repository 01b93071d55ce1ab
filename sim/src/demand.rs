//! The demand-forecasting scenarios: weekly sales per store and product group (Superstore or
//! generated), forecast by the federated demand model over loopback gRPC, with and without
//! store-level DP, against seasonal naive, moving average, local-only and central references.
//! Every method is scored by the same rolling-origin evaluation (core's `model::demand`).

use crate::dataset::retail::{self, RetailSpec};
use crate::dataset::superstore;
use crate::runner::{LocalCoordinator, PrivacyOutcome, run_federated};
use crate::scenario::{DemandModelArg, RunArgs, ScenarioKind, cache_dir};
use anyhow::Context;
use fedretail_client::data::sales::StoreSales;
use fedretail_client::participant::LocalData;
use fedretail_core::model::Model;
use fedretail_core::model::demand::{
    DemandData, DemandLocal, DemandLoss, DemandModel, DemandSpec, LadSpec, Naive, TreeSpec,
};
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::plan::{ModelSpec, TaskSpec, TrainingPlan};
use fedretail_core::privacy::{NoisePlacement, PrivacySpec, PrivacyUnit};
use rand::SeedableRng;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

/// Weeks held out at the end of data sets of several years.
pub const TEST_WEEKS: i64 = 26;
/// Weeks held out at the end of Complete Journey (one year: a 26-week test would leave too
/// few weeks to learn from; `../shared/data.md`).
pub const TEST_WEEKS_ONE_YEAR: i64 = 13;
/// Hidden units of the demand network on one year of data (BENCHMARKS.md, "Demand on
/// Complete Journey").
pub const ONE_YEAR_HIDDEN_UNITS: u32 = 16;
/// Forecast horizons: 1 to this many weeks.
pub const HORIZON: u32 = 4;
/// Window of the moving-average baseline over several years, in weeks.
pub const MOVING_AVERAGE_WEEKS: usize = 13;
/// Window of the moving-average baseline within one year, in weeks.
pub const MOVING_AVERAGE_WEEKS_ONE_YEAR: usize = 4;

/// `--loss` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossArg {
    /// Poisson deviance (forecasts the mean).
    Poisson,
    /// Squared error on ln(1 + units).
    Log1pSquared,
    /// Absolute error on ln(1 + units) (forecasts the median).
    Log1pAbsolute,
}

/// The stores of a demand scenario on one calendar.
#[derive(Debug, Clone)]
pub struct DemandStores {
    /// Dataset name.
    pub dataset: String,
    /// Store names.
    pub names: Vec<String>,
    /// Each store's weekly sales (what its client reads).
    pub sales: Vec<StoreSales>,
    /// Each store's series of the task's groups.
    pub data: Vec<DemandData>,
    /// Product groups (sorted).
    pub groups: Vec<String>,
    /// Week index of the first week.
    pub first_week: i64,
    /// Weeks.
    pub n_weeks: usize,
    /// Whether every week's discount is recorded ahead (generated data: the promotion
    /// calendar is known; Superstore: discounts are seen only on sales).
    pub planned_discounts: bool,
    /// Weeks held out at the end.
    pub test_weeks: i64,
    /// The simple baselines: (report key, forecaster).
    pub baselines: Vec<(String, Naive)>,
    /// One year of data (Complete Journey): forecasts are relative to the recent level
    /// ([`DemandSpec::relative_to_recent`]), as no seasonal lag can set it.
    pub one_year: bool,
}

/// The training hyper-parameters of a demand run (options or defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemandHyper {
    /// Federated rounds.
    pub rounds: u64,
    /// Local epochs per round.
    pub local_epochs: u32,
    /// Local SGD step size.
    pub learning_rate: f32,
    /// L2 regularisation.
    pub regularization: f32,
    /// Server learning rate.
    pub server_lr: f32,
    /// Clipping norm of a store's update (DP runs).
    pub clip_norm: f32,
    /// Loss.
    pub loss: DemandLoss,
    /// Prior weight on the stores' personal weights.
    pub personal_regularization: f32,
    /// Hidden units of the shared network, when set (else the data's default).
    pub hidden_units: Option<u32>,
    /// Boosted trees instead of the linear model (one year of data only).
    pub trees: Option<TreeSpec>,
    /// Least absolute deviations instead of the linear model (one year of data only).
    pub lad: Option<LadSpec>,
}

/// The clipping norm of tree and LAD runs without DP: above any store's histogram or
/// statistics (clipping is checked on every upload; a sum must not be clipped).
pub const STATISTICS_CLIP_NORM_NO_DP: f32 = 1.0e7;
/// Rounds of a LAD run without DP: reweighted least squares has converged by then.
pub const LAD_ROUNDS: u64 = 5;
/// Rounds of a LAD run under DP: each round costs privacy, and one noised least-squares step
/// already holds the gain with the least spread over noise draws (BENCHMARKS.md,
/// "Demand on Complete Journey").
pub const LAD_DP_ROUNDS: u64 = 1;
/// Clipping norm of a store's LAD statistics under DP.
pub const LAD_DP_CLIP_NORM: f32 = 1.0;

/// The demand hyper-parameters of `args` (BENCHMARKS.md, "Demand forecasting", says how the
/// defaults were chosen).
pub fn hyper(args: &RunArgs) -> DemandHyper {
    hyper_of(args, args.demand_model)
}

/// The demand hyper-parameters of `args` for `kind` of model.
fn hyper_of(args: &RunArgs, kind: DemandModelArg) -> DemandHyper {
    let one_year = args.scenario == ScenarioKind::RetailDemand;
    let lad = (one_year && kind == DemandModelArg::Lad).then(|| {
        let d = LadSpec::default();
        LadSpec { ridge: args.lad_ridge.unwrap_or(d.ridge), ..d }
    });
    let trees = (one_year && kind == DemandModelArg::Trees).then(|| {
        let d = TreeSpec::default();
        TreeSpec {
            trees: args.trees.unwrap_or(d.trees),
            depth: args.tree_depth.unwrap_or(d.depth),
            ..d
        }
    });
    DemandHyper {
        trees,
        lad,
        // Trees grow one level per round.
        rounds: match (trees, lad) {
            (Some(t), _) => u64::from(t.trees * t.depth),
            (None, Some(_)) => args.rounds.unwrap_or(LAD_ROUNDS),
            (None, None) => args.rounds.unwrap_or(if one_year { 100 } else { 40 }),
        },
        local_epochs: args.local_epochs.unwrap_or(1),
        learning_rate: args.learning_rate.unwrap_or(0.003),
        regularization: args.regularization.unwrap_or(0.001),
        server_lr: args.server_lr.unwrap_or(2.0),
        clip_norm: args.clip_norm.unwrap_or(0.5),
        personal_regularization: args.personal_regularization.unwrap_or(100.0),
        hidden_units: args.hidden_units,
        loss: match args.loss {
            Some(LossArg::Poisson) => DemandLoss::Poisson,
            Some(LossArg::Log1pSquared) => DemandLoss::Log1pSquared,
            Some(LossArg::Log1pAbsolute) | None => DemandLoss::Log1pAbsolute,
        },
    }
}

/// Loads the scenario's stores.
///
/// # Errors
///
/// Download or parse failures, or a dataset too short to hold out the test weeks.
pub fn load(args: &RunArgs) -> anyhow::Result<DemandStores> {
    let (dataset, stores): (String, Vec<(String, StoreSales)>) = match args.scenario {
        ScenarioKind::Superstore => {
            let csv = superstore::fetch(&cache_dir(args.cache_dir.as_ref()))?;
            let rows = superstore::load(&csv, args.stores)?;
            let weeks = rows.iter().map(|r| fedretail_core::model::demand::week_of_day(r.day));
            let range = (weeks.clone().min().unwrap_or(0), weeks.max().unwrap_or(0));
            let stores = fedretail_client::data::sales::by_store(&rows)
                .into_iter()
                .map(|(name, rows)| (name.to_string(), StoreSales::from_rows(rows, Some(range))))
                .collect();
            (format!("Superstore orders (stores by {:?})", args.stores).to_lowercase(), stores)
        }
        ScenarioKind::RetailSynthetic => {
            let spec = RetailSpec { n_stores: args.synthetic_stores, ..RetailSpec::default() };
            (
                format!("synthetic retail ({} stores)", spec.n_stores),
                retail::generate(&spec, args.seed),
            )
        }
        ScenarioKind::RetailDemand => {
            use crate::dataset::completejourney::{self, DemandOptions, Grouping};
            let cj = completejourney::load_cached(&cache_dir(args.cache_dir.as_ref()))?;
            let grouping = match args.demand_groups {
                crate::scenario::DemandGroupsArg::Departments => Grouping::Departments(12),
                crate::scenario::DemandGroupsArg::Categories => Grouping::Categories(30),
            };
            let options = DemandOptions { min_households: args.min_households, grouping };
            (
                format!(
                    "Complete Journey (stores with at least {} households, {})",
                    args.min_households,
                    match grouping {
                        Grouping::Departments(n) => format!("top {n} departments"),
                        Grouping::Categories(n) => format!("top {n} categories"),
                    }
                ),
                completejourney::demand(&cj, options)?,
            )
        }
        other => anyhow::bail!("{other:?} is not a demand scenario"),
    };
    // One year of data has no seasonal lag: the last 13 weeks are the test, and last week and
    // the 4-week mean are the simple baselines.
    let one_year = args.scenario == ScenarioKind::RetailDemand;
    let (test_weeks, baselines, history) = if one_year {
        (
            TEST_WEEKS_ONE_YEAR,
            vec![
                ("last_week".to_string(), Naive::MovingAverage(1)),
                ("moving_average".to_string(), Naive::MovingAverage(MOVING_AVERAGE_WEEKS_ONE_YEAR)),
            ],
            26,
        )
    } else {
        (
            TEST_WEEKS,
            vec![
                ("seasonal_naive".to_string(), Naive::Seasonal),
                ("moving_average".to_string(), Naive::MovingAverage(MOVING_AVERAGE_WEEKS)),
            ],
            52,
        )
    };
    let mut groups: Vec<String> =
        stores.iter().flat_map(|(_, s)| s.groups.keys().cloned()).collect();
    groups.sort();
    groups.dedup();
    // One calendar: from the earliest store's first week to the common last week.
    let first_week = stores.iter().map(|(_, s)| s.first_week).min().context("no stores")?;
    let end = stores[0].1.first_week + stores[0].1.n_weeks as i64;
    anyhow::ensure!(
        stores.iter().all(|(_, s)| s.first_week + s.n_weeks as i64 == end),
        "every store's data must end in the same week"
    );
    let n_weeks = (end - first_week) as usize;
    anyhow::ensure!(
        n_weeks as i64 > test_weeks + history,
        "{n_weeks} weeks of data: need more than {} to hold out {test_weeks} and train",
        test_weeks + history
    );
    let data = stores.iter().map(|(_, s)| s.to_data(&groups).0).collect();
    let (names, sales) = stores.into_iter().unzip();
    let planned_discounts = args.scenario == ScenarioKind::RetailSynthetic;
    Ok(DemandStores {
        dataset,
        names,
        sales,
        data,
        groups,
        first_week,
        n_weeks,
        planned_discounts,
        test_weeks,
        baselines,
        one_year,
    })
}

/// The model spec: the last [`DemandStores::test_weeks`] weeks are held out.
pub fn model_spec(stores: &DemandStores, h: &DemandHyper) -> DemandSpec {
    spec_for(
        stores.groups.clone(),
        stores.first_week + stores.n_weeks as i64 - stores.test_weeks,
        h,
        stores.planned_discounts,
        stores.one_year,
    )
}

/// The demand model of the scenarios: over several years with seasonal terms and each store's
/// own levels and offsets; over `one_year` relative to the recent level, with the network and
/// no seasonal terms (BENCHMARKS.md, "Demand on Complete Journey").
pub fn spec_for(
    groups: Vec<String>,
    first_test_week: i64,
    h: &DemandHyper,
    planned_discounts: bool,
    one_year: bool,
) -> DemandSpec {
    DemandSpec {
        groups,
        first_test_week,
        horizon: HORIZON,
        // Seasonal terms fitted on 38 weeks of one year extrapolate badly into its last 13.
        harmonics: if one_year { 0 } else { 2 },
        learning_rate: h.learning_rate,
        regularization: h.regularization,
        loss: h.loss,
        planned_discounts,
        personal_regularization: h.personal_regularization,
        // Every data set counts units.
        whole_units: true,
        relative_to_recent: one_year,
        hidden_units: h.hidden_units.unwrap_or(if one_year { ONE_YEAR_HIDDEN_UNITS } else { 0 }),
        trees: if one_year { h.trees } else { None },
        lad: if one_year { h.lad } else { None },
    }
}

/// Every store's series in one dataset (store `k`'s series carry store index `k`), for the
/// central reference, and where each store's series start.
fn pooled(stores: &DemandStores) -> (DemandData, Vec<usize>) {
    let mut series = Vec::new();
    let mut starts = Vec::new();
    for (k, d) in stores.data.iter().enumerate() {
        starts.push(series.len());
        // A store that opened later is padded to the common calendar; the padding lies
        // before the series' start, so it is never used.
        let pad = (d.first_week - stores.first_week) as usize;
        series.extend(d.series.iter().cloned().map(|mut s| {
            s.store = k as u32;
            s.start += pad;
            s.units.splice(0..0, std::iter::repeat_n(0.0, pad));
            s.discount.splice(0..0, std::iter::repeat_n(f32::NAN, pad));
            s
        }));
    }
    starts.push(series.len());
    (DemandData { first_week: stores.first_week, n_stores: stores.data.len(), series }, starts)
}

/// Central reference: one model on every store's series, evaluated per store.
pub fn central(
    model: &DemandModel,
    stores: &DemandStores,
    epochs: u32,
    seed: u64,
) -> Vec<EvalSums> {
    let (data, starts) = pooled(stores);
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let mut global = model.init_global(&mut rng);
    let mut local = model.init_local(&data, None);
    model.train(&mut global, &mut local, &data, epochs, &mut rng);
    let w = model.n_weights();
    let h2 = 2 * model.spec().harmonics as usize;
    stores
        .data
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let own = DemandLocal {
                store_level: vec![local.store_level[k]],
                series_level: local.series_level[starts[k]..starts[k + 1]].to_vec(),
                series_season: local.series_season[starts[k] * h2..starts[k + 1] * h2].to_vec(),
                store_weights: local.store_weights[k * w..(k + 1) * w].to_vec(),
            };
            model.evaluate(&global, &own, d, seed)
        })
        .collect()
}

/// The method key of the DP runs' model on each store alone, when the DP runs train another
/// model than the federated run.
pub const DP_LOCAL_ONLY: &str = "local_only_dp_model";

/// Local-only reference: every store trains its own model from the same start.
pub fn local_only(
    model: &DemandModel,
    stores: &DemandStores,
    epochs: u32,
    seed: u64,
) -> Vec<EvalSums> {
    stores
        .data
        .iter()
        .map(|d| {
            let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
            let mut global = model.init_global(&mut rng);
            let mut local = model.init_local(d, None);
            model.train(&mut global, &mut local, d, epochs, &mut rng);
            model.evaluate(&global, &local, d, seed)
        })
        .collect()
}

/// One method's results per store (in store order).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodRun {
    /// Method key in the report (`federated`, `local_only`, ...).
    pub key: String,
    /// Per store.
    pub per_store: Vec<EvalSums>,
    /// Privacy spent, for DP runs.
    pub privacy: Option<PrivacyOutcome>,
}

impl MethodRun {
    /// The pooled sums over stores.
    pub fn total(&self) -> EvalSums {
        let mut t = EvalSums::default();
        self.per_store.iter().for_each(|e| t.merge(e));
        t
    }
}

/// Everything a demand run found.
#[derive(Debug, Clone)]
pub struct DemandReport {
    /// Scenario.
    pub scenario: ScenarioKind,
    /// Dataset description.
    pub dataset: String,
    /// Seed.
    pub seed: u64,
    /// The federated task (without DP).
    pub spec: TaskSpec,
    /// The first DP run's task, if any (its model may differ: `--dp-demand-model`).
    pub dp_spec: Option<TaskSpec>,
    /// Epochs of the central and local-only references.
    pub reference_epochs: u32,
    /// Store names.
    pub stores: Vec<String>,
    /// Per store, weeks with any sale over the whole history.
    pub weeks_of_sales: Vec<usize>,
    /// First held-out week, as a date.
    pub first_test_date: String,
    /// Weeks per series.
    pub n_weeks: usize,
    /// Weeks held out.
    pub test_weeks: i64,
    /// Window of the moving-average baseline.
    pub moving_average_weeks: usize,
    /// The simple baseline the targets compare with, and the improvement the target asks for:
    /// the seasonal naive (10 %) over several years, the moving average (5 %) within one.
    pub target_baseline: (String, f64),
    /// Every method, baselines first.
    pub methods: Vec<MethodRun>,
    /// Per store, the hindsight bound ([`Naive::HindsightMedian`]): each series' median over
    /// its own test weeks. Not a method (it sees the test weeks); it tells which stores no
    /// constant forecast per series can help.
    pub hindsight: Vec<EvalSums>,
}

impl DemandReport {
    /// The method with this key.
    pub fn method(&self, key: &str) -> Option<&MethodRun> {
        self.methods.iter().find(|m| m.key == key)
    }
}

fn date_of_week(week: i64) -> String {
    // Week 0 starts on Monday 1970-01-05, day 4 (`week_of_day`).
    fedretail_client::data::sales::date_of_day(4 + week * 7)
        .map_or_else(|_| format!("week {week}"), |d| d.to_string())
}

/// The federated task for `model` over `n` stores.
pub fn task_spec(
    args: &RunArgs,
    spec: &DemandSpec,
    h: &DemandHyper,
    n: usize,
    name: String,
) -> TaskSpec {
    let mut task = TaskSpec {
        name,
        model: ModelSpec::Demand(spec.clone()),
        privacy: None,
        plan: TrainingPlan {
            server_optimizer: args.server_optimizer_with(h.server_lr),
            // Evaluate after the last round only: forecasts are scored on the test weeks.
            ..crate::scenario::in_process_plan(h.rounds, n as u32, h.local_epochs, args.seed)
        },
    };
    // Trees and LAD: the server step writes the next model, and statistics are summed as they
    // are.
    if spec.uploads_statistics() {
        task.plan.server_optimizer =
            fedretail_core::optim::ServerOptimizer::FedAvg { learning_rate: 1.0 };
        task.plan.weight_by_examples = false;
        task.plan.clip_norm = STATISTICS_CLIP_NORM_NO_DP;
    }
    task
}

/// Runs the demand scenario.
///
/// # Errors
///
/// Data, coordinator or participant failures.
pub async fn run(args: &RunArgs) -> anyhow::Result<DemandReport> {
    let stores = tokio::task::spawn_blocking({
        let args = args.clone();
        move || load(&args)
    })
    .await??;
    let h = hyper(args);
    let spec = model_spec(&stores, &h);
    let model = DemandModel::new(spec.clone());
    tracing::info!(dataset = %stores.dataset, stores = stores.names.len(), groups = stores.groups.len(), weeks = stores.n_weeks, "demand scenario loaded");

    let naive = |naive| stores.data.iter().map(|d| model.evaluate_naive(d, naive)).collect();
    let mut methods: Vec<MethodRun> = stores
        .baselines
        .iter()
        .map(|(key, forecaster)| MethodRun {
            key: key.clone(),
            per_store: naive(*forecaster),
            privacy: None,
        })
        .collect();

    let n = stores.names.len();
    let base_name = format!("sim-{:?}-{}", args.scenario, args.seed).to_lowercase();
    let mut task = task_spec(args, &spec, &h, n, base_name.clone());
    crate::scenario::set_secure(args, &mut task)?;
    task.validate().context("the scenario's task")?;
    let mut runs = vec![("federated".to_string(), task.clone())];
    // One year of data: the DP runs train their own model (`--dp-demand-model`; trees under
    // store-level noise split on noise, BENCHMARKS.md: WAPE 1.02 at ε = 8), LAD in one or two
    // rounds, the network with fewer, smaller steps.
    let (dp_spec, dp_h) = if stores.one_year {
        let dp = hyper_of(args, args.dp_demand_model);
        let dp_h = match args.dp_demand_model {
            DemandModelArg::Lad => DemandHyper {
                rounds: args.rounds.unwrap_or(LAD_DP_ROUNDS),
                clip_norm: args.clip_norm.unwrap_or(LAD_DP_CLIP_NORM),
                ..dp
            },
            DemandModelArg::Network => DemandHyper {
                rounds: args.rounds.unwrap_or(30),
                server_lr: args.server_lr.unwrap_or(1.0),
                ..dp
            },
            DemandModelArg::Trees => dp,
        };
        (model_spec(&stores, &dp_h), dp_h)
    } else {
        (spec.clone(), h)
    };
    // The DP runs' own model on each store alone, when it is another model: what a store
    // could do without the federation and its noise.
    let dp_local = (dp_spec != spec && !args.dp_epsilons.is_empty())
        .then(|| DemandModel::new(dp_spec.clone()));
    let references = {
        let (model, stores, epochs, seed) =
            (model.clone(), stores.clone(), args.reference_epochs, args.seed);
        let dp_local = dp_local.clone();
        tokio::task::spawn_blocking(move || {
            let dp_local = dp_local.map(|m| local_only(&m, &stores, epochs, seed));
            let local = local_only(&model, &stores, epochs, seed);
            (central(&model, &stores, epochs, seed), local, dp_local)
        })
    };
    let mut dp_task = None;
    for &epsilon in &args.dp_epsilons {
        let mut t = task_spec(args, &dp_spec, &dp_h, n, format!("{base_name}-dp{epsilon}"));
        t.plan.clip_norm = dp_h.clip_norm;
        t.plan.weight_by_examples = false;
        t.plan.min_clients = 1;
        t.privacy = Some(PrivacySpec {
            unit: PrivacyUnit::Client,
            noise_placement: match args.noise_placement {
                crate::scenario::PlacementArg::Central => NoisePlacement::Central,
                crate::scenario::PlacementArg::Distributed => NoisePlacement::Distributed,
                crate::scenario::PlacementArg::Local => NoisePlacement::Local,
            },
            target_epsilon: epsilon,
            delta: args.delta,
            sampling_rate: 1.0,
            noise_multiplier: None,
            population: None,
            adaptive_clipping: None,
            accountant: args.accountant(),
            // Each compared plan is an alternative, not a deployment: its own domain.
            domain: t.name.clone(),
            evaluation_epsilon: fedretail_core::privacy::default_evaluation_epsilon(),
            evaluation_noise_multiplier: None,
            max_stores_per_customer: 1,
        });
        crate::scenario::set_secure(args, &mut t)?;
        t.validate().context("the scenario's DP task")?;
        dp_task.get_or_insert_with(|| t.clone());
        runs.push((format!("federated_dp_eps{epsilon}"), t));
    }
    let coordinator = LocalCoordinator::start(Duration::from_secs(5)).await?;
    for (key, task) in runs {
        let progress = progress_bar(args.quiet, task.plan.rounds, &key);
        let clients = stores
            .names
            .iter()
            .zip(&stores.sales)
            .map(|(name, sales)| (name.clone(), LocalData::Sales(sales.clone())))
            .collect();
        let result = run_federated(&coordinator, &task, clients, 0.0, &progress).await;
        progress.finish_and_clear();
        let result = result.with_context(|| format!("the {key} run"))?;
        let by_store: BTreeMap<&str, EvalSums> = result
            .outcomes
            .iter()
            .map(|o| (o.store_name.as_str(), o.last_eval.unwrap_or_default()))
            .collect();
        let per_store = stores
            .names
            .iter()
            .map(|name| by_store.get(name.as_str()).copied().unwrap_or_default())
            .collect();
        tracing::info!(%key, wape = result.final_eval.wape(), "federated run finished");
        methods.push(MethodRun { key, per_store, privacy: result.privacy });
    }
    coordinator.stop().await?;
    let (central, local, dp_local) = references.await?;
    methods.insert(2, MethodRun { key: "central".into(), per_store: central, privacy: None });
    if let Some(per_store) = dp_local {
        methods.insert(2, MethodRun { key: DP_LOCAL_ONLY.into(), per_store, privacy: None });
    }
    methods.insert(2, MethodRun { key: "local_only".into(), per_store: local, privacy: None });

    Ok(DemandReport {
        scenario: args.scenario,
        dataset: stores.dataset.clone(),
        seed: args.seed,
        dp_spec: dp_task,
        spec: task,
        reference_epochs: args.reference_epochs,
        weeks_of_sales: stores.data.iter().map(DemandData::weeks_with_sales).collect(),
        stores: stores.names,
        first_test_date: date_of_week(spec.first_test_week),
        n_weeks: stores.n_weeks,
        test_weeks: stores.test_weeks,
        moving_average_weeks: stores
            .baselines
            .iter()
            .find_map(|(_, n)| match n {
                Naive::MovingAverage(w) if *w > 1 => Some(*w),
                _ => None,
            })
            .unwrap_or(MOVING_AVERAGE_WEEKS),
        target_baseline: if stores.baselines.iter().any(|(_, n)| *n == Naive::Seasonal) {
            ("seasonal_naive".into(), 0.10)
        } else {
            ("moving_average".into(), 0.05)
        },
        hindsight: naive(Naive::HindsightMedian),
        methods,
    })
}

fn progress_bar(quiet: bool, rounds: u64, key: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(rounds);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} {key} [{{bar:40}}] round {{pos}}/{{len}} {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

fn round4(v: f64) -> Value {
    if v.is_finite() { json!((v * 1e4).round() / 1e4) } else { Value::Null }
}

/// Per-store fairness: how many stores federation helps, the worst decile, the small stores.
#[derive(Debug, Clone, PartialEq)]
pub struct Fairness {
    /// Stores with sales in the test weeks (WAPE defined).
    pub stores_compared: usize,
    /// Of those, stores where federated WAPE is below local-only's.
    pub federated_beats_local_only: usize,
    /// Of those, stores where both have the same WAPE (on sparse stores typically both forecast
    /// no sales at all, the median).
    pub ties: usize,
    /// Pooled WAPE of each method's worst tenth of stores (by that method's WAPE).
    pub worst_decile: Vec<(String, f64)>,
    /// Stores in the lowest quarter by weeks of sales.
    pub small_stores: Vec<usize>,
    /// Pooled WAPE of the small stores per method.
    pub small_store_wape: Vec<(String, f64)>,
    /// Small stores where federated beats local-only.
    pub small_federated_beats_local_only: usize,
    /// Stores with test sales where even the hindsight median of every series is zero: no
    /// constant forecast per series beats forecasting nothing (WAPE 1) there.
    pub zero_is_best_constant: usize,
    /// The other stores: where a forecast can help.
    pub forecastable: usize,
    /// Forecastable stores where federated beats local-only.
    pub forecastable_federated_beats_local_only: usize,
}

/// Computes [`Fairness`].
pub fn fairness(r: &DemandReport) -> Fairness {
    let fed = r.method("federated").expect("federated run");
    let local = r.method("local_only").expect("local-only reference");
    let defined: Vec<usize> =
        (0..r.stores.len()).filter(|&k| fed.per_store[k].actual_sum > 0.0).collect();
    let beats = |k: &usize| fed.per_store[*k].wape() < local.per_store[*k].wape();
    // Zero forecasts give WAPE exactly 1; the hindsight median is never worse.
    let forecastable: Vec<usize> =
        defined.iter().copied().filter(|&k| r.hindsight[k].wape() < 1.0).collect();
    let worst_decile = r
        .methods
        .iter()
        .map(|m| {
            let mut ks = defined.clone();
            ks.sort_by(|a, b| m.per_store[*b].wape().total_cmp(&m.per_store[*a].wape()));
            let mut sums = EvalSums::default();
            ks.iter().take(defined.len().div_ceil(10)).for_each(|&k| sums.merge(&m.per_store[k]));
            (m.key.clone(), sums.wape())
        })
        .collect();
    let mut by_size = defined.clone();
    by_size.sort_by_key(|&k| (r.weeks_of_sales[k], k));
    let small_stores: Vec<usize> = by_size[..defined.len().div_ceil(4)].to_vec();
    let small_store_wape = r
        .methods
        .iter()
        .map(|m| {
            let mut sums = EvalSums::default();
            small_stores.iter().for_each(|&k| sums.merge(&m.per_store[k]));
            (m.key.clone(), sums.wape())
        })
        .collect();
    Fairness {
        stores_compared: defined.len(),
        federated_beats_local_only: defined.iter().filter(|k| beats(k)).count(),
        ties: defined
            .iter()
            .filter(|&&k| fed.per_store[k].wape() == local.per_store[k].wape())
            .count(),
        worst_decile,
        small_federated_beats_local_only: small_stores.iter().filter(|k| beats(k)).count(),
        zero_is_best_constant: defined.len() - forecastable.len(),
        forecastable_federated_beats_local_only: forecastable.iter().filter(|k| beats(k)).count(),
        forecastable: forecastable.len(),
        small_stores,
        small_store_wape,
    }
}

/// The report as JSON: `<method>.test.{wape, mae, n_forecasts}` for every method, the
/// `per_store` list and the fairness summary.
pub fn to_json(r: &DemandReport) -> Value {
    let f = fairness(r);
    let mut v = json!({
        "scenario": r.scenario,
        "dataset": r.dataset,
        "seed": r.seed,
        "n_stores": r.stores.len(),
        "n_weeks": r.n_weeks,
        "test_weeks": r.test_weeks,
        "first_test_week": r.first_test_date,
        "horizons": format!("1-{HORIZON}"),
        "task": serde_json::to_value(&r.spec).expect("plain data serialises"),
        "dp_task": serde_json::to_value(&r.dp_spec).expect("plain data serialises"),
        "reference_epochs": r.reference_epochs,
    });
    for m in &r.methods {
        let t = m.total();
        v[&m.key] = json!({ "test": { "wape": round4(t.wape()), "mae": round4(t.mae()), "n_forecasts": t.n_ratings } });
        if let Some(p) = &m.privacy {
            v[&m.key]["privacy"] = p.to_json();
        }
    }
    v["per_store"] = r
        .stores
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let wape: serde_json::Map<String, Value> =
                r.methods.iter().map(|m| (m.key.clone(), round4(m.per_store[k].wape()))).collect();
            let mae: serde_json::Map<String, Value> =
                r.methods.iter().map(|m| (m.key.clone(), round4(m.per_store[k].mae()))).collect();
            json!({
                "store": name,
                "n_weeks_of_sales": r.weeks_of_sales[k],
                "test_units": r.methods[0].per_store[k].actual_sum / f64::from(HORIZON),
                "wape": wape,
                "mae": mae,
                "hindsight_median_wape": round4(r.hindsight[k].wape()),
            })
        })
        .collect();
    v["fairness"] = json!({
        "stores_compared": f.stores_compared,
        "federated_beats_local_only": f.federated_beats_local_only,
        "ties_with_local_only": f.ties,
        "share_federated_beats_local_only": round4(f.federated_beats_local_only as f64 / f.stores_compared as f64),
        "worst_decile_wape": f.worst_decile.iter().map(|(k, w)| (k.clone(), round4(*w))).collect::<serde_json::Map<_, _>>(),
        "small_stores": f.small_stores.iter().map(|&k| r.stores[k].clone()).collect::<Vec<_>>(),
        "small_store_wape": f.small_store_wape.iter().map(|(k, w)| (k.clone(), round4(*w))).collect::<serde_json::Map<_, _>>(),
        "small_federated_beats_local_only": f.small_federated_beats_local_only,
        "zero_is_best_constant": f.zero_is_best_constant,
        "forecastable": f.forecastable,
        "forecastable_federated_beats_local_only": f.forecastable_federated_beats_local_only,
    });
    v
}

/// What kind of demand model `task` trains, for a label: `" (boosted trees)"` and the like.
fn kind(task: &TaskSpec) -> String {
    match &task.model {
        ModelSpec::Demand(d) if d.trees.is_some() => " (boosted trees)".into(),
        ModelSpec::Demand(d) if d.lad.is_some() => " (least absolute deviations)".into(),
        ModelSpec::Demand(d) if d.hidden_units > 0 => " (network)".into(),
        _ => String::new(),
    }
}

fn label(r: &DemandReport, key: &str) -> String {
    match key {
        "seasonal_naive" => "seasonal naive (52 weeks back)".into(),
        "last_week" => "last week (naive)".into(),
        "moving_average" => format!("moving average ({} weeks)", r.moving_average_weeks),
        "local_only" => "local-only (each store alone)".into(),
        DP_LOCAL_ONLY => format!(
            "local-only{}, the DP runs' model, each store alone",
            r.dp_spec.as_ref().map_or(String::new(), kind)
        ),
        "central" => "central (pooled, not federated)".into(),
        "federated" => format!("**federated**{}", kind(&r.spec)),
        k => k.strip_prefix("federated_dp_eps").map_or(k.into(), |e| {
            format!(
                "federated, store-level DP ε = {e}{}",
                r.dp_spec.as_ref().map_or(String::new(), kind)
            )
        }),
    }
}

/// The head of the report: title, the table of methods, the setup and the targets (up to the
/// fairness section).
pub fn summary(r: &DemandReport) -> String {
    to_markdown(r, "wape_per_store.svg")
        .lines()
        .take_while(|l| !l.starts_with("## Fairness"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// The report as Markdown; `plot` names the WAPE-per-store plot beside it.
pub fn to_markdown(r: &DemandReport, plot: &str) -> String {
    let f = fairness(r);
    let mut md = String::new();
    let _ = writeln!(md, "# Demand forecasting: {}\n", r.dataset);
    let _ = writeln!(md, "| method | test WAPE | test MAE | ε |\n| --- | --- | --- | --- |");
    for m in &r.methods {
        let t = m.total();
        let eps = m.privacy.as_ref().map_or("–".into(), |p| format!("{:.2}", p.epsilon));
        let _ = writeln!(md, "| {} | {:.4} | {:.4} | {eps} |", label(r, &m.key), t.wape(), t.mae());
    }
    let fed = r.method("federated").map(|m| m.total().wape()).unwrap_or(f64::NAN);
    let local = r.method("local_only").map(|m| m.total().wape()).unwrap_or(f64::NAN);
    let (baseline, aim) = &r.target_baseline;
    let naive = r.method(baseline).map(|m| m.total().wape()).unwrap_or(f64::NAN);
    let _ = writeln!(
        md,
        "\n{} stores, {} weeks; the last {} weeks (from {}) are forecast from every origin 1 to {HORIZON} weeks before. WAPE = Σ|forecast − units| / Σ units.\n",
        r.stores.len(),
        r.n_weeks,
        r.test_weeks,
        r.first_test_date
    );
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "- Federated beats local-only on {} of {} stores with test sales ({:.1} %; target ≥ 75 %); they tie on {} and local-only wins on {}.",
        f.federated_beats_local_only,
        f.stores_compared,
        100.0 * f.federated_beats_local_only as f64 / f.stores_compared as f64,
        f.ties,
        f.stores_compared - f.ties - f.federated_beats_local_only
    );
    let _ = writeln!(
        md,
        "- On {} of those stores even the hindsight median of each series over its own test weeks is zero: no constant forecast per series beats forecasting nothing there (WAPE 1). On the other {}, federated beats local-only on {}.",
        f.zero_is_best_constant, f.forecastable, f.forecastable_federated_beats_local_only
    );
    let _ = writeln!(
        md,
        "- Federated WAPE {fed:.4} against {} {naive:.4}: {:.1} % lower (target ≥ {:.0} %).",
        label(r, baseline),
        100.0 * (1.0 - fed / naive),
        100.0 * aim
    );
    for m in r.methods.iter().filter(|m| m.privacy.is_some()) {
        let w = m.total().wape();
        let kept = if local > fed {
            format!(
                "keeps {:.0} % of federation's gain over local-only ({local:.4} → {fed:.4})",
                100.0 * (local - w) / (local - fed)
            )
        } else {
            format!("federation has no gain over local-only to keep ({local:.4} → {fed:.4})")
        };
        let _ = writeln!(md, "- {}: WAPE {w:.4}; {kept}.", label(r, &m.key));
    }
    if let (Some(alone), Some(dp)) =
        (r.method(DP_LOCAL_ONLY), r.methods.iter().rfind(|m| m.privacy.is_some()))
    {
        let pairs: Vec<(f64, f64)> = alone
            .per_store
            .iter()
            .zip(&dp.per_store)
            .map(|(a, d)| (a.wape(), d.wape()))
            .filter(|(a, d)| a.is_finite() && d.is_finite())
            .collect();
        let better = pairs.iter().filter(|(a, d)| d < a).count();
        let _ = writeln!(
            md,
            "- The DP runs' model on each store alone: WAPE {:.4}; {} is better on {better} of {} stores with test sales.",
            alone.total().wape(),
            label(r, &dp.key),
            pairs.len()
        );
    }
    let _ = writeln!(md, "\n## Fairness across stores\n");
    let _ = writeln!(
        md,
        "| method | WAPE of the worst 10 % of stores | WAPE of the smallest 25 % |\n| --- | --- | --- |"
    );
    for ((key, worst), (_, small)) in f.worst_decile.iter().zip(&f.small_store_wape) {
        let _ = writeln!(md, "| {} | {worst:.4} | {small:.4} |", label(r, key));
    }
    let _ = writeln!(
        md,
        "\nSmall stores (fewest weeks with sales): {}; federated beats local-only on {} of {}.\n",
        {
            let mut names: Vec<&str> =
                f.small_stores.iter().take(20).map(|&k| r.stores[k].as_str()).collect();
            let more = f.small_stores.len().saturating_sub(20);
            let more = format!("and {more} more");
            if f.small_stores.len() > 20 {
                names.push(&more);
            }
            names.join(", ")
        },
        f.small_federated_beats_local_only,
        f.small_stores.len()
    );
    let _ = writeln!(md, "![WAPE per store]({plot})\n");
    let _ = writeln!(md, "## Per store\n");
    let keys: Vec<&str> = r.methods.iter().map(|m| m.key.as_str()).collect();
    let _ = writeln!(
        md,
        "| store | weeks with sales | test units | {} | federated − local-only | hindsight median |",
        keys.join(" | ")
    );
    let _ = writeln!(md, "| --- | --- | --- |{}--- | --- |", " --- |".repeat(keys.len()));
    let mut order: Vec<usize> = (0..r.stores.len()).collect();
    order.sort_by_key(|&k| (r.weeks_of_sales[k], k));
    let fed_m = r.method("federated").expect("federated run");
    let local_m = r.method("local_only").expect("local-only reference");
    for k in order {
        let cell = |w: f64| if w.is_finite() { format!("{w:.3}") } else { "–".into() };
        let signed = |w: f64| if w.is_finite() { format!("{w:+.3}") } else { "–".into() };
        let cells: Vec<String> = r.methods.iter().map(|m| cell(m.per_store[k].wape())).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} |",
            r.stores[k],
            r.weeks_of_sales[k],
            r.methods[0].per_store[k].actual_sum / f64::from(HORIZON),
            cells.join(" | "),
            signed(fed_m.per_store[k].wape() - local_m.per_store[k].wape()),
            cell(r.hindsight[k].wape())
        );
    }
    md
}

/// Draws each store's WAPE per method, stores ordered by weeks with sales.
///
/// # Errors
///
/// Drawing errors.
pub fn plot(path: &Path, r: &DemandReport) -> anyhow::Result<()> {
    let mut order: Vec<usize> =
        (0..r.stores.len()).filter(|&k| r.methods[0].per_store[k].actual_sum > 0.0).collect();
    order.sort_by_key(|&k| (r.weeks_of_sales[k], k));
    let shown = [r.target_baseline.0.as_str(), "local_only", "central", "federated"];
    let dp = r.methods.iter().rev().find(|m| m.privacy.is_some()).map(|m| m.key.as_str());
    let series: Vec<crate::plot::Series> = shown
        .iter()
        .copied()
        .chain(dp)
        .filter_map(|k| r.method(k))
        .map(|m| crate::plot::Series {
            label: label(r, &m.key).replace("**", ""),
            values: order.iter().map(|&k| m.per_store[k].wape()).collect(),
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        .min(4.0);
    crate::plot::per_store(
        path,
        &format!("Test WAPE per store ({})", r.dataset),
        "stores, fewest weeks with sales first",
        "WAPE (capped at 4)",
        ymax,
        &series,
    )
}

/// Writes `report.json`, `report.md` and `wape_per_store.svg` into `dir`.
///
/// # Errors
///
/// I/O or drawing errors.
pub fn write_report(dir: &Path, r: &DemandReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(&to_json(r)).expect("plain data serialises");
    std::fs::write(dir.join("report.json"), json + "\n")
        .with_context(|| format!("writing {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), to_markdown(r, "wape_per_store.svg"))
        .with_context(|| format!("writing {}", dir.display()))?;
    plot(&dir.join("wape_per_store.svg"), r)
}

/// A plan for stores started by hand, which come and go: wait a little for each phase, not ten
/// minutes.
pub fn by_hand(task: &mut TaskSpec) {
    task.plan.eval_every = 10.min(task.plan.rounds as u32);
    task.plan.select_timeout_secs = 10.0;
    task.plan.configure_timeout_secs = 60.0;
    task.plan.collect_timeout_secs = 120.0;
    task.plan.evaluate_timeout_secs = 60.0;
}

/// Writes `coordinator.toml` (listening on loopback, mTLS with the PKI that
/// `fedretail-coordinator pki init --out pki` makes beside it, these `tasks`) and
/// `store-policy.toml` (the stores' opt-in to non-private tasks) into `dir`.
///
/// # Errors
///
/// I/O errors.
pub fn write_tour_config(dir: &Path, tasks: &[TaskSpec], header: &str) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct Tls<'a> {
        ca: &'a str,
        cert: &'a str,
        key: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Policy {
        allow_without_privacy: bool,
    }
    #[derive(serde::Serialize)]
    struct Config<'a> {
        listen: &'a str,
        admin_listen: &'a str,
        store: &'a str,
        tls: Tls<'a>,
        policy: Policy,
        task: &'a [TaskSpec],
    }
    let toml = toml::to_string(&Config {
        listen: "127.0.0.1:50051",
        admin_listen: "127.0.0.1:50052",
        store: "coordinator.db",
        tls: Tls { ca: "pki/ca.crt", cert: "pki/coordinator.crt", key: "pki/coordinator.key" },
        // The tour's tasks are not private (store-level DP does not converge on a handful of
        // stores); the coordinator and the stores must both opt in to that explicitly.
        policy: Policy { allow_without_privacy: true },
        task: tasks,
    })
    .context("writing the tasks as TOML")?;
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "{header}\n# Make its PKI with `fedretail-coordinator pki init --out pki` in this directory.\n{toml}"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    let policy = dir.join("store-policy.toml");
    std::fs::write(
        &policy,
        "# The stores' policy for these non-private tasks (fedretail-client --policy).\n\
         # The store's updates leave clipped, not noised. Every other rule keeps its strict\n\
         # default (client/store-policy.toml).\n\
         allow_without_privacy = true\n",
    )
    .with_context(|| format!("writing {}", policy.display()))?;
    Ok(())
}

/// Options of `fedretail-sim export-sales`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportSalesArgs {
    /// Directory for one sales CSV per store and `coordinator.toml`.
    #[arg(long, default_value = "out/sales")]
    pub out: std::path::PathBuf,
    /// What a store is.
    #[arg(long, value_enum, default_value = "state")]
    pub stores: superstore::StoreLevel,
    /// Only the N stores with the most order lines.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Where downloaded data is cached.
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
}

/// Writes the Superstore stores as sales CSV files (the format `fedretail-client --sales`
/// reads) and a coordinator config whose demand task fits them: the groups they sell and the
/// last 26 weeks held out, with the simulator's default hyper-parameters.
///
/// # Errors
///
/// Download, parse or I/O errors.
pub fn export_sales(args: &ExportSalesArgs) -> anyhow::Result<()> {
    use fedretail_client::data::sales::{by_store, write_sales};
    let csv = superstore::fetch(&cache_dir(args.cache_dir.as_ref()))?;
    let rows = superstore::load(&csv, args.stores)?;
    let mut stores: Vec<_> = by_store(&rows).into_iter().collect();
    stores.sort_by_key(|(name, rows)| (std::cmp::Reverse(rows.len()), *name));
    stores.truncate(args.limit.unwrap_or(usize::MAX));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut groups: Vec<String> =
        stores.iter().flat_map(|(_, rows)| rows.iter().map(|r| r.product.clone())).collect();
    groups.sort();
    groups.dedup();
    for (name, rows) in &stores {
        let file = name.replace(['/', '\\', ' ', ','], "_");
        let path = args.out.join(format!("{file}.csv"));
        write_sales(&path, rows.iter().copied())
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %path.display(), rows = rows.len(), "store written");
    }
    // The task: the same calendar the simulator uses (the data's last week ends the test).
    let last_week = rows.iter().map(|r| fedretail_core::model::demand::week_of_day(r.day)).max();
    let run = crate::scenario::RunArgs::parse_defaults();
    let h = hyper(&run);
    let first_test = last_week.context("no order lines")? + 1 - TEST_WEEKS;
    let spec = spec_for(groups, first_test, &h, false, false);
    let mut task = task_spec(&run, &spec, &h, stores.len(), "superstore-demand".into());
    by_hand(&mut task);
    task.validate().context("the exported task")?;
    write_tour_config(
        &args.out,
        &[task],
        "# A demand task for the stores in this directory (fedretail-sim export-sales).",
    )?;
    tracing::info!(stores = stores.len(), "coordinator config written");
    Ok(())
}
