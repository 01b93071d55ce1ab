//! The privacy release of one round, as pure functions: admission against the budget, the
//! noise on the round's sum, adaptive clipping's next norm, the divisor, and the ε a task's
//! ledgers add up to.
//!
//! The coordinator's driver keeps only what is not pure: it asks [`Ledgers::admission`] before
//! a round starts, calls [`Release::noise`], writes its charges (`charge`, then `evaluation`) durably, and only then
//! turns the noised sum into a mean with [`Noised::release`]. Nothing derived from the noised
//! sum exists outside this module before the charge is written. Secure aggregation plugs in as
//! one more way to produce the noised sum.

use super::accountant::{Accountant, AccountantError, AccountantKind, Charge, admits};
use super::{AdaptiveClipping, LedgerEntry, NoisePlacement, PrivacySpec, PrivacyUnit, noise};
use rand::{CryptoRng, Rng};

/// Adaptive clipping's part of a release: the sum of the clients' unclipped counts, the noise
/// the coordinator adds to it, and the rule that turns it into the next clipping norm.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapt {
    /// Σ of the uploads' unclipped counts (each already noised by its client where the clients
    /// add the noise).
    pub unclipped_sum: f64,
    /// σ_b the coordinator adds (0 where the clients add it).
    pub count_std: f64,
    /// The rule.
    pub rule: AdaptiveClipping,
}

/// What releasing one round's sum needs: the noise, the divisor and the charges.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// Standard deviation of the Gaussian noise the coordinator adds to each coordinate of the
    /// sum: z·C under central placement, 0 where the clients add it.
    pub std: f64,
    /// The expected number of contributions: q × |connected| (client unit) or q × population
    /// (customer unit). The sum is divided by it, not by the realised count, which would leak.
    pub expected_count: f64,
    /// Adaptive clipping, when the task uses it.
    pub adapt: Option<Adapt>,
    /// The ledger entry to write before anything derived from the noised sum leaves.
    pub charge: LedgerEntry,
    /// The evaluation's charge, when this round evaluates: written with the training charge,
    /// before any store is asked for its noised sums.
    pub evaluation: Option<LedgerEntry>,
    /// Coordinates no contribution may move (μ under customer-level privacy): released without
    /// noise, which would only make them drift at random (L9).
    pub fixed: Vec<usize>,
}

/// A noised sum that must not leave until its charges are durable; [`Noised::release`] turns
/// it into the round's mean and the next clipping norm.
#[derive(Debug)]
#[must_use = "a noised sum is released only after its charge is written"]
pub struct Noised {
    sum: Vec<f64>,
    divisor: f64,
    next_clip: Option<f32>,
}

/// What a round releases: the noised mean and adaptive clipping's next norm.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    /// The noised sum divided by the expected count.
    pub mean: Vec<f32>,
    /// The next round's clipping norm, under adaptive clipping.
    pub next_clip: Option<f32>,
}

impl Release {
    /// Adds the noise to `sum` (each coordinate except the fixed ones) and to adaptive
    /// clipping's count, and computes the next clipping norm. Pure given `rng`.
    pub fn noise<R: Rng + CryptoRng + ?Sized>(&self, sum: &[f64], rng: &mut R) -> Noised {
        let mut noised = sum.to_vec();
        noise::add_gaussian(&mut noised, self.std, rng);
        for &i in &self.fixed {
            noised[i] = sum[i];
        }
        let next_clip = self.adapt.as_ref().map(|a| {
            let mut count = [a.unclipped_sum];
            noise::add_gaussian(&mut count, a.count_std, rng);
            let fraction = count[0] / self.expected_count.max(f64::MIN_POSITIVE);
            a.rule.next_clip_norm(self.charge.clip_norm, fraction)
        });
        Noised { sum: noised, divisor: self.expected_count.max(f64::MIN_POSITIVE), next_clip }
    }

    /// The entries to write durably, in order, before [`Noised::release`] (the driver writes
    /// `charge` and `evaluation` itself, between its store calls).
    #[cfg(test)]
    pub(crate) fn charges(&self) -> impl Iterator<Item = &LedgerEntry> {
        std::iter::once(&self.charge).chain(&self.evaluation)
    }
}

impl Noised {
    /// The round's noised mean (sum ÷ expected count) and the next clipping norm. Call only
    /// once the release's charges are written.
    pub fn release(self) -> Released {
        let divisor = self.divisor;
        Released {
            mean: self.sum.iter().map(|v| (v / divisor) as f32).collect(),
            next_clip: self.next_clip,
        }
    }
}

