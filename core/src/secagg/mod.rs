//! Secure aggregation: SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017 for the full
//! graph) and the distributed discrete Gaussian (Kairouz, Liu and Steinke, ICML 2021), as pure
//! functions. The coordinator learns only the sum of a cohort's quantised, noised inputs mod
//! 2^b; the noise in it was added by the clients.
//!
//! - [`shamir`]: t-of-n sharing of 256-bit seeds over GF(2⁶¹ − 1).
//! - [`keys`]: seeds, X25519 agreement, HKDF-SHA256, AES-256-GCM, Ed25519.
//! - [`masks`]: ChaCha20 mask expansion, exactly uniform mod 2^b.
//! - [`graph`]: the k-regular graph and the choice of k and t.
//! - [`ddg`]: rotation, conditional rounding, the exact discrete Gaussian, decoding.
//! - [`protocol`]: one round's client steps and the coordinator's unmasking.
//! - [`round`]: a round's public parameters, chosen by the coordinator, checked by stores.

pub mod ddg;
pub mod graph;
pub mod keys;
pub mod masks;
pub mod protocol;
pub mod round;
pub mod shamir;
pub mod sum;
