//! The distributed discrete Gaussian (Kairouz, Liu and Steinke, ICML 2021): how a client turns
//! a clipped real vector into integers mod 2^b that carry its share of the noise, and how the
//! coordinator turns their sum back into reals.
//!
//! Client ([`Encoder::encode`]): pad to a power of two D, rotate with the randomised
//! Walsh–Hadamard transform of the round's public seed (spreads the vector's mass evenly, so
//! no coordinate is large), scale by 1/γ, round each coordinate up or down at random with the
//! probability that makes it unbiased, repeating until the rounded vector's norm is within
//! [`DdgParams::rounded_norm`] (conditional rounding keeps the sensitivity bounded), add exact
//! discrete Gaussian noise of variance σ²_client per coordinate ([`sample`]: integer
//! arithmetic only, Canonne, Kamath and Steinke 2020), and reduce mod 2^b.
//!
//! Coordinator ([`decode`]): lift the sum mod 2^b to the centred range [−2^{b−1}, 2^{b−1}),
//! multiply by γ, undo the rotation, drop the padding.

use rand::{CryptoRng, Rng, SeedableRng};

/// A round's quantisation and noise parameters, public and the same for every client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdgParams {
    /// b: sums are mod 2^b.
    pub bits: u32,
    /// γ: the granularity (one integer step is γ in the model's units).
    pub gamma: f64,
    /// The clipping norm c of one contribution (model units).
    pub clip: f64,
    /// β: conditional rounding retries while the norm exceeds the bound that holds with
    /// probability 1 − β (KLS21 use e^{−1/2}).
    pub beta: f64,
    /// σ²_client as a rational `num / den` (integer units): each client's noise variance.
    pub sigma2: (u64, u64),
}

impl DdgParams {
    /// D: the padded dimension of `len` coordinates.
    pub fn padded(len: usize) -> usize {
        len.max(1).next_power_of_two()
    }

    /// The ℓ2 bound of a rounded contribution in integer units (KLS21, Theorem 4.1 with β):
    /// `min(c/γ + √D, sqrt(c²/γ² + D/4 + sqrt(2 ln(1/β)) (c/γ + √D/2)))`.
    pub fn rounded_norm(&self, d: usize) -> f64 {
        let c = self.clip / self.gamma;
        let root_d = (d as f64).sqrt();
        let worst = c + root_d;
        if self.beta <= 0.0 {
            return worst;
        }
        let likely =
            (c * c + d as f64 / 4.0 + (2.0 * (1.0 / self.beta).ln()).sqrt() * (c + root_d / 2.0))
                .sqrt();
        worst.min(likely)
    }

    /// σ_client in integer units.
    pub fn sigma(&self) -> f64 {
        (self.sigma2.0 as f64 / self.sigma2.1 as f64).sqrt()
    }
}

/// The random signs of the rotation for a round's public `seed`.
fn signs(seed: u64, d: usize) -> Vec<bool> {
    use rand::RngExt;
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
    (0..d).map(|_| rng.random::<bool>()).collect()
}

/// The orthonormal fast Walsh–Hadamard transform in place (its own inverse).
///
/// # Panics
///
/// If the length is not a power of two.
pub fn walsh_hadamard(x: &mut [f64]) {
    let n = x.len();
    assert!(n.is_power_of_two(), "length {n} is not a power of two");
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, t) = (*u + *v, *u - *v);
                *u = s;
                *v = t;
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f64).sqrt();
    x.iter_mut().for_each(|v| *v *= scale);
}

/// x ↦ H·diag(s)·x (orthonormal), padded to D.
pub fn rotate(x: &[f64], seed: u64) -> Vec<f64> {
    let d = DdgParams::padded(x.len());
    let mut y = vec![0.0; d];
    for ((y, &v), &s) in y.iter_mut().zip(x).zip(&signs(seed, d)) {
        *y = if s { -v } else { v };
    }
    walsh_hadamard(&mut y);
    y
}

/// The inverse of [`rotate`], truncated to `len`.
pub fn unrotate(mut y: Vec<f64>, seed: u64, len: usize) -> Vec<f64> {
    let d = y.len();
    walsh_hadamard(&mut y);
    for (v, &s) in y.iter_mut().zip(&signs(seed, d)) {
        if s {
            *v = -*v;
        }
    }
    y.truncate(len);
    y
}

/// Encodes contributions for one round: rotation seed, parameters, padded dimension.
#[derive(Debug, Clone)]
pub struct Encoder {
    params: DdgParams,
    seed: u64,
    len: usize,
    d: usize,
}

