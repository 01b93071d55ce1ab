//! Shamir's t-of-n secret sharing of 256-bit seeds over the prime field GF(2⁶¹ − 1).
//!
//! A seed is eight 32-bit limbs; each limb is the constant term of its own random polynomial
//! of degree t − 1, evaluated at the holders' points x = 1, 2, …. Any t shares give the seed
//! back by Lagrange interpolation at 0; t − 1 shares are uniformly distributed whatever the
//! seed (every limb value is consistent with them), so they say nothing about it.
//!
//! Why our own: the two crates checked (`../shared/deps.md`) are either unmaintained with a
//! second rand tree (sharks) or pull an elliptic-curve stack for a few dozen lines (vsss-rs).
//! The arithmetic is a Mersenne-prime field; the randomness comes from the caller's CSPRNG.

use rand::{CryptoRng, Rng};
use thiserror::Error;

/// The field's modulus, the Mersenne prime 2⁶¹ − 1.
pub const P: u64 = (1 << 61) - 1;
/// 32-bit limbs of a 256-bit seed.
const LIMBS: usize = 8;

/// One holder's share of a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// The holder's point (1-based; 0 would be the secret itself).
    pub x: u32,
    /// The polynomials' values at `x`, one per limb.
    pub y: [u64; LIMBS],
}

impl Share {
    /// Bytes on the wire: x, then the eight values, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * LIMBS);
        out.extend_from_slice(&self.x.to_le_bytes());
        for y in self.y {
            out.extend_from_slice(&y.to_le_bytes());
        }
        out
    }

    /// The share encoded by [`Share::to_bytes`].
    ///
    /// # Errors
    ///
    /// Wrong length, x = 0, or a value outside the field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Share, ShamirError> {
        if bytes.len() != 4 + 8 * LIMBS {
            return Err(ShamirError::Malformed);
        }
        let x = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        let mut y = [0u64; LIMBS];
        for (i, chunk) in bytes[4..].chunks_exact(8).enumerate() {
            y[i] = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        if x == 0 || y.iter().any(|&v| v >= P) {
            return Err(ShamirError::Malformed);
        }
        Ok(Share { x, y })
    }
}

/// Why shares do not give a seed back.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShamirError {
    /// Fewer shares than the threshold.
    #[error("{got} shares, {threshold} needed")]
    TooFew {
        /// Distinct shares given.
        got: usize,
        /// t.
        threshold: usize,
    },
    /// Two shares at one point, or a point 0.
    #[error("shares must be at distinct non-zero points")]
    Points,
    /// A share that does not decode.
    #[error("malformed share")]
    Malformed,
    /// A limb interpolated to a value above 32 bits: the shares are not of one seed.
    #[error("the shares are inconsistent")]
    Inconsistent,
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn mul(a: u64, b: u64) -> u64 {
    let z = u128::from(a) * u128::from(b);
    let lo = (z as u64) & P;
    let hi = (z >> 61) as u64;
    add(lo, hi % P)
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

fn inverse(a: u64) -> u64 {
    debug_assert!(a != 0);
    pow(a, P - 2)
}

/// A uniform field element.
fn element<R: Rng + CryptoRng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < P {
            return v;
        }
    }
}

/// Shares `secret` among the holders at points `1..=n`, any `threshold` of whom recover it.
///
/// # Panics
///
/// If `threshold` is 0 or above `n`.
pub fn split<R: Rng + CryptoRng + ?Sized>(
    secret: &[u8; 32],
    threshold: usize,
    n: usize,
    rng: &mut R,
) -> Vec<Share> {
    split_at(secret, threshold, &(1..=n as u32).collect::<Vec<_>>(), rng)
}

/// Shares `secret` among the holders at the distinct non-zero `points`.
///
/// # Panics
///
/// If `threshold` is 0 or above the number of points, or a point is 0.
pub fn split_at<R: Rng + CryptoRng + ?Sized>(
    secret: &[u8; 32],
    threshold: usize,
    points: &[u32],
    rng: &mut R,
) -> Vec<Share> {
    let n = points.len();
    assert!(threshold >= 1 && threshold <= n, "threshold {threshold} of {n}");
    assert!(points.iter().all(|&x| x != 0), "point 0 is the secret");
    let mut coefficients: Vec<[u64; LIMBS]> = Vec::with_capacity(threshold);
    let mut constant = [0u64; LIMBS];
    for (i, limb) in secret.chunks_exact(4).enumerate() {
        constant[i] = u64::from(u32::from_le_bytes(limb.try_into().expect("4 bytes")));
    }
    coefficients.push(constant);
    for _ in 1..threshold {
        let mut c = [0u64; LIMBS];
        for v in &mut c {
            *v = element(rng);
        }
        coefficients.push(c);
    }
    points
        .iter()
        .map(|&x| {
            let xf = u64::from(x);
            let mut y = [0u64; LIMBS];
            for (l, value) in y.iter_mut().enumerate() {
                // Horner's rule from the highest coefficient.
                *value = coefficients.iter().rev().fold(0, |acc, c| add(mul(acc, xf), c[l]));
            }
            Share { x, y }
        })
        .collect()
}

