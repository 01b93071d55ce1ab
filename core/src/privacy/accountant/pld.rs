//! Privacy loss distributions (PLD) of the Poisson-subsampled Gaussian mechanism: a tighter
//! (ε, δ) than the RDP bound for the same rounds (Koskela, Jälkö and Honkela 2020; Meiser and
//! Mohammadi 2018; the method of dp-accounting's `PLDAccountant`).
//!
//! One round's privacy loss `L = ln(P(x)/Q(x))`, `x ~ P`, is put on a grid of step `interval`,
//! every value **rounded up** to the next grid point; the tail beyond the grid goes to an
//! "infinite loss" mass that counts fully towards δ. Composition adds losses, so the composed
//! distribution is the convolution of the rounds' (computed with FFTs; tails below 10⁻¹⁴ are
//! moved up to the first kept point or into the infinite mass). Every approximation moves loss
//! upwards and `δ(ε) = E[(1 − e^{ε − L})₊]` grows with the loss, so the ε reported is never
//! below the true one; rounding adds at most `interval` per round.
//!
//! Both neighbouring directions of add-or-remove-one are tracked (Zhu, Dong and Wang 2022):
//! removal, `P = (1−q)·N(0, z²) + q·N(1, z²)` against `Q = N(0, z²)`, and addition, the pair
//! swapped. The guarantee is the larger ε of the two.

use std::sync::Arc;

use realfft::RealFftPlanner;
use statrs::function::erf::erfc;

use super::{Accountant, AccountantError, Charge, Epsilon, RdpAccountant, check, coalesce};

/// The default grid step of the privacy loss (dp-accounting's default).
pub const DEFAULT_INTERVAL: f64 = 1e-4;
/// Grid points the accountant will hold; larger compositions are refused (use RDP).
const MAX_POINTS: usize = 1 << 23;
/// Tail mass dropped at each truncation (moved up, never lost).
const TAIL: f64 = 1e-14;
/// Standard deviations covered by one round's grid (Φ(−9.5) ≈ 10⁻²¹).
const SPAN: f64 = 9.5;

/// Which neighbouring dataset is the larger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The neighbour has one record fewer: `P` is the mixture.
    Remove,
    /// The neighbour has one record more: `Q` is the mixture.
    Add,
}

/// A discrete privacy loss distribution: `pmf[k]` is the probability of loss
/// `(lowest + k) · interval`; `infinity` is the probability of an unbounded loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Pld {
    interval: f64,
    lowest: i64,
    pmf: Vec<f64>,
    infinity: f64,
}

/// The standard normal survival function.
fn normal_sf(t: f64) -> f64 {
    0.5 * erfc(t / std::f64::consts::SQRT_2)
}

impl Pld {
    /// The loss that is always zero: the identity of composition.
    pub fn identity(interval: f64) -> Pld {
        Pld { interval, lowest: 0, pmf: vec![1.0], infinity: 0.0 }
    }