impl Encoder {
    /// The encoder of contributions of `len` coordinates in a round with rotation `seed`.
    pub fn new(params: DdgParams, seed: u64, len: usize) -> Encoder {
        Encoder { params, seed, len, d: DdgParams::padded(len) }
    }

    /// D.
    pub fn padded_len(&self) -> usize {
        self.d
    }

    /// One contribution (its norm at most c) rotated, scaled and conditionally rounded, as
    /// integers: its ℓ2 norm is within [`DdgParams::rounded_norm`].
    ///
    /// # Panics
    ///
    /// If `x` has the wrong length.
    pub fn round<R: Rng + CryptoRng + ?Sized>(&self, x: &[f32], rng: &mut R) -> Vec<i64> {
        assert_eq!(x.len(), self.len, "contribution length");
        let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let scaled: Vec<f64> =
            rotate(&x, self.seed).into_iter().map(|v| v / self.params.gamma).collect();
        let bound = self.params.rounded_norm(self.d);
        // Without conditional rounding (β = 0) every rounding is kept: the worst-case bound
        // then holds by construction for a contribution within c, and a store's sum of many
        // contributions is rounded once.
        let conditional = self.params.beta > 0.0;
        loop {
            let rounded: Vec<i64> = scaled
                .iter()
                .map(|&v| {
                    let floor = v.floor();
                    let up = uniform_unit(rng) < v - floor;
                    floor as i64 + i64::from(up)
                })
                .collect();
            let norm2: f64 = rounded.iter().map(|&v| (v as f64) * (v as f64)).sum();
            if !conditional || norm2.sqrt() <= bound {
                return rounded;
            }
        }
    }

    /// A client's upload: the integer sum of its rounded contributions plus its discrete
    /// Gaussian noise, mod 2^b.
    ///
    /// # Panics
    ///
    /// If `sum` does not have D coordinates.
    pub fn finish<R: Rng + CryptoRng + ?Sized>(&self, sum: &[i64], rng: &mut R) -> Vec<u32> {
        assert_eq!(sum.len(), self.d, "padded length");
        let mask = super::masks::modulus_mask(self.params.bits);
        let (num, den) = self.params.sigma2;
        sum.iter().map(|&v| ((v + sample(num, den, rng)) as u32) & mask).collect()
    }

    /// [`Encoder::round`] then [`Encoder::finish`]: a client-level contribution.
    pub fn encode<R: Rng + CryptoRng + ?Sized>(&self, x: &[f32], rng: &mut R) -> Vec<u32> {
        let rounded = self.round(x, rng);
        self.finish(&rounded, rng)
    }
}

/// The coordinator's decoding of a sum mod 2^b: centred lift, × γ, inverse rotation.
pub fn decode(sum: &[u32], params: &DdgParams, seed: u64, len: usize) -> Vec<f64> {
    let bits = params.bits;
    let modulus = if bits == 32 { 1i64 << 32 } else { 1i64 << bits };
    let half = modulus / 2;
    let y: Vec<f64> = sum
        .iter()
        .map(|&v| {
            let v = i64::from(v);
            let centred = if v >= half { v - modulus } else { v };
            centred as f64 * params.gamma
        })
        .collect();
    unrotate(y, seed, len)
}

/// A uniform double in [0, 1) from 53 random bits (for rounding only; the noise never uses
/// floating point).
fn uniform_unit<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform integer in [0, n), by rejection (one 64-bit draw per try below 2⁶⁴).
fn below<R: Rng + ?Sized>(n: u128, rng: &mut R) -> u128 {
    debug_assert!(n > 0);
    if n == 1 {
        return 0;
    }
    if let Ok(small) = u64::try_from(n) {
        let shift = (small - 1).leading_zeros();
        loop {
            let v = rng.next_u64() >> shift;
            if v < small {
                return u128::from(v);
            }
        }
    }
    let shift = (n - 1).leading_zeros();
    loop {
        let v = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())) >> shift;
        if v < n {
            return v;
        }
    }
}

/// Bernoulli(num / den).
fn bernoulli<R: Rng + ?Sized>(num: u128, den: u128, rng: &mut R) -> bool {
    below(den, rng) < num
}

/// Bernoulli(exp(−num/den)) with integer arithmetic (CKS20, Algorithm 1).
fn bernoulli_exp_neg<R: Rng + ?Sized>(num: u128, den: u128, rng: &mut R) -> bool {
    if num <= den {
        let mut k: u128 = 1;
        loop {
            let Some(kd) = den.checked_mul(k) else { return k % 2 == 1 };
            if !bernoulli(num, kd, rng) {
                return k % 2 == 1;
            }
            k += 1;
        }
    }
    for _ in 0..num / den {
        if !bernoulli_exp_neg(1, 1, rng) {
            return false;
        }
    }
    bernoulli_exp_neg(num % den, den, rng)
}

