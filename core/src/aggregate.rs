//! Streaming aggregation: every accepted update is added into one `f64` buffer as it arrives,
//! so memory is O(model), whatever the number of clients.

use std::ops::Range;
use std::sync::Arc;

use thiserror::Error;

use crate::stripes::{Batched, CHUNK_BYTES};

/// Why an update was not added. The round goes on without it.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum AggregateError {
    /// The update has the wrong number of parameters.
    #[error("update has {got} parameters, expected {expected}")]
    WrongShape {
        /// The model's parameter count.
        expected: usize,
        /// The update's.
        got: usize,
    },
    /// The update holds NaN or an infinity (or values whose square overflows).
    #[error("update holds non-finite values")]
    NonFinite,
    /// The update's L2 norm exceeds the round's clipping norm.
    #[error("update norm {norm:.6} exceeds the clipping norm {clip_norm}")]
    NotClipped {
        /// The update's L2 norm.
        norm: f64,
        /// The round's clipping norm.
        clip_norm: f32,
    },
    /// The weight is negative or not finite.
    #[error("weight {0} is not a finite non-negative number")]
    BadWeight(f64),
}

/// Checks an update against the round's shape and clipping norm in one read-only pass.
///
/// A finite sum of squares implies every value is finite (NaN and infinities propagate), so
/// one pass finds both problems.
///
/// # Errors
///
/// Each [`AggregateError`] variant but `BadWeight`.
pub fn validate(update: &[f32], expected: usize, clip_norm: f32) -> Result<f64, AggregateError> {
    if update.len() != expected {
        return Err(AggregateError::WrongShape { expected, got: update.len() });
    }
    let sum_sq = sum_of_squares(update);
    if !sum_sq.is_finite() {
        return Err(AggregateError::NonFinite);
    }
    let norm = sum_sq.sqrt();
    // Allow for f32 rounding in the sender's clipping.
    if norm > f64::from(clip_norm) * (1.0 + 1e-5) {
        return Err(AggregateError::NotClipped { norm, clip_norm });
    }
    Ok(norm)
}

/// Sum of squares in `f64` over eight independent lanes, so the compiler can vectorise it (a
/// single running sum is a serial dependency chain).
fn sum_of_squares(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = tail.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    lanes.iter().sum::<f64>() + tail
}

/// A weighted sum of updates in one `f64` buffer, added as they arrive.
///
/// Updates are shared with the summing threads ([`Stripes`](crate::stripes::Stripes)), not
/// copied, so [`Aggregator::add`] takes them behind an [`Arc`]; up to
/// [`BATCH`](crate::stripes::BATCH) − 1 of them wait to be added in one pass ([`Batched`]). Each coordinate still
/// sees the additions one by one in arrival order, so the sum is bit for bit that of a single
/// loop.
#[derive(Debug)]
pub struct Aggregator {
    sum: Batched<f64, (Arc<Vec<f32>>, f64)>,
    total_weight: f64,
    n_updates: usize,
}

impl Aggregator {
    /// An empty sum over `n_params` parameters.
    pub fn new(n_params: usize) -> Aggregator {
        Aggregator { sum: Batched::new(n_params, add_batch), total_weight: 0.0, n_updates: 0 }
    }

    /// Adds `weight * update`. Call [`validate`] first where the update is untrusted.
    ///
    /// # Errors
    ///
    /// [`AggregateError::WrongShape`] and [`AggregateError::BadWeight`]; the sum is unchanged.
    pub fn add(&mut self, update: Arc<Vec<f32>>, weight: f64) -> Result<(), AggregateError> {
        if update.len() != self.sum.len() {
            return Err(AggregateError::WrongShape { expected: self.sum.len(), got: update.len() });
        }
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(AggregateError::BadWeight(weight));
        }
        self.sum.push((update, weight));
        self.total_weight += weight;
        self.n_updates += 1;
        Ok(())
    }

    /// Updates added so far.
    pub fn n_updates(&self) -> usize {
        self.n_updates
    }

    /// The sum, once every update added has been summed.
    pub fn finish(self) -> Aggregate {
        Aggregate {
            sum: self.sum.finish(),
            total_weight: self.total_weight,
            n_updates: self.n_updates,
        }
    }
}

/// `sum += w₁ u₁ + … + wₙ uₙ` over `range` of each update, added one by one per coordinate,
/// a chunk of the sum at a time so that the sum is read and written once per batch.
fn add_batch(sum: &mut [f64], batch: &[(Arc<Vec<f32>>, f64)], range: Range<usize>) {
    // The common case in one loop over four streams (faster than the chunks below).
    if let [(a, 1.0), (b, 1.0), (c, 1.0), (d, 1.0)] = batch {
        let (a, b, c, d) = (&a[range.clone()], &b[range.clone()], &c[range.clone()], &d[range]);
        for ((((s, &a), &b), &c), &d) in sum.iter_mut().zip(a).zip(b).zip(c).zip(d) {
            *s = *s + f64::from(a) + f64::from(b) + f64::from(c) + f64::from(d);
        }
        return;
    }
    for (c, chunk) in sum.chunks_mut(CHUNK_BYTES / 8).enumerate() {
        let from = range.start + c * (CHUNK_BYTES / 8);
        for (update, weight) in batch {
            let x = &update[from..from + chunk.len()];
            if *weight == 1.0 {
                for (s, &x) in chunk.iter_mut().zip(x) {
                    *s += f64::from(x);
                }
            } else {
                for (s, &x) in chunk.iter_mut().zip(x) {
                    *s += weight * f64::from(x);
                }
            }
        }
    }
}

