//! The SecAgg+ communication graph (Bell et al., CCS 2020): each client shares keys and masks
//! with its k neighbours only, instead of all n − 1 peers (Bonawitz et al., CCS 2017), so a
//! client's work grows with log n rather than n.
//!
//! The graph is the Harary graph H(k, n) (each position joined to the k/2 nearest on either
//! side of a cycle) laid over a permutation of the cohort drawn from a public per-round seed,
//! after the clients are fixed: k-regular, k-connected, and the positions of any set of
//! clients an adversary chose beforehand are random.
//!
//! [`choose`] picks k and the Shamir threshold t from the stated security σ and correctness η
//! under a static adversary that controls a fraction γ of the clients and dropouts at rate δ
//! (union bounds over the n clients, binomial tails for a neighbourhood):
//!
//! - correctness: every client keeps at least t surviving neighbours to answer for it,
//!   n · P[Bin(k, 1 − δ) < t] ≤ 2^−η;
//! - shares: the coordinator with the corrupt neighbours of an honest client never holds t of
//!   both its shares (honest clients reveal one kind per peer), n · P[Bin(k, γ) ≥ 2t − k] ≤ 2^−σ;
//! - sums: the honest survivors stay connected, so the coordinator learns only the total (a cut
//!   of H(k, n) needs k/2 consecutive positions lost), n · (γ + δ)^{k/2} ≤ 2^−σ.
//!
//! When no k < n − 1 meets them, the full graph is used (Bonawitz et al.) with the threshold
//! the same bounds give for k = n − 1 (or a strict majority when they cannot be met at all:
//! small cohorts are then only as safe as their size allows, which [`GraphParams::meets`]
//! says).

use rand::SeedableRng;
use rand::seq::SliceRandom;

/// The graph's degree and the sharing threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GraphParams {
    /// Clients in the cohort.
    pub n: usize,
    /// Neighbours of each client (n − 1 for the full graph).
    pub k: usize,
    /// Shamir threshold among a client's neighbours.
    pub t: usize,
    /// Whether the bounds hold at these parameters.
    pub meets: bool,
}

/// Adversary and dropout assumptions, and the targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assumptions {
    /// γ: fraction of clients that may collude with the coordinator.
    pub corrupt: f64,
    /// δ: fraction of clients that may drop out of a round.
    pub dropout: f64,
    /// σ: statistical security in bits.
    pub security_bits: f64,
    /// η: correctness in bits.
    pub correctness_bits: f64,
}

impl Default for Assumptions {
    /// γ = 5 %, δ = 10 %, σ = 40, η = 20.
    fn default() -> Self {
        Assumptions { corrupt: 0.05, dropout: 0.10, security_bits: 40.0, correctness_bits: 20.0 }
    }
}

/// log of C(k, i).
fn ln_choose(k: usize, i: usize) -> f64 {
    let lg = |x: usize| statrs::function::gamma::ln_gamma(x as f64 + 1.0);
    lg(k) - lg(i) - lg(k - i)
}

/// P[Bin(k, p) ≥ m].
fn tail_at_least(k: usize, p: f64, m: isize) -> f64 {
    let m = m.max(0) as usize;
    if m > k {
        return 0.0;
    }
    if p <= 0.0 {
        return if m == 0 { 1.0 } else { 0.0 };
    }
    if p >= 1.0 {
        return 1.0;
    }
    (m..=k)
        .map(|i| (ln_choose(k, i) + i as f64 * p.ln() + (k - i) as f64 * (1.0 - p).ln()).exp())
        .sum::<f64>()
        .min(1.0)
}

/// k and t for a cohort of `n` under `a`.
pub fn choose(n: usize, a: &Assumptions) -> GraphParams {
    let nf = n as f64;
    let security = nf.log2() + a.security_bits;
    let correctness = nf.log2() + a.correctness_bits;
    let threshold_for = |k: usize| {
        (k / 2 + 1..=k).find(|&t| {
            let lost = 1.0 - tail_at_least(k, 1.0 - a.dropout, t as isize);
            let both = tail_at_least(k, a.corrupt, 2 * t as isize - k as isize);
            lost <= (-correctness).exp2() && both <= (-security).exp2()
        })
    };
    if n >= 3 {
        let mut k = 2;
        while k < n - 1 {
            let cut = (k / 2) as f64 * (a.corrupt + a.dropout).log2();
            if cut <= -security
                && let Some(t) = threshold_for(k)
            {
                return GraphParams { n, k, t, meets: true };
            }
            k += 2;
        }
    }
    let k = n.saturating_sub(1);
    match threshold_for(k) {
        Some(t) => GraphParams { n, k, t, meets: true },
        None => GraphParams { n, k, t: k / 2 + 1, meets: false },
    }
}

/// A round's graph: the cohort's positions on the cycle and the degree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    k: usize,
    /// `position[i]`: where client i sits on the cycle.
    position: Vec<usize>,
    /// `at[p]`: the client at position p.
    at: Vec<usize>,
}

impl Graph {
    /// The graph of degree `k` over clients `0..n`, permuted by the public `seed`.
    pub fn new(n: usize, k: usize, seed: u64) -> Graph {
        let mut at: Vec<usize> = (0..n).collect();
        at.shuffle(&mut rand::rngs::ChaCha20Rng::seed_from_u64(seed));
        let mut position = vec![0; n];
        for (p, &i) in at.iter().enumerate() {
            position[i] = p;
        }
        Graph { k: k.min(n.saturating_sub(1)), position, at }
    }

    /// Clients in the graph.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether the graph has no clients.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Whether every client is every other's neighbour.
    pub fn is_full(&self) -> bool {
        self.k + 1 >= self.len()
    }

    /// The neighbours of client `i`, ascending.
    pub fn neighbours(&self, i: usize) -> Vec<usize> {
        let n = self.len();
        let mut out: Vec<usize> = if self.is_full() {
            (0..n).filter(|&j| j != i).collect()
        } else {
            let p = self.position[i];
            let half = self.k / 2;
            (1..=half).flat_map(|d| [self.at[(p + d) % n], self.at[(p + n - d) % n]]).collect()
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether `i` and `j` are neighbours.
    pub fn adjacent(&self, i: usize, j: usize) -> bool {
        if i == j {
            return false;
        }
        if self.is_full() {
            return true;
        }
        let n = self.len();
        let (a, b) = (self.position[i], self.position[j]);
        let d = a.abs_diff(b);
        d.min(n - d) <= self.k / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_is_k_regular_and_symmetric() {
        for (n, k) in [(10, 4), (101, 8), (7, 6), (5, 10)] {
            let g = Graph::new(n, k, 3);
            let degree = k.min(n - 1);
            for i in 0..n {
                let nb = g.neighbours(i);
                assert_eq!(nb.len(), degree, "n {n} k {k}");
                for &j in &nb {
                    assert!(g.adjacent(j, i) && g.neighbours(j).contains(&i));
                }
            }
        }
    }

    /// k grows like log n, well below n for large cohorts, and the bounds hold.
    #[test]
    fn degree_and_threshold_follow_the_bounds() {
        let a = Assumptions::default();
        let p500 = choose(500, &a);
        let p10k = choose(10_000, &a);
        assert!(p500.meets && p10k.meets);
        assert!(p500.k < 120 && p10k.k < 130 && p10k.k >= p500.k, "{p500:?} {p10k:?}");
        assert!(p500.t > p500.k / 2 && p500.t <= p500.k);
        // Small cohorts use the full graph.
        let small = choose(10, &a);
        assert_eq!(small.k, 9);
        assert!(small.t > 4);
    }
}