/// What a task's ledgers add up to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    /// ε of the training charges.
    pub epsilon: f64,
    /// ε of the evaluation charges.
    pub evaluation_epsilon: f64,
    /// ε of both composed.
    pub total_epsilon: f64,
    /// ε against the coordinator operator, who sees what the stores upload.
    pub against_coordinator: f64,
}

/// Whether the next round may start.
#[derive(Debug)]
pub enum Admission {
    /// Within the plan the budget was checked for at once: no composition needed.
    Admitted,
    /// The ledger must be composed (a tenth of a second or more with the PLD accountant: run
    /// [`AdmissionCheck::run`] off the reactor).
    Check(AdmissionCheck),
}

/// A composition that decides admission.
#[derive(Debug, Clone)]
pub struct AdmissionCheck {
    accountant: AccountantKind,
    charges: Vec<Charge>,
    next: Charge,
    target: f64,
    delta: f64,
}

impl AdmissionCheck {
    /// `Ok(None)` when admitted, `Ok(Some(reason))` when the budget refuses the round.
    ///
    /// # Errors
    ///
    /// The accountant's.
    pub fn run(&self) -> Result<Option<String>, AccountantError> {
        if admits(&self.accountant, &self.charges, self.next, self.target, self.delta)? {
            return Ok(None);
        }
        let spent =
            self.accountant.epsilon(&self.charges, self.delta).map_or(f64::NAN, |e| e.epsilon);
        Ok(Some(format!(
            "privacy budget exhausted: {} rounds charged spend epsilon {spent:.4}; one more would exceed {} at delta {}",
            self.charges.len(),
            self.target,
            self.delta
        )))
    }
}

/// A task's training and evaluation ledgers, with what is cached about them: whether the whole
/// plan fits the budget, and the composed ε per ledger length.
#[derive(Debug, Default)]
pub struct Ledgers {
    /// Every training charge, oldest first.
    train: Vec<LedgerEntry>,
    /// Every evaluation charge, oldest first.
    eval: Vec<LedgerEntry>,
    /// Whether the whole plan (`plan.rounds` rounds at the task's q and z) fits the budget,
    /// once checked: then every round of a ledger of such rounds up to `plan.rounds` is
    /// admitted without recomposing it (ε only grows with rounds).
    plan_fits: Option<bool>,
    /// The composed figures for the ledgers' lengths `(training, evaluation)`: the ledgers only
    /// grow, and the PLD accountant takes a tenth of a second for a few hundred rounds.
    spent: std::cell::Cell<Option<((usize, usize), Spent)>>,
    /// Under secure aggregation with distributed noise: one round's charge under the discrete
    /// Gaussian's bound, which is what the training ε is reported by (the entries' z is the
    /// Gaussian z the task was calibrated to, which admits the same planned rounds).
    ddg: Option<super::accountant::ddg::DdgCharge>,
}

impl Ledgers {
    /// The ledgers of a task from its stored entries (both kinds, any order of kinds).
    pub fn new(entries: &[LedgerEntry]) -> Ledgers {
        let (train, eval) = entries.iter().partition(|e| e.kind == super::ChargeKind::Train);
        Ledgers { train, eval, ..Ledgers::default() }
    }

    /// Reports the training ε by the distributed discrete Gaussian's bound, one `charge` per
    /// charged round ([`crate::secagg::round::task_noise`]).
    pub fn set_ddg(&mut self, charge: super::accountant::ddg::DdgCharge) {
        self.ddg = Some(charge);
        self.spent.set(None);
    }

    /// Records a durable charge.
    pub fn push(&mut self, entry: LedgerEntry) {
        match entry.kind {
            super::ChargeKind::Train => self.train.push(entry),
            super::ChargeKind::Evaluate => self.eval.push(entry),
        }
    }

    /// The training charges, oldest first.
    pub fn train(&self) -> &[LedgerEntry] {
        &self.train
    }

    /// How many evaluating rounds were charged.
    pub fn evaluations(&self) -> usize {
        self.eval.len()
    }

    /// The plan's charge: `rounds` rounds at the task's q and calibrated z.
    fn plan(p: &PrivacySpec, rounds: u64) -> Charge {
        Charge {
            sampling_rate: p.sampling_rate,
            noise_multiplier: p.noise_multiplier.expect("tasks with privacy are calibrated"),
            rounds,
        }
    }

    /// Whether `rounds` rounds at the task's parameters fit its budget (checked once).
    pub fn plan_fits(&mut self, p: &PrivacySpec, rounds: u64) -> Option<Charge> {
        let plan = Ledgers::plan(p, rounds);
        let fits = *self.plan_fits.get_or_insert_with(|| {
            admits(&p.accountant, &[], plan, p.target_epsilon, p.delta).unwrap_or(false)
        });
        fits.then_some(plan)
    }