/// A discrete Laplace sample of scale `t` (CKS20, Algorithm 2).
fn discrete_laplace<R: Rng + ?Sized>(t: u64, rng: &mut R) -> i64 {
    let t128 = u128::from(t);
    loop {
        let u = below(t128, rng);
        if !bernoulli_exp_neg(u, t128, rng) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_neg(1, 1, rng) {
            v += 1;
        }
        let x = u + t128 * v;
        let negative = bernoulli(1, 2, rng);
        if negative && x == 0 {
            continue;
        }
        let x = i64::try_from(x).unwrap_or(i64::MAX);
        return if negative { -x } else { x };
    }
}

/// An exact sample of the discrete Gaussian N_Z(0, σ²) with σ² = `num / den` (CKS20,
/// Algorithm 3): integer arithmetic only.
///
/// # Panics
///
/// If `den` is 0.
pub fn sample<R: Rng + ?Sized>(num: u64, den: u64, rng: &mut R) -> i64 {
    assert!(den > 0, "σ² denominator is 0");
    if num == 0 {
        return 0;
    }
    let t = (num / den).isqrt() + 1;
    let (n, d, t128) = (u128::from(num), u128::from(den), u128::from(t));
    loop {
        let y = discrete_laplace(t, rng);
        // γ = (|y| − σ²/t)² / (2σ²) = (|y|·t·den − num)² / (2·num·t²·den).
        let a = u128::from(y.unsigned_abs()).checked_mul(t128).and_then(|v| v.checked_mul(d));
        let Some(a) = a else { continue };
        let diff = a.abs_diff(n);
        let (Some(gnum), Some(gden)) = (
            diff.checked_mul(diff),
            n.checked_mul(2)
                .and_then(|v| v.checked_mul(t128 * t128))
                .and_then(|v| v.checked_mul(d)),
        ) else {
            continue;
        };
        if bernoulli_exp_neg(gnum, gden, rng) {
            return y;
        }
    }
}

/// What calibration needs to know about a task's rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdgPlan {
    /// ε the task may spend.
    pub target_epsilon: f64,
    /// δ.
    pub delta: f64,
    /// Rounds planned.
    pub rounds: u64,
    /// Poisson sampling rate of the protected unit.
    pub sampling_rate: f64,
    /// The quorum: at least this many clients' noise is in every released sum.
    pub clients: u32,
    /// c: the clipping norm of one contribution.
    pub clip: f64,
    /// Coordinates of a contribution.
    pub len: usize,
    /// b.
    pub bits: u32,
    /// The most contributions one sum holds in expectation (customers × q, or clients): the
    /// range mod 2^b must hold their sum.
    pub contributions: f64,
    /// Conditional rounding (KLS21's β = e^{−1/2}), which needs each contribution rounded on its
    /// own; `false` rounds without retries and bounds the sensitivity by the worst case
    /// c/γ + √D, which also holds for a store that rounds its sum of contributions (coupling the
    /// two roundings' randomness, Rényi divergence being jointly quasi-convex).
    pub conditional: bool,
}

/// The parameters every client of a round uses, and the charge they cost per round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibrated {
    /// Quantisation and noise.
    pub params: DdgParams,
    /// The accountant's view of one round.
    pub charge: crate::privacy::accountant::ddg::DdgCharge,
    /// The noise standard deviation of a sum at the quorum, in model units (√n σ γ).
    pub central_std: f64,
}

