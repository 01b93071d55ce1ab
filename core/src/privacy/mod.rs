//! Privacy mechanisms: clipping, and the Rényi-DP accountant that turns a ledger of rounds into
//! an (ε, δ) guarantee.

pub mod accountant;
mod clip;
pub mod noise;
pub mod sampling;

pub use clip::{ClippedUpdate, clip};