    /// Whether one more training round of a plan of `planned` rounds may start.
    pub fn admission(&mut self, p: &PrivacySpec, planned: u64) -> Admission {
        let next = Ledgers::plan(p, 1);
        let charges: Vec<Charge> = self.train.iter().map(LedgerEntry::charge).collect();
        let within_plan = charges.len() < usize::try_from(planned).unwrap_or(usize::MAX)
            && charges.iter().all(|c| *c == next)
            && self.plan_fits(p, planned).is_some();
        if within_plan {
            Admission::Admitted
        } else {
            Admission::Check(AdmissionCheck {
                accountant: p.accountant,
                charges,
                next,
                target: p.target_epsilon,
                delta: p.delta,
            })
        }
    }

    /// What the ledgers add up to (cached per ledger length). `min_clients` is the quorum that
    /// distributed noise is split over.
    pub fn spent(&self, p: &PrivacySpec, min_clients: u32) -> Spent {
        let key = (self.train.len(), self.eval.len());
        match self.spent.get() {
            Some((k, spent)) if k == key => spent,
            _ => {
                let spent = self.compose(p, min_clients);
                self.spent.set(Some((key, spent)));
                spent
            }
        }
    }

    fn compose(&self, p: &PrivacySpec, min_clients: u32) -> Spent {
        let compose = |charges: &[Charge]| {
            if charges.is_empty() {
                0.0
            } else {
                p.accountant.epsilon(charges, p.delta).map_or(f64::INFINITY, |e| e.epsilon)
            }
        };
        let train: Vec<Charge> = self.train.iter().map(LedgerEntry::charge).collect();
        let eval: Vec<Charge> = self.eval.iter().map(LedgerEntry::charge).collect();
        let epsilon = compose(&train);
        let total_epsilon = if eval.is_empty() {
            epsilon
        } else {
            compose(&train.iter().chain(&eval).copied().collect::<Vec<_>>())
        };
        if let Some(one) = self.ddg {
            // Under secure aggregation the coordinator sees only the sum, with the stores'
            // noise in it: what consumers of the model see, no more.
            let charge =
                super::accountant::ddg::DdgCharge { rounds: self.train.len() as u64, ..one };
            let ddg = |gaussian: &[Charge]| {
                if self.train.is_empty() && gaussian.is_empty() {
                    return 0.0;
                }
                super::accountant::ddg::epsilon_with(&[charge], gaussian, p.delta)
                    .map_or(f64::INFINITY, |e| e.epsilon)
            };
            let epsilon = ddg(&[]);
            return Spent {
                epsilon,
                evaluation_epsilon: compose(&eval),
                total_epsilon: ddg(&eval),
                against_coordinator: epsilon,
            };
        }
        let against_coordinator = match p.noise_placement {
            // The coordinator adds the noise: it sees every clipped update without it.
            NoisePlacement::Central => f64::INFINITY,
            // It sees each store's noised share, and knows which stores took part (a store's
            // worst case is every round, unamplified); customers are sampled inside the stores.
            placement => {
                let z = p.noise_multiplier.unwrap_or(f64::NAN);
                let q = match p.unit {
                    PrivacyUnit::Client => 1.0,
                    PrivacyUnit::Customer => p.sampling_rate,
                };
                let shares = Charge {
                    sampling_rate: q,
                    noise_multiplier: placement.client_share(z, min_clients),
                    rounds: train.len() as u64,
                };
                if train.is_empty() { 0.0 } else { compose(&[shares]) }
            }
        };
        Spent { epsilon, evaluation_epsilon: compose(&eval), total_epsilon, against_coordinator }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RoundId;
    use crate::privacy::ChargeKind;
    use rand::SeedableRng;

    fn entry(kind: ChargeKind) -> LedgerEntry {
        LedgerEntry {
            round: RoundId(1),
            sampling_rate: 0.5,
            noise_multiplier: 1.0,
            clip_norm: 2.0,
            unit: PrivacyUnit::Client,
            kind,
        }
    }

    fn spec() -> PrivacySpec {
        PrivacySpec {
            noise_multiplier: Some(1.0),
            domain: "d".into(),
            evaluation_noise_multiplier: Some(5.0),
            ..PrivacySpec::client_level(10.0, 1e-5, 0.5)
        }
    }

    /// Fixed coordinates keep their un-noised value, the others move, and the mean divides by
    /// the expected count, not by anything the data decides.
    #[test]
    fn release_noises_all_but_fixed_coordinates_and_divides_by_the_expected_count() {
        let release = Release {
            std: 1.0,
            expected_count: 4.0,
            adapt: None,
            charge: entry(ChargeKind::Train),
            evaluation: None,
            fixed: vec![0],
        };
        let sum = vec![8.0; 100];
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
        let out = release.noise(&sum, &mut rng).release();
        assert_eq!(out.mean[0], 2.0);
        assert!(out.mean[1..].iter().all(|&v| v != 2.0));
        let mean = out.mean[1..].iter().map(|&v| f64::from(v)).sum::<f64>() / 99.0;
        assert!((mean - 2.0).abs() < 0.1, "{mean}");
        assert_eq!(release.charges().count(), 1);
    }

    /// Adaptive clipping moves the norm down when every contribution was unclipped beyond the
    /// target quantile, and the evaluation is charged after the training.
    #[test]
    fn release_moves_the_clipping_norm_and_lists_both_charges() {
        let rule =
            AdaptiveClipping { target_quantile: 0.5, learning_rate: 0.2, count_noise_std: 0.0 };
        let release = Release {
            std: 0.0,
            expected_count: 10.0,
            adapt: Some(Adapt { unclipped_sum: 10.0, count_std: 0.0, rule }),
            charge: entry(ChargeKind::Train),
            evaluation: Some(entry(ChargeKind::Evaluate)),
            fixed: vec![],
        };
        let out = release.noise(&[1.0], &mut rand::rngs::ChaCha20Rng::seed_from_u64(1)).release();
        assert!(out.next_clip.expect("adaptive") < 2.0);
        let kinds: Vec<ChargeKind> = release.charges().map(|e| e.kind).collect();
        assert_eq!(kinds, [ChargeKind::Train, ChargeKind::Evaluate]);
    }

    /// Within a plan that fits, rounds are admitted without composing; beyond it the ledger
    /// is composed and the budget refuses.
    #[test]
    fn admission_skips_composition_within_a_plan_that_fits_and_refuses_beyond_the_budget() {
        let p = spec();
        let mut ledgers = Ledgers::default();
        assert!(matches!(ledgers.admission(&p, 5), Admission::Admitted));
        for _ in 0..400 {
            ledgers.push(entry(ChargeKind::Train));
        }
        match ledgers.admission(&p, 5) {
            Admission::Check(check) => {
                let reason = check.run().expect("valid").expect("refused");
                assert!(reason.contains("privacy budget exhausted"), "{reason}");
            }
            Admission::Admitted => panic!("400 rounds beyond a plan of 5 were admitted"),
        }
    }

    /// The figures compose each ledger, and are recomputed when a ledger grows.
    /// Issue 12 (H2, H3): under secure aggregation with distributed noise the report states the
    /// discrete Gaussian's ε, and the coordinator faces the same ε as the model's consumers (it
    /// sees only the noised sum); the evaluation composes with it.
    #[test]
    fn under_secure_aggregation_the_coordinator_faces_the_consumers_epsilon() {
        use crate::privacy::accountant::ddg::{self, DdgCharge};
        let p = PrivacySpec { noise_placement: NoisePlacement::Distributed, ..spec() };
        let one = DdgCharge {
            sampling_rate: 0.5,
            clients: 10,
            sigma: 300.0,
            l2: 1000.0,
            l1: 31_623.0,
            dim: 1024,
            rounds: 1,
        };
        let mut ledgers = Ledgers::new(&[entry(ChargeKind::Train), entry(ChargeKind::Train)]);
        let gaussian = ledgers.spent(&p, 10);
        ledgers.set_ddg(one);
        let spent = ledgers.spent(&p, 10);
        let want = ddg::epsilon(&[DdgCharge { rounds: 2, ..one }], p.delta).unwrap().epsilon;
        assert!((spent.epsilon - want).abs() < 1e-12, "{spent:?} vs {want}");
        assert_ne!(spent.epsilon, gaussian.epsilon);
        assert_eq!(spent.against_coordinator, spent.epsilon);
        ledgers.push(entry(ChargeKind::Evaluate));
        let with_eval = ledgers.spent(&p, 10);
        assert!(with_eval.total_epsilon > with_eval.epsilon);
        assert_eq!(with_eval.epsilon, spent.epsilon);
    }

    #[test]
    fn spent_composes_the_ledgers_and_follows_their_growth() {
        let p = spec();
        let mut ledgers = Ledgers::new(&[entry(ChargeKind::Train), entry(ChargeKind::Evaluate)]);
        let one = ledgers.spent(&p, 2);
        assert!(one.epsilon > 0.0 && one.total_epsilon > one.epsilon);
        assert!(one.against_coordinator.is_infinite());
        ledgers.push(entry(ChargeKind::Train));
        let two = ledgers.spent(&p, 2);
        assert!(two.epsilon > one.epsilon);
        assert_eq!(two.evaluation_epsilon, one.evaluation_epsilon);
    }
}
