//! What the fedretail coordinator and its store clients must agree on, as plain functions.
//!
//! This crate has no async, no I/O and no wire (`pb`) types, so everything in it is testable
//! as ordinary functions. CI enforces that it depends on neither tokio, tonic nor the proto crate.
//!
//! # Layout
//!
//! - [`ids`]: `TaskId`, `RoundId`, `ClientId`, `ModelVersion` newtypes.
//! - [`update`]: flat parameter vectors, byte encoding, chunking and checksums.
//! - [`plan`]: a task's specification (model, training plan) and its validation.
//! - [`model`]: the [`model::Model`] trait, the matrix-factorisation recommender, metrics.
//! - [`privacy`]: L2 clipping, the only constructor of [`privacy::ClippedUpdate`].
//! - [`aggregate`]: the streaming aggregator: one `f64` buffer, whatever the number of clients.
//! - [`stripes`]: a running sum split by coordinate range over threads that live as long as it.
//! - [`optim`]: server optimisers (FedAvg, FedAvgM, FedAdam).
//! - [`secagg`]: SecAgg+ (Shamir sharing, key agreement, masks, the k-regular graph) and the
//!   distributed discrete Gaussian (rotation, rounding, exact sampling, modular sums).

pub mod aggregate;
pub mod ids;
pub mod model;
pub mod optim;
pub mod plan;
pub mod privacy;
pub mod secagg;
pub mod stripes;
pub mod update;