    /// One round of the Poisson-subsampled Gaussian mechanism (sensitivity 1, noise
    /// multiplier `z`, sampling rate `q`) in `direction`, pessimistically discretised.
    ///
    /// # Errors
    ///
    /// q outside [0, 1], z negative or not finite, or a grid larger than the accountant holds.
    pub fn poisson_gaussian(
        q: f64,
        z: f64,
        direction: Direction,
        interval: f64,
    ) -> Result<Pld, AccountantError> {
        check(&Charge { sampling_rate: q, noise_multiplier: z, rounds: 1 })?;
        if q == 0.0 {
            return Ok(Pld::identity(interval));
        }
        if z == 0.0 {
            return Ok(Pld { interval, lowest: 0, pmf: vec![1.0 - q], infinity: q });
        }
        let var = z * z;
        // The loss as a function of x (increasing for removal, decreasing for addition):
        // ln((1 − q) + q·e^{(2x − 1)/(2z²)}), computed as ln1p(q·expm1(·)).
        let mix = |x: f64| {
            let t = (2.0 * x - 1.0) / (2.0 * var);
            if q == 1.0 { t } else { (q * t.exp_m1()).ln_1p() }
        };
        // The x where the mixture's log-ratio equals l, or None where no x reaches it.
        let inverse = |l: f64| {
            let u = l.exp_m1() / q;
            (u > -1.0).then(|| var * u.ln_1p() + 0.5)
        };
        let (x_lo, x_hi) = match direction {
            Direction::Remove => (-SPAN * z, 1.0 + SPAN * z),
            Direction::Add => (-SPAN * z, SPAN * z),
        };
        // `above(l)`: the probability, under P, that the loss exceeds l.
        let above = |l: f64| -> f64 {
            match direction {
                Direction::Remove => match inverse(l) {
                    None => 1.0,
                    Some(x) => (1.0 - q) * normal_sf(x / z) + q * normal_sf((x - 1.0) / z),
                },
                // L = −mix(x) > l  ⇔  mix(x) < −l  ⇔  x < inverse(−l).
                Direction::Add => inverse(-l).map_or(0.0, |x| normal_sf(-x / z)),
            }
        };
        let (l_min, l_max) = match direction {
            Direction::Remove => (mix(x_lo), mix(x_hi)),
            Direction::Add => (-mix(x_hi), -mix(x_lo)),
        };
        let points = (l_max - l_min) / interval;
        if points.is_nan() || points >= MAX_POINTS as f64 {
            return Err(AccountantError::TooFine { points });
        }
        let lowest = (l_min / interval).floor() as i64;
        let n = ((l_max / interval).ceil() as i64 - lowest + 1) as usize;
        // Point k collects the losses in ((k − 1)·interval, k·interval]; the lowest point also
        // everything below it, and what lies above the highest point is the infinite mass.
        let tail: Vec<f64> = (0..n).map(|k| above((lowest + k as i64) as f64 * interval)).collect();
        let mut pmf = Vec::with_capacity(n);
        pmf.push(1.0 - tail[0]);
        pmf.extend(tail.windows(2).map(|w| (w[0] - w[1]).max(0.0)));
        Ok(Pld { interval, lowest, pmf, infinity: tail[n - 1] })
    }

    /// The distribution of the sum of the two losses (both rounds composed).
    ///
    /// # Errors
    ///
    /// A composed grid larger than the accountant holds.
    ///
    /// # Panics
    ///
    /// If the two grids differ.
    pub fn compose(&self, other: &Pld) -> Result<Pld, AccountantError> {
        assert!(self.interval == other.interval, "composing PLDs on different grids");
        let n = self.pmf.len() + other.pmf.len() - 1;
        if n > MAX_POINTS {
            return Err(AccountantError::TooFine { points: n as f64 });
        }
        let pmf = convolve(&self.pmf, &other.pmf);
        let infinity = 1.0 - (1.0 - self.infinity) * (1.0 - other.infinity);
        Ok(Pld { interval: self.interval, lowest: self.lowest + other.lowest, pmf, infinity }
            .truncated())
    }

    /// `rounds` independent copies composed (by repeated squaring).
    ///
    /// # Errors
    ///
    /// A composed grid larger than the accountant holds.
    pub fn self_compose(&self, rounds: u64) -> Result<Pld, AccountantError> {
        let mut result = Pld::identity(self.interval);
        let (mut base, mut t) = (self.clone(), rounds);
        while t > 0 {
            if t & 1 == 1 {
                result = result.compose(&base)?;
            }
            t >>= 1;
            if t > 0 {
                base = base.compose(&base)?;
            }
        }
        Ok(result)
    }

    /// Drops negligible tails pessimistically: the low tail moves up to the first kept point,
    /// the high tail joins the infinite mass.
    fn truncated(mut self) -> Pld {
        let mut low = 0.0;
        let mut first = 0;
        while first + 1 < self.pmf.len() && low + self.pmf[first] < TAIL {
            low += self.pmf[first];
            first += 1;
        }
        let mut high = 0.0;
        let mut last = self.pmf.len() - 1;
        while last > first && high + self.pmf[last] < TAIL {
            high += self.pmf[last];
            last -= 1;
        }
        self.pmf.truncate(last + 1);
        self.pmf.drain(..first);
        self.pmf[0] += low;
        self.lowest += first as i64;
        self.infinity += high;
        self
    }