/// The seed from at least `threshold` shares (the first `threshold` distinct ones are used).
///
/// # Errors
///
/// Too few shares, repeated or zero points, or shares that are not of one seed.
pub fn reconstruct(shares: &[Share], threshold: usize) -> Result<[u8; 32], ShamirError> {
    let mut used: Vec<&Share> = Vec::with_capacity(threshold);
    for s in shares {
        if s.x == 0 {
            return Err(ShamirError::Points);
        }
        if used.iter().any(|u| u.x == s.x) {
            if used.iter().any(|u| u.x == s.x && u.y != s.y) {
                return Err(ShamirError::Points);
            }
            continue;
        }
        if used.len() < threshold {
            used.push(s);
        }
    }
    if threshold == 0 || used.len() < threshold {
        return Err(ShamirError::TooFew { got: used.len(), threshold });
    }
    // Lagrange coefficients at 0: λ_i = Π_{j≠i} x_j / (x_j − x_i).
    let lambdas: Vec<u64> = used
        .iter()
        .map(|si| {
            let (mut num, mut den) = (1, 1);
            for sj in &used {
                if sj.x != si.x {
                    num = mul(num, u64::from(sj.x));
                    den = mul(den, sub(u64::from(sj.x), u64::from(si.x)));
                }
            }
            mul(num, inverse(den))
        })
        .collect();
    let mut secret = [0u8; 32];
    for l in 0..LIMBS {
        let v =
            used.iter().zip(&lambdas).fold(0, |acc, (s, &lambda)| add(acc, mul(s.y[l], lambda)));
        let limb = u32::try_from(v).map_err(|_| ShamirError::Inconsistent)?;
        secret[4 * l..4 * l + 4].copy_from_slice(&limb.to_le_bytes());
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    proptest! {
        /// Any t of n shares give the seed back, in any order.
        #[test]
        fn any_threshold_shares_reconstruct(
            secret in any::<[u8; 32]>(),
            n in 1usize..12,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
            order in any::<u64>(),
        ) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
            let mut shares = split(&secret, t, n, &mut rng);
            use rand::seq::SliceRandom;
            shares.shuffle(&mut rand::rngs::ChaCha20Rng::seed_from_u64(order));
            prop_assert_eq!(reconstruct(&shares[..t], t).unwrap(), secret);
            prop_assert_eq!(reconstruct(&shares, t).unwrap(), secret);
        }

        /// t − 1 shares are refused, and interpolating them as if they were enough gives
        /// something other than the seed.
        #[test]
        fn fewer_than_threshold_shares_fail(
            secret in any::<[u8; 32]>(),
            t in 2usize..8,
            seed in any::<u64>(),
        ) {
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
            let shares = split(&secret, t, t + 2, &mut rng);
            prop_assert_eq!(
                reconstruct(&shares[..t - 1], t),
                Err(ShamirError::TooFew { got: t - 1, threshold: t })
            );
            prop_assert_ne!(reconstruct(&shares[..t - 1], t - 1).ok(), Some(secret));
        }

        /// Shares survive their wire encoding.
        #[test]
        fn shares_round_trip_through_bytes(secret in any::<[u8; 32]>(), seed in any::<u64>()) {
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
            for s in split(&secret, 3, 5, &mut rng) {
                prop_assert_eq!(Share::from_bytes(&s.to_bytes()).unwrap(), s);
            }
        }
    }

    /// t − 1 shares are distributed independently of the seed: for two different seeds, the
    /// same randomness gives shares that differ, and for a fixed share set any seed fits (the
    /// constant term is free once t − 1 points are fixed).
    #[test]
    fn threshold_minus_one_shares_are_consistent_with_any_seed() {
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(9);
        let shares = split(&[7u8; 32], 3, 5, &mut rng);
        for other in [[0u8; 32], [255u8; 32]] {
            // A third point chosen to make `other` the constant term exists: interpolate the
            // polynomial through (0, other) and the two shares, evaluate it at x = 5.
            let mut with_other = vec![shares[0], shares[1]];
            let mut y = [0u64; LIMBS];
            for (l, v) in y.iter_mut().enumerate() {
                let o = u64::from(u32::from_le_bytes(other[4 * l..4 * l + 4].try_into().unwrap()));
                // Lagrange through x = 0, 1, 2 evaluated at 5.
                let pts = [(0u64, o), (1, shares[0].y[l]), (2, shares[1].y[l])];
                *v = pts.iter().fold(0, |acc, &(xi, yi)| {
                    let (mut num, mut den) = (1, 1);
                    for &(xj, _) in &pts {
                        if xj != xi {
                            num = mul(num, sub(5, xj));
                            den = mul(den, sub(xi, xj));
                        }
                    }
                    add(acc, mul(yi, mul(num, inverse(den))))
                });
            }
            with_other.push(Share { x: 5, y });
            assert_eq!(reconstruct(&with_other, 3).unwrap(), other);
        }
    }

    #[test]
    fn malformed_and_repeated_shares_are_refused() {
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
        let shares = split(&[1u8; 32], 2, 3, &mut rng);
        let mut clash = shares[1];
        clash.x = shares[0].x;
        assert_eq!(reconstruct(&[shares[0], clash], 2), Err(ShamirError::Points));
        assert_eq!(Share::from_bytes(&[0u8; 10]), Err(ShamirError::Malformed));
        let mut bad = shares[0].to_bytes();
        bad[..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Share::from_bytes(&bad), Err(ShamirError::Malformed));
    }
}
