//! Accountant tests: agreement with dp-accounting, closed forms, monotonicity, calibration.

use super::*;
use proptest::prelude::*;

fn charge(q: f64, z: f64, rounds: u64) -> Charge {
    Charge { sampling_rate: q, noise_multiplier: z, rounds }
}

fn parse_list(field: &str) -> Vec<f64> {
    field.split('+').map(|v| v.parse().unwrap()).collect()
}

/// Every row of `reference.csv` (produced by `reference.py` with dp-accounting 0.6.0) within
/// 0.1 %: single phases over q in [1e-3, 1], z in [0.5, 5], T in [1, 1e4], and mixed schedules.
#[test]
fn agrees_with_dp_accounting_within_a_tenth_of_a_percent() {
    let acc = RdpAccountant::default();
    let mut worst = 0.0f64;
    let mut rows = 0;
    for line in include_str!("reference.csv").lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (qs, zs, ts) = (parse_list(f[0]), parse_list(f[1]), parse_list(f[2]));
        let delta: f64 = f[3].parse().unwrap();
        let expected: f64 = f[4].parse().unwrap();
        let charges: Vec<Charge> =
            qs.iter().zip(&zs).zip(&ts).map(|((&q, &z), &t)| charge(q, z, t as u64)).collect();
        let got = acc.epsilon(&charges, delta).unwrap();
        let rel = (got.epsilon - expected).abs() / expected.max(1e-12);
        worst = worst.max(rel);
        assert!(rel < 1e-3, "{line}: got {} at order {}", got.epsilon, got.order);
        rows += 1;
    }
    assert_eq!(rows, 183);
    assert!(worst < 1e-6, "agreement is to floating point, worst relative error {worst}");
}

#[test]
fn full_participation_is_the_plain_gaussian_mechanism() {
    for alpha in [1.5, 2.0, 32.0] {
        assert_eq!(rdp_poisson_gaussian(1.0, 2.0, alpha), alpha / 8.0);
    }
    assert_eq!(rdp_poisson_gaussian(0.0, 2.0, 4.0), 0.0);
    assert_eq!(rdp_poisson_gaussian(0.1, 0.0, 4.0), f64::INFINITY);
}

/// Integer orders against a direct evaluation of Mironov et al. 2019, eq. (3) at α = 2:
/// A_2 = (1-q)² + 2q(1-q) + q² e^{1/z²}.
#[test]
fn order_two_matches_the_closed_form() {
    let (q, z) = (0.03f64, 1.3f64);
    let a2 = (1.0 - q).powi(2) + 2.0 * q * (1.0 - q) + q * q * (1.0 / (z * z)).exp();
    assert!((rdp_poisson_gaussian(q, z, 2.0) - a2.ln()).abs() < 1e-14);
}

#[test]
fn bad_inputs_are_refused() {
    let acc = RdpAccountant::default();
    assert_eq!(acc.epsilon(&[charge(1.5, 1.0, 1)], 1e-5), Err(AccountantError::SamplingRate(1.5)));
    assert_eq!(
        acc.epsilon(&[charge(0.1, -1.0, 1)], 1e-5),
        Err(AccountantError::NoiseMultiplier(-1.0))
    );
    assert_eq!(acc.epsilon(&[charge(0.1, 1.0, 1)], 0.0), Err(AccountantError::Delta(0.0)));
    assert_eq!(acc.epsilon(&[], 1e-5).unwrap().epsilon, 0.0, "no rounds, no privacy spent");
}

#[test]
fn calibration_round_trips() {
    let acc = RdpAccountant::default();
    for (q, rounds, target) in
        [(0.01, 1000, 1.0), (0.1, 100, 8.0), (1.0, 10, 4.0), (0.001, 10_000, 0.5)]
    {
        let z = calibrate_noise(&acc, q, rounds, target, 1e-5).unwrap();
        let at = |z: f64| acc.epsilon(&[charge(q, z, rounds)], 1e-5).unwrap().epsilon;
        assert!(at(z) <= target, "z {z} gives {} > {target}", at(z));
        assert!(at(z * 0.999) > target, "z {z} is not the smallest: {} at 0.999 z", at(z * 0.999));
    }
    assert!(matches!(
        calibrate_noise(&acc, 0.1, 10, -1.0, 1e-5),
        Err(AccountantError::TargetEpsilon(_))
    ));
}