    /// δ at `epsilon`: `P(L = ∞) + Σ p(l)·(1 − e^{ε − l})` over losses `l > ε`.
    pub fn delta(&self, epsilon: f64) -> f64 {
        let mut delta = self.infinity;
        for (k, &p) in self.pmf.iter().enumerate() {
            let l = self.loss(k);
            if l > epsilon {
                delta += p * -(epsilon - l).exp_m1();
            }
        }
        delta
    }

    /// The smallest ε ≥ 0 with `delta(ε) ≤ delta` (infinite if the infinite mass alone
    /// exceeds `delta`).
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.infinity > delta {
            return f64::INFINITY;
        }
        // On [l_{k−1}, l_k), δ(ε) = A − e^ε·B with A = P(∞) + Σ_{j≥k} p_j and
        // B = Σ_{j≥k} p_j e^{−l_j}: walk down from the top until δ at the left end exceeds
        // the target, then solve on that stretch.
        let (mut a, mut b) = (self.infinity, 0.0);
        for k in (0..self.pmf.len()).rev() {
            let l = self.loss(k);
            if l <= 0.0 {
                break;
            }
            a += self.pmf[k];
            b += self.pmf[k] * (-l).exp();
            let left = if k == 0 { f64::NEG_INFINITY } else { self.loss(k - 1) }.max(0.0);
            if a - left.exp() * b > delta {
                // ε in (left, l]: A − e^ε B = δ.
                return ((a - delta) / b).ln().clamp(left, l);
            }
        }
        0.0
    }

    fn loss(&self, k: usize) -> f64 {
        (self.lowest + k as i64) as f64 * self.interval
    }
}

/// Linear convolution of two non-negative sequences with real FFTs (negative round-off
/// cleared).
fn convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    let n = a.len() + b.len() - 1;
    if a.len().min(b.len()) <= 64 {
        let mut out = vec![0.0; n];
        for (i, &x) in a.iter().enumerate() {
            for (j, &y) in b.iter().enumerate() {
                out[i + j] += x * y;
            }
        }
        return out;
    }
    let size = n.next_power_of_two();
    let mut planner = RealFftPlanner::<f64>::new();
    let forward: Arc<dyn realfft::RealToComplex<f64>> = planner.plan_fft_forward(size);
    let inverse = planner.plan_fft_inverse(size);
    let spectrum = |x: &[f64]| {
        let mut input = vec![0.0; size];
        input[..x.len()].copy_from_slice(x);
        let mut out = forward.make_output_vec();
        forward.process(&mut input, &mut out).expect("buffer sizes from the plan");
        out
    };
    let (fa, fb) = (spectrum(a), spectrum(b));
    let mut product: Vec<_> = fa.iter().zip(&fb).map(|(x, y)| x * y).collect();
    // The DC and Nyquist bins of a real signal's spectrum are real; round-off must not say
    // otherwise or the inverse refuses them.
    product[0].im = 0.0;
    if let Some(last) = product.last_mut() {
        last.im = 0.0;
    }
    let mut out = inverse.make_output_vec();
    inverse.process(&mut product, &mut out).expect("buffer sizes from the plan");
    let scale = 1.0 / size as f64;
    out.truncate(n);
    out.iter_mut().for_each(|v| *v = (*v * scale).max(0.0));
    out
}

/// The PLD accountant: every charge's rounds composed in both neighbouring directions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PldAccountant {
    /// Grid step of the privacy loss.
    pub interval: f64,
}

impl Default for PldAccountant {
    fn default() -> PldAccountant {
        PldAccountant { interval: DEFAULT_INTERVAL }
    }
}

