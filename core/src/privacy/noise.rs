//! Gaussian noise for the Gaussian mechanism: standard deviation `noise_multiplier × clip_norm`
//! added to a sum of clipped contributions.
//!
//! The generator is passed in and must be a [`CryptoRng`]: production code seeds it from the OS
//! ([`os_seeded`]); only the simulator may use a fixed seed.
//! Caveat (Mironov 2012): floating-point samplers are not exactly Gaussian in their low bits;
//! a discrete Gaussian (Canonne, Kamath and Steinke 2020) is the planned replacement for the
//! distributed mode.

use rand::{CryptoRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Adds independent `N(0, std²)` noise to every value.
///
/// # Panics
///
/// If `std` is negative or not finite (validated plans never ask for that).
pub fn add_gaussian<R: Rng + CryptoRng + ?Sized>(values: &mut [f64], std: f64, rng: &mut R) {
    assert!(
        std >= 0.0 && std.is_finite(),
        "noise standard deviation must be finite and >= 0, got {std}"
    );
    if std == 0.0 {
        return;
    }
    let normal = Normal::new(0.0, std).expect("checked above");
    for v in values {
        *v += normal.sample(rng);
    }
}

/// A ChaCha20 generator seeded with 32 bytes from the operating system's CSPRNG (via ring).
///
/// # Panics
///
/// If the OS has no random source (nothing secure can be done then).
pub fn os_seeded() -> rand::rngs::ChaCha20Rng {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).expect("the OS random source works");
    rand::rngs::ChaCha20Rng::from_seed(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample variance of 200 000 draws lies within 1.5 % of std² (its standard error is
    /// sqrt(2/n) ≈ 0.32 %, so this is a 4.7-sigma band), and the mean within 4.7 standard errors.
    #[test]
    fn noise_has_the_requested_standard_deviation() {
        let n = 200_000;
        for std in [0.5, 3.0] {
            let mut values = vec![1.0; n];
            add_gaussian(&mut values, std, &mut rand::rngs::ChaCha20Rng::seed_from_u64(7));
            let mean = values.iter().sum::<f64>() / n as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            assert!((var / (std * std) - 1.0).abs() < 0.015, "variance {var} for std {std}");
            assert!((mean - 1.0).abs() < 4.7 * std / (n as f64).sqrt(), "mean {mean}");
        }
    }

    #[test]
    fn os_seeded_generators_differ() {
        use rand::RngExt;
        let (mut a, mut b) = (os_seeded(), os_seeded());
        assert_ne!(a.random::<u64>(), b.random::<u64>());
    }
}
