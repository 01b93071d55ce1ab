//! fedretail simulator: runs a federated training plan on real data before anyone deploys it.
//!
//! # Layout
//!
//! - [`dataset`]: MovieLens-100K (fetched with pip), synthetic data, splits and store partitions.
//! - [`baselines`]: central (pooled) and local-only training, the references.
//! - [`runner`]: an in-process coordinator and one gRPC client per store on loopback.
//! - [`scenario`]: a run's options, the run itself, and where its report goes.
//! - [`report`]: `report.json` and `report.md`; [`plot`]: the per-store plots.
//! - [`retail`]: the default scenario, both models on Complete Journey.
//! - [`demand`]: the demand-forecasting scenarios.
//! - [`sweep`]: the privacy–utility curve over ε, with its plot.
//! - [`mod@bench`]: transport and aggregation benchmarks.

pub mod baselines;
pub mod bench;
pub mod dataset;
pub mod demand;
pub mod plot;
pub mod report;
pub mod retail;
pub mod runner;
pub mod scenario;
pub mod secagg_bench;
pub mod sweep;
