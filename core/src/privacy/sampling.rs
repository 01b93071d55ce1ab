//! Poisson sampling: each member of a population is included independently with probability q.
//!
//! The RDP accountant's bound for the subsampled Gaussian assumes exactly this sampling, so the
//! coordinator selects cohorts (client unit) and stores select customers (customer unit) with
//! [`poisson`], and the returned [`Sample::sampling_rate`] is what is charged to the ledger.

use rand::{Rng, RngExt};

/// A Poisson sample and the rate the accountant must charge for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<T> {
    /// The members drawn, in population order.
    pub members: Vec<T>,
    /// q, as drawn with; the accountant charges exactly this.
    pub sampling_rate: f64,
    /// `q × population`: under Poisson sampling the sum is divided by this, not by the
    /// realised count (which depends on the data and would leak through the average).
    pub expected_count: f64,
}

/// Includes each member independently with probability `sampling_rate`.
///
/// # Panics
///
/// If `sampling_rate` is outside [0, 1].
pub fn poisson<T: Clone, R: Rng + ?Sized>(
    population: &[T],
    sampling_rate: f64,
    rng: &mut R,
) -> Sample<T> {
    assert!(
        (0.0..=1.0).contains(&sampling_rate),
        "sampling rate must be in [0, 1], got {sampling_rate}"
    );
    let members = population.iter().filter(|_| rng.random_bool(sampling_rate)).cloned().collect();
    Sample { members, sampling_rate, expected_count: sampling_rate * population.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn inclusion_frequency_matches_the_rate() {
        let population: Vec<u32> = (0..1000).collect();
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(3);
        let mut counts = vec![0u32; 1000];
        let trials = 400;
        for _ in 0..trials {
            let s = poisson(&population, 0.1, &mut rng);
            assert_eq!(s.expected_count, 100.0);
            for m in s.members {
                counts[m as usize] += 1;
            }
        }
        let total: u32 = counts.iter().sum();
        // 400 000 Bernoulli(0.1) draws: mean 40 000, sd 190.
        assert!((f64::from(total) - 40_000.0).abs() < 1000.0, "{total}");
        assert!(counts.iter().all(|&c| c > 10 && c < 80), "every member is sampled independently");
        assert!(poisson(&population, 0.0, &mut rng).members.is_empty());
        assert_eq!(poisson(&population, 1.0, &mut rng).members.len(), 1000);
    }
}
