//! The public parameters of one secure-aggregation round: the graph, the bit width, and how a
//! store turns its clipped update into integers (with its share of the discrete Gaussian noise
//! when the task places noise at the stores). The coordinator chooses them; every store
//! recomputes what its task requires and refuses less ([`RoundParams::check`]).

use super::ddg::{self, Calibrated, DdgParams, DdgPlan};
use super::graph::{self, Graph, GraphParams};
use super::protocol::RoundContext;
use crate::plan::TaskSpec;
use crate::privacy::{NoisePlacement, PrivacyUnit};

/// b when the stores add no noise (no privacy, or central noise after unmasking): wide enough
/// that quantisation costs nothing measurable.
pub const PLAIN_BITS: u32 = 32;
/// b under the distributed discrete Gaussian (the "16 bits or fewer").
pub const DDG_BITS: u32 = 16;
/// How many times the expected spread of a sum's coordinate the plain range holds.
const PLAIN_MARGIN: f64 = 4.0;

/// One round's public parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundParams {
    /// n, k and t.
    pub graph: GraphParams,
    /// The public permutation of the graph.
    pub graph_seed: u64,
    /// The public seed of the rotation.
    pub rotation_seed: u64,
    /// Quantisation and noise.
    pub ddg: DdgParams,
    /// Coordinates of a store's upload before padding.
    pub input_len: usize,
}

impl RoundParams {
    /// The round's parameters for a cohort of `n`, from the task, its stores' noise
    /// ([`task_noise`], computed once per task: it takes a fraction of a second) and the
    /// round's public seed.
    pub fn new(spec: &TaskSpec, noise: Option<&Calibrated>, n: usize, seed: u64) -> RoundParams {
        let graph = graph::choose(n, &graph::Assumptions::default());
        let input_len = spec.upload_len();
        let ddg = match noise {
            Some(c) => c.params,
            None => plain(spec, input_len),
        };
        RoundParams {
            graph,
            graph_seed: seed ^ 0x5eca_66a4,
            rotation_seed: seed ^ 0x0007_a7e5,
            ddg,
            input_len,
        }
    }

    /// D: the padded length every masked upload has.
    pub fn masked_len(&self) -> usize {
        DdgParams::padded(self.input_len)
    }

    /// The protocol's view of round `round`.
    pub fn context(&self, round: u64) -> RoundContext {
        RoundContext {
            round,
            bits: self.ddg.bits,
            len: self.masked_len(),
            threshold: self.graph.t,
            graph: Graph::new(self.graph.n, self.graph.k, self.graph_seed),
        }
    }

    /// A store's check of parameters the coordinator sent against what its task requires: a
    /// threshold above half the neighbours (so no two disjoint sets of neighbours can each
    /// reconstruct), at least the noise of the task's calibration (`noise`, the store's own
    /// [`task_noise`]), and its own upload length.
    ///
    /// # Errors
    ///
    /// What is wrong, in words.
    pub fn check(&self, spec: &TaskSpec, noise: Option<&Calibrated>) -> Result<(), String> {
        let GraphParams { n, k, t, .. } = self.graph;
        if n < spec.plan.min_clients as usize || k >= n.max(1) || 2 * t <= k || t > k {
            return Err(format!(
                "graph n = {n}, k = {k}, t = {t} is unsafe for a quorum of {}",
                spec.plan.min_clients
            ));
        }
        if self.input_len != spec.upload_len() {
            return Err(format!(
                "upload length {} is not the task's {}",
                self.input_len,
                spec.upload_len()
            ));
        }
        if noise.is_none() && self.ddg.bits != PLAIN_BITS {
            return Err(format!(
                "{} bits, where the task adds no noise at the stores",
                self.ddg.bits
            ));
        }
        if let Some(c) = noise {
            let (num, den) = self.ddg.sigma2;
            let (want_num, want_den) = c.params.sigma2;
            // num/den >= want_num/want_den, without rounding.
            let enough =
                u128::from(num) * u128::from(want_den) >= u128::from(want_num) * u128::from(den);
            if !enough || self.ddg.bits != c.params.bits || self.ddg.gamma != c.params.gamma {
                return Err(format!(
                    "the round's noise ({num}/{den} at γ = {}, {} bits) is not the task's \
                     calibration ({want_num}/{want_den} at γ = {}, {} bits)",
                    self.ddg.gamma, self.ddg.bits, c.params.gamma, c.params.bits
                ));
            }
        }
        Ok(())
    }
}

/// Quantisation without noise: 32 bits, γ so that the sum of the round's contributions stays in
/// range with a wide margin, and no conditional rounding.
fn plain(spec: &TaskSpec, len: usize) -> DdgParams {
    let (clip, contributions) = sensitivity(spec);
    let d = DdgParams::padded(len);
    let k = (2.0 * (2.0 * d as f64 / 1e-3).ln()).sqrt();
    let spread = contributions * clip / (d as f64).sqrt();
    let gamma = 2.0 * PLAIN_MARGIN * k * spread / 2f64.powi(PLAIN_BITS as i32);
    DdgParams { bits: PLAIN_BITS, gamma, clip, beta: 0.0, sigma2: (0, 1) }
}