/// A finished weighted sum of updates.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    sum: Vec<f64>,
    total_weight: f64,
    n_updates: usize,
}

impl Aggregate {
    /// A sum made elsewhere (secure aggregation's unmasked, decoded sum) of `n_updates`
    /// updates with `total_weight` together.
    pub fn new(sum: Vec<f64>, total_weight: f64, n_updates: usize) -> Aggregate {
        Aggregate { sum, total_weight, n_updates }
    }

    /// Updates summed.
    pub fn n_updates(&self) -> usize {
        self.n_updates
    }

    /// Sum of their weights.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The raw weighted sum.
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }

    /// The weighted mean, `sum / total_weight` (zeros if nothing was added).
    pub fn mean(&self) -> Vec<f32> {
        if self.total_weight == 0.0 {
            return vec![0.0; self.sum.len()];
        }
        self.sum.iter().map(|&s| (s / self.total_weight) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// The aggregate does not depend on arrival order, within f64 rounding.
        #[test]
        fn aggregate_is_independent_of_arrival_order(
            updates in proptest::collection::vec((proptest::collection::vec(-10f32..10.0, 16), 0.5f64..100.0), 1..20),
            seed in any::<u64>(),
        ) {
            let mut forward = Aggregator::new(16);
            for (u, w) in &updates {
                forward.add(Arc::new(u.clone()), *w).unwrap();
            }
            // A seeded shuffle (Fisher-Yates on a simple LCG, to keep the test independent of rand).
            let mut order: Vec<usize> = (0..updates.len()).collect();
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (state >> 33) as usize % (i + 1));
            }
            let mut shuffled = Aggregator::new(16);
            for &i in &order {
                shuffled.add(Arc::new(updates[i].0.clone()), updates[i].1).unwrap();
            }
            let (forward, shuffled) = (forward.finish(), shuffled.finish());
            for (a, b) in forward.sum().iter().zip(shuffled.sum()) {
                prop_assert!((a - b).abs() <= 1e-9 * (1.0 + a.abs()), "{a} vs {b}");
            }
            prop_assert_eq!(forward.mean().len(), 16);
        }
    }

    /// Batches of four, the partial batch at the end, weights other than 1, and stripes on
    /// threads: each coordinate is still the one-by-one sum in arrival order, bit for bit.
    #[test]
    fn batched_striped_sum_is_the_sequential_sum_bit_for_bit() {
        let d = 3 * crate::stripes::MIN_STRIPE + 5;
        let updates: Vec<(Arc<Vec<f32>>, f64)> = (0..11)
            .map(|k| {
                let u = (0..d).map(|i| ((i * 7919 + k * 104_729) % 2003) as f32 * 1e-3 - 1.0);
                (Arc::new(u.collect()), if k == 5 { 0.25 } else { 1.0 })
            })
            .collect();
        let mut expected = vec![0f64; d];
        for (u, w) in &updates {
            for (s, &x) in expected.iter_mut().zip(u.iter()) {
                *s += if *w == 1.0 { f64::from(x) } else { w * f64::from(x) };
            }
        }
        let mut agg = Aggregator::new(d);
        for (u, w) in &updates {
            agg.add(u.clone(), *w).unwrap();
        }
        let sum = agg.finish();
        assert_eq!(sum.n_updates(), 11);
        assert!(sum.sum().iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn weighted_mean_and_rejections() {
        let mut agg = Aggregator::new(2);
        agg.add(Arc::new(vec![1.0, 2.0]), 1.0).unwrap();
        agg.add(Arc::new(vec![3.0, 6.0]), 3.0).unwrap();
        assert_eq!(
            agg.add(Arc::new(vec![1.0]), 1.0),
            Err(AggregateError::WrongShape { expected: 2, got: 1 })
        );
        assert_eq!(
            agg.add(Arc::new(vec![1.0, 1.0]), f64::NAN).unwrap_err().to_string(),
            "weight NaN is not a finite non-negative number"
        );
        assert_eq!(agg.n_updates(), 2);
        let agg = agg.finish();
        assert_eq!(agg.mean(), vec![2.5, 5.0]);
        assert_eq!((agg.n_updates(), agg.total_weight()), (2, 4.0));
    }

    #[test]
    fn validate_finds_shape_nan_and_unclipped() {
        assert_eq!(
            validate(&[1.0], 2, 1.0),
            Err(AggregateError::WrongShape { expected: 2, got: 1 })
        );
        assert_eq!(validate(&[f32::NAN, 0.0], 2, 1.0), Err(AggregateError::NonFinite));
        assert_eq!(validate(&[f32::INFINITY, 0.0], 2, 1.0), Err(AggregateError::NonFinite));
        assert!(matches!(validate(&[3.0, 4.0], 2, 1.0), Err(AggregateError::NotClipped { .. })));
        assert!((validate(&[0.6, 0.8], 2, 1.0).unwrap() - 1.0).abs() < 1e-6);
    }
}