/// Chooses γ and σ_client so that `plan.rounds` rounds spend at most the target ε under the
/// DDG bound, and the sum of the contributions with the noise of `plan.clients` clients stays
/// inside the range mod 2^b: γ = 2 k s / 2^b, where s is the standard deviation of a rotated
/// coordinate of the sum (worst case: every contribution aligned, c·contributions/√D, plus the
/// noise), and k = sqrt(2 ln(2D / 10⁻³)) makes a wrap in any coordinate rarer than 10⁻³ per round
/// for Gaussian-like coordinates.
///
/// # Errors
///
/// The accountant's (a target no noise reaches, bad δ or q).
pub fn calibrate(
    plan: &DdgPlan,
) -> Result<Calibrated, crate::privacy::accountant::AccountantError> {
    use crate::privacy::accountant::{AccountantKind, calibrate_noise, ddg};
    let d = DdgParams::padded(plan.len);
    let z0 = calibrate_noise(
        &AccountantKind::Rdp,
        plan.sampling_rate,
        plan.rounds,
        plan.target_epsilon,
        plan.delta,
    )?;
    let n = f64::from(plan.clients.max(1));
    let k = (2.0 * (2.0 * d as f64 / 1e-3).ln()).sqrt();
    let beta = if plan.conditional { (-0.5f64).exp() } else { 0.0 };
    let mut central = z0 * plan.clip;
    let mut gamma = 0.0;
    let mut result = None;
    for _ in 0..4 {
        let signal = plan.contributions * plan.clip / (d as f64).sqrt();
        let rounding = plan.contributions * gamma * gamma / 4.0;
        let spread = (signal * signal + central * central + rounding).sqrt();
        gamma = 2.0 * k * spread / 2f64.powi(plan.bits as i32);
        let base = DdgParams { bits: plan.bits, gamma, clip: plan.clip, beta, sigma2: (0, 1) };
        let l2 = base.rounded_norm(d);
        let charge = |sigma: f64| ddg::DdgCharge {
            sampling_rate: plan.sampling_rate,
            clients: plan.clients.max(1),
            sigma,
            l2,
            l1: (l2 * l2).min((d as f64).sqrt() * l2),
            dim: d,
            rounds: plan.rounds,
        };
        let eps = |sigma: f64| ddg::epsilon(&[charge(sigma)], plan.delta).map(|e| e.epsilon);
        let (mut lo, mut hi) = (0.0, z0 * l2 / n.sqrt());
        while eps(hi)? > plan.target_epsilon {
            lo = hi;
            hi *= 2.0;
            if hi > 1e12 {
                return Err(crate::privacy::accountant::AccountantError::Unreachable {
                    target: plan.target_epsilon,
                    limit: hi,
                    reached: eps(hi)?,
                });
            }
        }
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if eps(mid)? <= plan.target_epsilon { hi = mid } else { lo = mid }
        }
        let sigma2 = rational_variance(hi * hi);
        let params = DdgParams { sigma2, ..base };
        let sigma = params.sigma();
        central = n.sqrt() * sigma * gamma;
        result = Some(Calibrated { params, charge: charge(sigma), central_std: central });
    }
    Ok(result.expect("the loop runs"))
}

