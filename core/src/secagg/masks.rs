//! Mask expansion: a 256-bit seed stretched by ChaCha20 (a cryptographic PRG) into one value
//! per coordinate, exactly uniform mod 2^b (b ≤ 32 divides the generator's 32-bit words, so
//! keeping the low b bits of each word leaves no bias).
//!
//! Values live in `u32` and wrap: sums and differences mod 2³² reduced mod 2^b at the end are
//! the sums mod 2^b.

use super::keys::Seed;
use rand::{RngExt, SeedableRng};

/// Whether a mask is added or subtracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// `x += mask`.
    Add,
    /// `x -= mask`.
    Subtract,
}

/// Adds (or subtracts) the mask of `seed` to `values`, coordinate by coordinate, mod 2³².
pub fn apply(seed: &Seed, sign: Sign, values: &mut [u32]) {
    let mut prg = rand::rngs::ChaCha20Rng::from_seed(*seed);
    let mut block = [0u32; 256];
    for chunk in values.chunks_mut(block.len()) {
        let words = &mut block[..chunk.len()];
        prg.fill(words);
        match sign {
            Sign::Add => {
                chunk.iter_mut().zip(words.iter()).for_each(|(v, m)| *v = v.wrapping_add(*m))
            }
            Sign::Subtract => {
                chunk.iter_mut().zip(words.iter()).for_each(|(v, m)| *v = v.wrapping_sub(*m));
            }
        }
    }
}

/// Reduces every value mod 2^`bits`.
pub fn reduce(values: &mut [u32], bits: u32) {
    let mask = modulus_mask(bits);
    values.iter_mut().for_each(|v| *v &= mask);
}

/// 2^bits − 1 (all ones for 32 bits).
pub fn modulus_mask(bits: u32) -> u32 {
    assert!((1..=32).contains(&bits), "bits must be in 1..=32, got {bits}");
    if bits == 32 { u32::MAX } else { (1u32 << bits) - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_added_and_subtracted_cancels_and_differs_per_seed() {
        let mut v: Vec<u32> = (0..1000).collect();
        apply(&[1; 32], Sign::Add, &mut v);
        assert_ne!(v, (0..1000).collect::<Vec<u32>>());
        let mut w = v.clone();
        apply(&[2; 32], Sign::Subtract, &mut w);
        apply(&[1; 32], Sign::Subtract, &mut v);
        assert_eq!(v, (0..1000).collect::<Vec<u32>>());
        assert_ne!(w, v);
    }
}