impl PldAccountant {
    /// The composed PLD of `charges` in `direction`. Charges with the same q and z are
    /// composed together by repeated squaring (a ledger holds one charge per round).
    ///
    /// # Errors
    ///
    /// Bad q or z, or a grid larger than the accountant holds.
    pub fn composed(
        &self,
        charges: &[Charge],
        direction: Direction,
    ) -> Result<Pld, AccountantError> {
        let mut total = Pld::identity(self.interval);
        for c in coalesce(charges)?.iter().filter(|c| c.rounds > 0) {
            let one = Pld::poisson_gaussian(
                c.sampling_rate,
                c.noise_multiplier,
                direction,
                self.interval,
            )?;
            total = total.compose(&one.self_compose(c.rounds)?)?;
        }
        Ok(total)
    }

    /// ε from the PLDs alone (both directions), without the RDP fallback.
    ///
    /// # Errors
    ///
    /// Bad inputs, or a grid larger than the accountant holds.
    pub fn pld_epsilon(&self, charges: &[Charge], delta: f64) -> Result<f64, AccountantError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(AccountantError::Delta(delta));
        }
        let mut epsilon: f64 = 0.0;
        for direction in [Direction::Remove, Direction::Add] {
            epsilon = epsilon.max(self.composed(charges, direction)?.epsilon(delta));
        }
        Ok(epsilon)
    }
}

