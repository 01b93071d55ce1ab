//! Private evaluation: under a privacy spec, a store's evaluation sums leave it only bounded per
//! unit and noised, as a Gaussian mechanism charged like a training round (issue 10, H1).
//!
//! Each unit (a customer under customer-level privacy, the whole store under store-level
//! privacy) contributes at most `count_bound` examples: a customer with more held-out ratings
//! is scaled down to that many, keeping their mean error; a store contributes its mean per
//! example (`count_bound` 1). Every example's error is within `error_bound` and its actual value
//! within `actual_bound`, and a unit ranks at most one user. Divided by its bound, every field
//! of one unit's contribution is then at most 1, so the L2 sensitivity of the normalised vector
//! is at most √m for m fields in use, and Gaussian noise of standard deviation `z · √m · bound`
//! on each field makes the report the Gaussian mechanism with noise multiplier z.

use crate::model::metrics::EvalSums;
use rand::{CryptoRng, Rng};

/// How one store bounds and noises its evaluation under privacy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalPrivacy {
    /// z of the evaluation's Gaussian mechanism.
    pub noise_multiplier: f64,
    /// Examples one unit contributes at most (customers: held-out ratings; stores: 1, so the
    /// store reports per-example means).
    pub count_bound: u64,
    /// The largest absolute error of one example (the rating range, or units for demand).
    pub error_bound: f64,
    /// The largest actual value of one example (demand units; 0 for ratings).
    pub actual_bound: f64,
}

impl EvalPrivacy {
    /// The bound of each field of one unit's contribution, in the order of [`fields`].
    fn bounds(&self) -> [f64; 7] {
        let k = self.count_bound as f64;
        let e = self.error_bound;
        [k, k * e * e, k * e, 1.0, 1.0, 1.0, k * self.actual_bound]
    }

    /// Fields in use (non-zero bound).
    fn fields_in_use(&self) -> usize {
        self.bounds().iter().filter(|b| **b > 0.0).count()
    }

    /// One unit's sums, bounded.
    pub fn bound(&self, unit: &EvalSums) -> EvalSums {
        let mut out = EvalSums::default();
        if unit.n_ratings > 0 {
            let n = unit.n_ratings as f64;
            let k = n.min(self.count_bound as f64);
            let scale = k / n;
            let e = self.error_bound;
            out.n_ratings = k.round() as u64;
            let kk = out.n_ratings as f64;
            out.squared_error = (unit.squared_error * scale).clamp(0.0, kk * e * e);
            out.absolute_error = (unit.absolute_error * scale).clamp(0.0, kk * e);
            out.actual_sum = (unit.actual_sum * scale).clamp(0.0, kk * self.actual_bound);
        }
        if unit.n_ranked > 0 {
            let ranked = unit.n_ranked as f64;
            out.n_ranked = 1;
            out.hits_at_10 = (unit.hits_at_10 / ranked).clamp(0.0, 1.0);
            out.ndcg_at_10 = (unit.ndcg_at_10 / ranked).clamp(0.0, 1.0);
        }
        out
    }

    /// The noise standard deviation on each field: `z · √m · bound`.
    pub fn noise_stds(&self) -> [f64; 7] {
        let scale = self.noise_multiplier * (self.fields_in_use() as f64).sqrt();
        self.bounds().map(|b| scale * b)
    }

    /// Bounds each unit, sums, and adds the mechanism's noise; then post-processes what any
    /// sums must satisfy (counts whole and non-negative, hits at most the ranked count), which
    /// costs no privacy.
    pub fn release<R: Rng + CryptoRng + ?Sized>(
        &self,
        units: impl IntoIterator<Item = EvalSums>,
        rng: &mut R,
    ) -> EvalSums {
        let mut sum = EvalSums::default();
        for unit in units {
            sum.merge(&self.bound(&unit));
        }
        let mut values = fields(&sum);
        for (v, std) in values.iter_mut().zip(self.noise_stds()) {
            let mut one = [*v];
            super::noise::add_gaussian(&mut one, std, rng);
            *v = one[0].max(0.0);
        }
        let n_ranked = values[3].round();
        EvalSums {
            n_ratings: values[0].round() as u64,
            squared_error: values[1],
            absolute_error: values[2],
            n_ranked: n_ranked as u64,
            hits_at_10: values[4].min(n_ranked),
            ndcg_at_10: values[5].min(n_ranked),
            actual_sum: values[6],
        }
    }
}

/// The fields of a sum, in a fixed order.
fn fields(s: &EvalSums) -> [f64; 7] {
    [
        s.n_ratings as f64,
        s.squared_error,
        s.absolute_error,
        s.n_ranked as f64,
        s.hits_at_10,
        s.ndcg_at_10,
        s.actual_sum,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ratings(errors: &[f64]) -> EvalSums {
        let mut s = EvalSums::default();
        for e in errors {
            s.add_rating(3.0 + *e as f32, 3.0);
        }
        s
    }

    #[test]
    fn one_unit_is_bounded_by_its_bounds() {
        let p = EvalPrivacy {
            noise_multiplier: 1.0,
            count_bound: 2,
            error_bound: 4.0,
            actual_bound: 0.0,
        };
        let mut many = ratings(&[1.0, 1.0, 1.0, 1.0]);
        many.add_rank(3);
        many.add_rank(20);
        let b = p.bound(&many);
        assert_eq!(b.n_ratings, 2);
        assert!(
            (b.squared_error - 2.0).abs() < 1e-9,
            "the mean error is kept: {}",
            b.squared_error
        );
        assert_eq!(b.n_ranked, 1);
        assert!((b.hits_at_10 - 0.5).abs() < 1e-9);
        // Normalised by the bounds, every field of one unit is within 1: sensitivity √m.
        for (v, bound) in fields(&b).iter().zip(p.bounds()) {
            assert!(*v <= bound + 1e-12);
        }
        assert_eq!(p.fields_in_use(), 6, "ratings use six fields; actual_sum is unused");
    }

    /// The released sums carry the stated noise: over many releases of the same data, the
    /// sample standard deviation is within 5 % of z·√m·bound.
    #[test]
    fn the_release_is_noised_as_stated() {
        // Noise small against the sums, so clamping at zero never bites.
        let p = EvalPrivacy {
            noise_multiplier: 0.01,
            count_bound: 10,
            error_bound: 4.0,
            actual_bound: 0.0,
        };
        let units: Vec<EvalSums> = (0..50).map(|_| ratings(&[0.5, -1.0, 2.0])).collect();
        let exact = {
            let mut s = EvalSums::default();
            for u in &units {
                s.merge(&p.bound(u));
            }
            s
        };
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(5);
        let n = 4000;
        let draws: Vec<f64> = (0..n)
            .map(|_| p.release(units.iter().copied(), &mut rng).squared_error - exact.squared_error)
            .collect();
        let var = draws.iter().map(|d| d * d).sum::<f64>() / n as f64;
        let expected = p.noise_stds()[1];
        assert!((var.sqrt() / expected - 1.0).abs() < 0.05, "{} vs {expected}", var.sqrt());
        let released = p.release(units.iter().copied(), &mut rng);
        assert!(released.hits_at_10 <= released.n_ranked as f64);
    }
}