#[test]
fn rounds_that_would_exceed_the_budget_are_refused() {
    let acc = RdpAccountant::default();
    let z = calibrate_noise(&acc, 0.05, 100, 2.0, 1e-5).unwrap();
    let round = charge(0.05, z, 1);
    let ledger = vec![charge(0.05, z, 99)];
    assert!(admits(&acc, &ledger, round, 2.0, 1e-5).unwrap(), "the 100th round fits");
    let full = vec![charge(0.05, z, 100)];
    assert!(!admits(&acc, &full, round, 2.0, 1e-5).unwrap(), "the 101st does not");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// ε never falls when rounds grow; nor, in the regime budgets live in (ε <= 50), when the
    /// sampling rate grows or the noise shrinks.
    ///
    /// Far beyond it the reported bound is not monotone in q: with z = 1.056 and T = 468,
    /// q = 0.85 gives ε = 278.19 and q = 0.9 gives 273.35, in dp-accounting 0.6.0 exactly as here.
    /// Both are valid upper bounds (fractional-order terms are taken in absolute value); they
    /// are just not equally loose. Found by this property in CI.
    #[test]
    fn epsilon_grows_with_rounds_and_sampling_rate(q in 0.001f64..0.9, z in 0.6f64..4.0, t in 1u64..2000) {
        let acc = RdpAccountant::default();
        let eps = |q: f64, z: f64, t: u64| acc.epsilon(&[charge(q, z, t)], 1e-5).unwrap().epsilon;
        let base = eps(q, z, t);
        prop_assert!(eps(q, z, t + 1) >= base);
        if base <= 50.0 {
            prop_assert!(eps((q * 1.1).min(1.0), z, t) >= base);
            prop_assert!(eps(q, z * 0.9, t) >= base);
        }
    }

    /// Splitting a stretch of rounds into two charges changes nothing: RDP composes additively.
    #[test]
    fn composition_is_additive(q in 0.001f64..1.0, z in 0.5f64..5.0, a in 1u64..500, b in 1u64..500) {
        let acc = RdpAccountant::default();
        let whole = acc.epsilon(&[charge(q, z, a + b)], 1e-5).unwrap().epsilon;
        let split = acc.epsilon(&[charge(q, z, a), charge(q, z, b)], 1e-5).unwrap().epsilon;
        prop_assert!((whole - split).abs() <= 1e-9 * whole.max(1.0));
    }
}

/// The high-ε non-monotonicity noted above, pinned to dp-accounting's own values.
#[test]
fn far_beyond_any_budget_the_bound_follows_dp_accounting() {
    let acc = RdpAccountant::default();
    let eps = |q: f64| acc.epsilon(&[charge(q, 1.05581413145591, 468)], 1e-5).unwrap().epsilon;
    assert!((eps(0.85) - 278.1898732480583).abs() < 1e-6);
    assert!((eps(0.9) - 273.35266874469977).abs() < 1e-6);
}

/// A coordinator's ledger holds one charge per round; merged by (q, z) it is one phase, so
/// reading a long ledger costs what one phase costs.
#[test]
fn a_ledger_of_single_rounds_is_one_phase() {
    let ledger: Vec<Charge> =
        (0..300).map(|k| charge(0.3, if k % 3 == 0 { 2.0 } else { 1.5 }, 1)).collect();
    let merged = coalesce(&ledger).unwrap();
    assert_eq!(merged, vec![charge(0.3, 2.0, 100), charge(0.3, 1.5, 200)]);
    let acc = RdpAccountant::default();
    assert_eq!(acc.epsilon(&ledger, 1e-5).unwrap(), acc.epsilon(&merged, 1e-5).unwrap());
    assert_eq!(coalesce(&[charge(1.5, 1.0, 1)]), Err(AccountantError::SamplingRate(1.5)));
}