/// One unit's clipping norm as the sum sees it (the plan's, times the stores a customer may
/// shop in) and how many units one sum holds at most in expectation.
fn sensitivity(spec: &TaskSpec) -> (f64, f64) {
    let c = f64::from(spec.plan.clip_norm);
    match &spec.privacy {
        Some(p) if p.unit == PrivacyUnit::Customer => (
            c * f64::from(p.max_stores_per_customer.max(1)),
            (p.sampling_rate * p.population.unwrap_or(1) as f64).max(1.0),
        ),
        _ => (c, f64::from(spec.plan.cohort_size.max(1))),
    }
}

/// The distributed discrete Gaussian a task's stores add under secure aggregation with
/// distributed noise, calibrated (deterministically, from the spec alone) so that the task's
/// planned rounds spend its target ε under KLS21's bound with the quorum's noise; `None` when
/// the stores add none.
///
/// # Errors
///
/// The target cannot be reached.
pub fn task_noise(spec: &TaskSpec) -> Result<Option<Calibrated>, String> {
    let Some(p) = &spec.privacy else { return Ok(None) };
    if p.noise_placement != NoisePlacement::Distributed {
        return Ok(None);
    }
    let (clip, contributions) = sensitivity(spec);
    // Stores round each unit's contribution on its own (KLS21's conditional rounding), except
    // the ranking recommender under customer-level privacy, whose contributions carry
    // statistics as well: its stores round their sum once, under the worst-case bound.
    let ranking_customers = p.unit == PrivacyUnit::Customer
        && matches!(&spec.model, crate::plan::ModelSpec::MatrixFactorization(mf)
            if mf.objective.is_ranking());
    let plan = DdgPlan {
        target_epsilon: p.target_epsilon,
        delta: p.delta,
        rounds: spec.plan.rounds,
        sampling_rate: p.sampling_rate,
        clients: spec.plan.min_clients,
        clip,
        len: spec.upload_len(),
        bits: DDG_BITS,
        contributions,
        conditional: !ranking_customers,
    };
    ddg::calibrate(&plan).map(Some).map_err(|e| format!("distributed discrete Gaussian: {e}"))
}

/// How much a quantised unit can move the sum, relative to its clipping norm: the worst case
/// of unconditional rounding, (c/γ + √D)·γ / c. Central noise after unmasking is scaled by it.
pub fn rounding_inflation(params: &DdgParams, len: usize) -> f64 {
    let d = DdgParams::padded(len) as f64;
    (params.clip / params.gamma + d.sqrt()) * params.gamma / params.clip
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{ModelSpec, TrainingPlan};

    fn spec(placement: Option<NoisePlacement>) -> TaskSpec {
        TaskSpec {
            name: "t".into(),
            model: ModelSpec::Bench { n_params: 1000 },
            plan: TrainingPlan {
                weight_by_examples: false,
                secure_aggregation: crate::plan::SecureAggregation::SecAggPlus,
                ..TrainingPlan::new(10, 10, 8, 1.0)
            },
            privacy: placement.map(|placement| crate::privacy::PrivacySpec {
                noise_placement: placement,
                noise_multiplier: Some(1.0),
                ..crate::privacy::PrivacySpec::client_level(8.0, 1e-5, 1.0)
            }),
        }
    }

    /// Without store noise the range is 32 bits and quantisation moves a unit by a negligible
    /// fraction; with it the stores' noise is the calibration's, and a store refuses less.
    #[test]
    fn parameters_follow_the_task_and_stores_refuse_less_noise() {
        assert!(task_noise(&spec(None)).unwrap().is_none());
        let plain = RoundParams::new(&spec(None), None, 10, 7);
        assert_eq!(plain.ddg.bits, PLAIN_BITS);
        assert_eq!(plain.ddg.sigma2.0, 0);
        assert!(rounding_inflation(&plain.ddg, 1000) < 1.0 + 1e-6);
        plain.check(&spec(None), None).unwrap();

        let task = spec(Some(NoisePlacement::Distributed));
        let noise = task_noise(&task).unwrap().unwrap();
        let mut noisy = RoundParams::new(&task, Some(&noise), 10, 7);
        assert_eq!(noisy.ddg.bits, DDG_BITS);
        assert!(noisy.ddg.sigma() > 0.0);
        noisy.check(&task, Some(&noise)).unwrap();
        assert!(plain.check(&task, Some(&noise)).is_err(), "no noise where the task needs it");
        noisy.ddg.sigma2.0 -= 1;
        assert!(noisy.check(&task, Some(&noise)).unwrap_err().contains("calibration"));
        let mut unsafe_graph = RoundParams::new(&task, Some(&noise), 10, 7);
        unsafe_graph.graph.t = unsafe_graph.graph.k / 2;
        assert!(unsafe_graph.check(&task, Some(&noise)).unwrap_err().contains("unsafe"));
    }
}