/// σ² as a rational with denominator 2¹⁶ (what [`sample`] draws with), rounded up so the
/// noise is never below what was asked.
pub fn rational_variance(sigma2: f64) -> (u64, u64) {
    let den = 1u64 << 16;
    ((sigma2 * den as f64).ceil() as u64, den)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler against its exact probability mass function: chi-square over the values
    /// within 3σ (the tails pooled), and its variance.
    #[test]
    fn discrete_gaussian_matches_its_mass_function_and_variance() {
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(17);
        for (num, den) in [(9u64, 4u64), (50, 1)] {
            let s2 = num as f64 / den as f64;
            let n = 100_000;
            let draws: Vec<i64> = (0..n).map(|_| sample(num, den, &mut rng)).collect();
            let span = (3.0 * s2.sqrt()).ceil() as i64;
            let weight = |x: i64| (-(x as f64).powi(2) / (2.0 * s2)).exp();
            let z: f64 = (-200..=200).map(weight).sum();
            let mut chi2 = 0.0;
            let mut tail_expected = 1.0;
            for x in -span..=span {
                let p = weight(x) / z;
                tail_expected -= p;
                let observed = draws.iter().filter(|&&d| d == x).count() as f64;
                chi2 += (observed - p * n as f64).powi(2) / (p * n as f64);
            }
            let tail = draws.iter().filter(|d| d.abs() > span).count() as f64;
            chi2 += (tail - tail_expected * n as f64).powi(2) / (tail_expected * n as f64);
            let dof = (2 * span + 1) as f64;
            // Wilson–Hilferty 99.99th percentile of χ²(dof).
            let limit = dof * (1.0 - 2.0 / (9.0 * dof) + 3.72 * (2.0 / (9.0 * dof)).sqrt()).powi(3);
            assert!(chi2 < limit, "σ² {s2}: chi-square {chi2} over {dof} cells (limit {limit})");
            let exact_var: f64 = (-200..=200).map(|x| (x as f64).powi(2) * weight(x) / z).sum();
            let var = draws.iter().map(|&d| (d as f64).powi(2)).sum::<f64>() / n as f64;
            assert!((var / exact_var - 1.0).abs() < 0.02, "variance {var} vs {exact_var}");
            let mean = draws.iter().sum::<i64>() as f64 / n as f64;
            assert!(mean.abs() < 5.0 * (exact_var / n as f64).sqrt(), "mean {mean}");
        }
    }

    /// Calibration meets the target and spends nearly all of it; without sampling (q = 1) the
    /// distributed noise is within 2 % of central noise at 16 bits. With sampling the general
    /// amplification bound costs more (q = 0.3, ε = 8: about 1.55 times the central noise).
    #[test]
    fn calibration_meets_the_target_with_little_extra_noise_at_full_sampling() {
        for (q, most) in [(1.0, 1.02), (0.3, 1.7)] {
            let plan = DdgPlan {
                target_epsilon: 8.0,
                delta: 1e-5,
                rounds: 30,
                sampling_rate: q,
                clients: 10,
                clip: 1.0,
                len: 15_000,
                bits: 16,
                contributions: 300.0,
                conditional: true,
            };
            let c = calibrate(&plan).unwrap();
            let spent =
                crate::privacy::accountant::ddg::epsilon(&[c.charge], 1e-5).unwrap().epsilon;
            assert!(spent <= 8.0 && spent > 7.9, "q {q}: spent {spent}");
            let z = crate::privacy::accountant::calibrate_noise(
                &crate::privacy::accountant::AccountantKind::Rdp,
                q,
                30,
                8.0,
                1e-5,
            )
            .unwrap();
            let ratio = c.central_std / z;
            assert!(
                ratio > 1.0 && ratio < most,
                "q {q}: DDG noise {} vs central {z}",
                c.central_std
            );
            assert!(c.charge.tau() < 1e-9);
        }
    }

    #[test]
    fn rotation_is_orthonormal_and_inverts() {
        let x: Vec<f64> = (0..100).map(|i| (i as f64).sin()).collect();
        let y = rotate(&x, 5);
        assert_eq!(y.len(), 128);
        let n2 = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!((n2(&y) - n2(&x)).abs() < 1e-9);
        let back = unrotate(y, 5, 100);
        assert!(back.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    /// Conditional rounding keeps the norm bound, and is unbiased: the mean of many roundings
    /// is the scaled rotated input.
    #[test]
    fn rounding_respects_the_norm_bound_and_is_unbiased() {
        let params =
            DdgParams { bits: 16, gamma: 0.01, clip: 1.0, beta: (-0.5f64).exp(), sigma2: (0, 1) };
        let enc = Encoder::new(params, 3, 50);
        let x: Vec<f32> = (0..50).map(|i| ((i as f32) * 0.37).cos() * 0.14).collect();
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(norm <= 1.0);
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(4);
        let target = rotate(&x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), 3);
        let mut mean = vec![0.0; 64];
        let reps = 2000;
        for _ in 0..reps {
            let r = enc.round(&x, &mut rng);
            let n = r.iter().map(|&v| (v * v) as f64).sum::<f64>().sqrt();
            assert!(n <= params.rounded_norm(64));
            for (m, v) in mean.iter_mut().zip(&r) {
                *m += *v as f64 / reps as f64;
            }
        }
        for (m, t) in mean.iter().zip(&target) {
            assert!((m * params.gamma - t).abs() < 0.002, "{m} vs {t}");
        }
    }

    /// Encoded contributions summed mod 2^b decode to the sum of the inputs, within the
    /// rounding and noise the parameters allow.
    #[test]
    fn summed_encodings_decode_to_the_sum() {
        let params = DdgParams {
            bits: 16,
            gamma: 1e-3,
            clip: 1.0,
            beta: (-0.5f64).exp(),
            sigma2: rational_variance(4.0),
        };
        let enc = Encoder::new(params, 9, 300);
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(8);
        let inputs: Vec<Vec<f32>> = (0..10)
            .map(|c| (0..300).map(|i| (((i * 7 + c * 13) % 17) as f32 - 8.0) * 0.004).collect())
            .collect();
        let mut sum = vec![0u32; enc.padded_len()];
        for x in &inputs {
            crate::secagg::sum::add_wrapping(&mut sum, &enc.encode(x, &mut rng));
        }
        super::super::masks::reduce(&mut sum, params.bits);
        let decoded = decode(&sum, &params, 9, 300);
        let truth: Vec<f64> =
            (0..300).map(|i| inputs.iter().map(|x| f64::from(x[i])).sum()).collect();
        let err = decoded.iter().zip(&truth).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / 300.0;
        // Noise 10 × 4 γ² plus rounding ≤ 10 × γ²/4 per coordinate.
        let allowed = 10.0 * (4.0 + 0.25) * params.gamma.powi(2);
        assert!(err < 2.0 * allowed, "mean squared error {err}, expected about {allowed}");
    }
}
