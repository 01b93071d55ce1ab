//! fedretail simulator: runs a federated training plan on real data before anyone deploys it.
//!
//! # Layout
//!
//! - [`dataset`]: MovieLens-100K (fetched with pip), synthetic data, splits and store partitions.
//! - [`baselines`]: central (pooled) and local-only training, the references.

pub mod baselines;
pub mod dataset;
