//! Evaluation metrics as sufficient statistics: sums that add up exactly across stores, so the
//! coordinator sees only aggregates and still gets the same numbers as pooled evaluation.

/// Sums over held-out examples. Add two with [`EvalSums::merge`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalSums {
    /// Held-out ratings scored.
    pub n_ratings: u64,
    /// Sum of squared errors.
    pub squared_error: f64,
    /// Sum of absolute errors.
    pub absolute_error: f64,
    /// Users ranked (leave-one-out against sampled negatives).
    pub n_ranked: u64,
    /// Sum over ranked users of HR@10 (0 or 1).
    pub hits_at_10: f64,
    /// Sum over ranked users of NDCG@10.
    pub ndcg_at_10: f64,
    /// Sum of the actual values (demand forecasts: units sold), the denominator of WAPE.
    pub actual_sum: f64,
}

impl EvalSums {
    /// Adds another store's sums. Counts saturate rather than overflow: a report near
    /// `u64::MAX` cannot panic or wrap the aggregate (issue 10, M5).
    pub fn merge(&mut self, other: &EvalSums) {
        self.n_ratings = self.n_ratings.saturating_add(other.n_ratings);
        self.squared_error += other.squared_error;
        self.absolute_error += other.absolute_error;
        self.n_ranked = self.n_ranked.saturating_add(other.n_ranked);
        self.hits_at_10 += other.hits_at_10;
        self.ndcg_at_10 += other.ndcg_at_10;
        self.actual_sum += other.actual_sum;
    }

    /// Weighted absolute percentage error, `Σ|ŷ - y| / Σ y` (NaN when nothing sold).
    pub fn wape(&self) -> f64 {
        self.absolute_error / self.actual_sum
    }

    /// Root mean squared error (NaN without ratings).
    pub fn rmse(&self) -> f64 {
        (self.squared_error / self.n_ratings as f64).sqrt()
    }

    /// Mean absolute error (NaN without ratings).
    pub fn mae(&self) -> f64 {
        self.absolute_error / self.n_ratings as f64
    }

    /// Hit ratio at 10 (NaN without ranked users).
    pub fn hr_at_10(&self) -> f64 {
        self.hits_at_10 / self.n_ranked as f64
    }

    /// NDCG at 10 (NaN without ranked users).
    pub fn ndcg_at_10(&self) -> f64 {
        self.ndcg_at_10 / self.n_ranked as f64
    }

    /// Adds one held-out rating's error.
    pub fn add_rating(&mut self, predicted: f32, actual: f32) {
        let e = f64::from(predicted) - f64::from(actual);
        self.n_ratings += 1;
        self.squared_error += e * e;
        self.absolute_error += e.abs();
    }

    /// Adds one demand forecast (counted in `n_ratings`) and its actual value.
    pub fn add_forecast(&mut self, predicted: f32, actual: f32) {
        self.add_rating(predicted, actual);
        self.actual_sum += f64::from(actual);
    }

    /// Adds one user's ranking outcome: `rank` is the 0-based position of the held-out item
    /// among it and the sampled negatives, sorted by descending score.
    pub fn add_rank(&mut self, rank: usize) {
        self.n_ranked += 1;
        if rank < 10 {
            self.hits_at_10 += 1.0;
            self.ndcg_at_10 += 1.0 / ((rank + 2) as f64).log2();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10 (M5): two reports near `u64::MAX` saturate instead of panicking the driver.
    #[test]
    fn merging_huge_counts_saturates() {
        let huge = EvalSums { n_ratings: u64::MAX - 1, n_ranked: u64::MAX, ..EvalSums::default() };
        let mut total = huge;
        total.merge(&huge);
        assert_eq!((total.n_ratings, total.n_ranked), (u64::MAX, u64::MAX));
    }

    #[test]
    fn merged_sums_equal_pooled_metrics() {
        let mut a = EvalSums::default();
        a.add_rating(3.0, 4.0);
        a.add_rank(0);
        let mut b = EvalSums::default();
        b.add_rating(5.0, 2.0);
        b.add_rank(10);
        b.add_rank(2);
        a.merge(&b);
        assert_eq!(a.rmse(), 5f64.sqrt());
        assert_eq!(a.mae(), 2.0);
        assert_eq!(a.hr_at_10(), 2.0 / 3.0);
        assert!((a.ndcg_at_10() - (1.0 + 0.5) / 3.0).abs() < 1e-12);
        let mut f = EvalSums::default();
        f.add_forecast(3.0, 4.0);
        let mut g = EvalSums::default();
        g.add_forecast(0.0, 2.0);
        f.merge(&g);
        assert_eq!(f.wape(), 3.0 / 6.0);
        assert_eq!(f.mae(), 1.5);
    }
}