impl Accountant for PldAccountant {
    /// The smaller of the PLD and RDP bounds (both hold, so their minimum does): the PLD one
    /// unless the grid would be too large or RDP is tighter; `order` is the RDP order when
    /// RDP gave the bound, NaN otherwise.
    fn epsilon(&self, charges: &[Charge], delta: f64) -> Result<Epsilon, AccountantError> {
        let rdp = RdpAccountant::default().epsilon(charges, delta)?;
        match self.pld_epsilon(charges, delta) {
            Ok(epsilon) if epsilon < rdp.epsilon => Ok(Epsilon { epsilon, order: f64::NAN }),
            Ok(_) | Err(AccountantError::TooFine { .. }) => Ok(rdp),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statrs::distribution::{ContinuousCDF, Normal};

    fn charge(q: f64, z: f64, rounds: u64) -> Charge {
        Charge { sampling_rate: q, noise_multiplier: z, rounds }
    }

    /// Every row of `reference_pld.csv` (dp-accounting 0.6.0's `PLDAccountant`, produced by
    /// `reference_pld.py`): never below it, and above it by at most the rounding, one grid
    /// step per round (dp-accounting interpolates where this accountant rounds up).
    #[test]
    fn agrees_with_dp_accounting_up_to_one_grid_step_per_round() {
        let acc = PldAccountant::default();
        let mut rows = 0;
        for line in include_str!("reference_pld.csv").lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let list =
                |s: &str| s.split('+').map(|v| v.parse::<f64>().unwrap()).collect::<Vec<_>>();
            let (qs, zs, ts) = (list(f[0]), list(f[1]), list(f[2]));
            let (delta, expected): (f64, f64) = (f[3].parse().unwrap(), f[4].parse().unwrap());
            let charges: Vec<Charge> =
                qs.iter().zip(&zs).zip(&ts).map(|((&q, &z), &t)| charge(q, z, t as u64)).collect();
            let rounds: f64 = ts.iter().sum();
            let got = acc.pld_epsilon(&charges, delta).unwrap();
            assert!(got >= expected - 1e-9, "{line}: got {got}, below dp-accounting");
            assert!(got <= expected + rounds * acc.interval + 1e-6, "{line}: got {got}");
            rows += 1;
        }
        assert_eq!(rows, 38);
    }

    /// With q = 1, T rounds of the Gaussian mechanism are one Gaussian mechanism of
    /// μ = √T / z, whose exact δ(ε) is Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ) (Balle and Wang
    /// 2018): the PLD ε is at least the exact one and at most one grid step per round above.
    #[test]
    fn full_participation_matches_the_exact_gaussian_curve() {
        let phi = |x: f64| Normal::standard().cdf(x);
        for (z, rounds) in [(0.8, 1u64), (1.0, 10), (2.0, 5), (5.0, 40)] {
            let mu = (rounds as f64).sqrt() / z;
            let delta_of = |e: f64| phi(mu / 2.0 - e / mu) - e.exp() * phi(-mu / 2.0 - e / mu);
            let (mut lo, mut hi) = (0.0, 100.0);
            for _ in 0..200 {
                let mid = 0.5 * (lo + hi);
                if delta_of(mid) > 1e-5 { lo = mid } else { hi = mid }
            }
            let got =
                PldAccountant::default().pld_epsilon(&[charge(1.0, z, rounds)], 1e-5).unwrap();
            assert!(got >= lo - 1e-9, "z {z} T {rounds}: {got} below the exact {lo}");
            assert!(
                got <= hi + rounds as f64 * 1e-4 + 1e-9,
                "z {z} T {rounds}: {got} against {hi}"
            );
        }
    }

    #[test]
    fn delta_and_epsilon_invert_each_other() {
        let pld =
            PldAccountant::default().composed(&[charge(0.3, 1.5, 20)], Direction::Remove).unwrap();
        for delta in [1e-3, 1e-5, 1e-8] {
            let e = pld.epsilon(delta);
            assert!(pld.delta(e) <= delta * (1.0 + 1e-9), "δ({e}) = {} > {delta}", pld.delta(e));
            assert!(pld.delta(e - 1e-3) > delta, "ε {e} is not the smallest");
        }
        // The distribution keeps its mass.
        assert!((pld.pmf.iter().sum::<f64>() + pld.infinity - 1.0).abs() < 1e-9);
    }

    /// A ledger holds one charge per round; composed together they are one phase.
    #[test]
    fn a_ledger_of_single_rounds_composes_like_one_phase() {
        let acc = PldAccountant::default();
        let ledger = vec![charge(0.3, 1.62, 1); 50];
        let phase = [charge(0.3, 1.62, 50)];
        assert_eq!(acc.pld_epsilon(&ledger, 1e-5).unwrap(), acc.pld_epsilon(&phase, 1e-5).unwrap());
    }

    #[test]
    fn never_looser_than_rdp_and_falls_back_to_it() {
        let rdp = RdpAccountant::default();
        let pld = PldAccountant::default();
        for c in [charge(0.3, 1.62, 50), charge(0.01, 1.1, 100), charge(1.0, 3.0, 3)] {
            let (r, p) = (rdp.epsilon(&[c], 1e-5).unwrap(), pld.epsilon(&[c], 1e-5).unwrap());
            assert!(p.epsilon < 0.97 * r.epsilon, "{c:?}: pld {p:?} rdp {r:?}");
            assert!(p.order.is_nan());
        }
        // Tiny noise needs a grid beyond the limit: the RDP bound stands.
        let tiny = [charge(1.0, 0.01, 1)];
        assert!(matches!(pld.pld_epsilon(&tiny, 1e-5), Err(AccountantError::TooFine { .. })));
        assert_eq!(pld.epsilon(&tiny, 1e-5).unwrap(), rdp.epsilon(&tiny, 1e-5).unwrap());
        // No noise: every sampled round releases its record.
        assert_eq!(pld.pld_epsilon(&[charge(0.5, 0.0, 1)], 1e-5).unwrap(), f64::INFINITY);
    }

    #[test]
    fn calibration_meets_the_target_with_the_smallest_noise() {
        let acc = super::super::AccountantKind::Pld;
        let z = super::super::calibrate_noise(&acc, 0.3, 50, 8.0, 1e-5).unwrap();
        let eps = |z: f64| acc.epsilon(&[charge(0.3, z, 50)], 1e-5).unwrap().epsilon;
        assert!(eps(z) <= 8.0, "{}", eps(z));
        assert!(eps(z * 0.999) > 8.0 - 0.01, "{}", eps(z * 0.999));
        let rdp_z =
            super::super::calibrate_noise(&RdpAccountant::default(), 0.3, 50, 8.0, 1e-5).unwrap();
        assert!(z < 0.95 * rdp_z, "pld {z} rdp {rdp_z}");
    }
}
