//! Conversions between wire messages and `fedretail-core` types that both sides share.
//!
//! `TryFrom<pb::X>` validates what the wire cannot express (missing `oneof`s, out-of-range
//! numbers); the domain's own `validate` then checks the meaning.

use crate::pb;
use fedretail_core::model::demand::{DemandLoss, DemandSpec, LadSpec, TreeSpec};
use fedretail_core::model::metrics::EvalSums;
use fedretail_core::model::mf::{CategoryAffinity, MfSpec, Objective};
use fedretail_core::optim::ServerOptimizer;
use fedretail_core::plan::{ModelSpec, SecureAggregation, TaskSpec, TrainingPlan};
use fedretail_core::privacy::accountant::AccountantKind;
use fedretail_core::privacy::{
    AdaptiveClipping, NoisePlacement, PrivacySpec, PrivacyUnit, TrainPrivacy,
};

impl From<PrivacyUnit> for pb::PrivacyUnit {
    fn from(u: PrivacyUnit) -> pb::PrivacyUnit {
        match u {
            PrivacyUnit::Client => pb::PrivacyUnit::Client,
            PrivacyUnit::Customer => pb::PrivacyUnit::Customer,
        }
    }
}

impl From<NoisePlacement> for pb::NoisePlacement {
    fn from(p: NoisePlacement) -> pb::NoisePlacement {
        match p {
            NoisePlacement::Central => pb::NoisePlacement::Central,
            NoisePlacement::Distributed => pb::NoisePlacement::Distributed,
            NoisePlacement::Local => pb::NoisePlacement::Local,
        }
    }
}

impl From<TrainPrivacy> for pb::TrainPrivacy {
    fn from(p: TrainPrivacy) -> pb::TrainPrivacy {
        pb::TrainPrivacy {
            per_customer: p.per_customer,
            sampling_rate: p.sampling_rate,
            noise_std: p.noise_std,
            report_unclipped: p.report_unclipped,
            count_noise_std: p.count_noise_std,
        }
    }
}

impl From<pb::TrainPrivacy> for TrainPrivacy {
    fn from(p: pb::TrainPrivacy) -> TrainPrivacy {
        TrainPrivacy {
            per_customer: p.per_customer,
            sampling_rate: p.sampling_rate,
            noise_std: p.noise_std,
            report_unclipped: p.report_unclipped,
            count_noise_std: p.count_noise_std,
        }
    }
}

impl From<&PrivacySpec> for pb::PrivacySpec {
    fn from(p: &PrivacySpec) -> pb::PrivacySpec {
        pb::PrivacySpec {
            unit: pb::PrivacyUnit::from(p.unit).into(),
            noise_placement: pb::NoisePlacement::from(p.noise_placement).into(),
            target_epsilon: p.target_epsilon,
            delta: p.delta,
            sampling_rate: p.sampling_rate,
            noise_multiplier: p.noise_multiplier.unwrap_or(0.0),
            population: p.population.unwrap_or(0),
            adaptive_clipping: p.adaptive_clipping.as_ref().map(|a| pb::AdaptiveClipping {
                target_quantile: a.target_quantile,
                learning_rate: a.learning_rate,
                count_noise_std: a.count_noise_std,
            }),
            accountant: pb::Accountant::from(p.accountant).into(),
            domain: p.domain.clone(),
            evaluation_epsilon: p.evaluation_epsilon,
            evaluation_noise_multiplier: p.evaluation_noise_multiplier.unwrap_or(0.0),
            max_stores_per_customer: p.max_stores_per_customer,
        }
    }
}

/// Private evaluation with its unit: whether customers are the units.
impl From<(fedretail_core::privacy::evaluation::EvalPrivacy, bool)> for pb::EvalPrivacy {
    fn from(
        (p, per_customer): (fedretail_core::privacy::evaluation::EvalPrivacy, bool),
    ) -> pb::EvalPrivacy {
        pb::EvalPrivacy {
            noise_multiplier: p.noise_multiplier,
            count_bound: p.count_bound,
            error_bound: p.error_bound,
            actual_bound: p.actual_bound,
            per_customer,
        }
    }
}

impl TryFrom<pb::EvalPrivacy> for (fedretail_core::privacy::evaluation::EvalPrivacy, bool) {
    type Error = ConvertError;
    fn try_from(p: pb::EvalPrivacy) -> Result<Self, ConvertError> {
        let finite = |v: f64| v.is_finite() && v >= 0.0;
        let usable = p.noise_multiplier.is_finite()
            && p.noise_multiplier > 0.0
            && finite(p.error_bound)
            && finite(p.actual_bound)
            && p.count_bound > 0;
        if !usable {
            return Err(ConvertError {
                field: "evaluate.privacy",
                message: "noise multiplier, count and bounds must be positive and finite".into(),
            });
        }
        Ok((
            fedretail_core::privacy::evaluation::EvalPrivacy {
                noise_multiplier: p.noise_multiplier,
                count_bound: p.count_bound,
                error_bound: p.error_bound,
                actual_bound: p.actual_bound,
            },
            p.per_customer,
        ))
    }
}

impl From<AccountantKind> for pb::Accountant {
    fn from(a: AccountantKind) -> pb::Accountant {
        match a {
            AccountantKind::Rdp => pb::Accountant::Rdp,
            AccountantKind::Pld => pb::Accountant::Pld,
        }
    }
}

/// The accountant a message names; unspecified is RDP (messages from before the field).
///
/// # Errors
///
/// An unknown value.
pub fn accountant_kind(value: i32) -> Result<AccountantKind, ConvertError> {
    match pb::Accountant::try_from(value) {
        Ok(pb::Accountant::Unspecified | pb::Accountant::Rdp) => Ok(AccountantKind::Rdp),
        Ok(pb::Accountant::Pld) => Ok(AccountantKind::Pld),
        Err(_) => Err(ConvertError {
            field: "privacy.accountant",
            message: format!("accountant {value} is not one of rdp, pld"),
        }),
    }
}

impl TryFrom<pb::PrivacySpec> for PrivacySpec {
    type Error = ConvertError;
    fn try_from(p: pb::PrivacySpec) -> Result<PrivacySpec, ConvertError> {
        let unit = match pb::PrivacyUnit::try_from(p.unit) {
            Ok(pb::PrivacyUnit::Client) => PrivacyUnit::Client,
            Ok(pb::PrivacyUnit::Customer) => PrivacyUnit::Customer,
            _ => {
                return Err(ConvertError {
                    field: "privacy.unit",
                    message: format!("unit {} is not one of client, customer", p.unit),
                });
            }
        };
        let noise_placement = match pb::NoisePlacement::try_from(p.noise_placement) {
            Ok(pb::NoisePlacement::Central) => NoisePlacement::Central,
            Ok(pb::NoisePlacement::Distributed) => NoisePlacement::Distributed,
            Ok(pb::NoisePlacement::Local) => NoisePlacement::Local,
            _ => {
                return Err(ConvertError {
                    field: "privacy.noise_placement",
                    message: format!(
                        "placement {} is not one of central, distributed, local",
                        p.noise_placement
                    ),
                });
            }
        };
        Ok(PrivacySpec {
            unit,
            noise_placement,
            target_epsilon: p.target_epsilon,
            delta: p.delta,
            sampling_rate: p.sampling_rate,
            noise_multiplier: (p.noise_multiplier != 0.0).then_some(p.noise_multiplier),
            population: (p.population != 0).then_some(p.population),
            adaptive_clipping: p.adaptive_clipping.map(|a| AdaptiveClipping {
                target_quantile: a.target_quantile,
                learning_rate: a.learning_rate,
                count_noise_std: a.count_noise_std,
            }),
            accountant: accountant_kind(p.accountant)?,
            domain: if p.domain.is_empty() {
                fedretail_core::privacy::default_domain()
            } else {
                p.domain
            },
            evaluation_epsilon: if p.evaluation_epsilon == 0.0 {
                fedretail_core::privacy::default_evaluation_epsilon()
            } else {
                p.evaluation_epsilon
            },
            evaluation_noise_multiplier: (p.evaluation_noise_multiplier != 0.0)
                .then_some(p.evaluation_noise_multiplier),
            max_stores_per_customer: p.max_stores_per_customer.max(1),
        })
    }
}

/// A message lacks a required field or holds an unusable value.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct ConvertError {
    /// The field, dotted.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn missing(field: &'static str) -> ConvertError {
    ConvertError { field, message: "is required".into() }
}

fn to_usize(field: &'static str, v: u64) -> Result<usize, ConvertError> {
    usize::try_from(v).map_err(|_| ConvertError { field, message: format!("{v} is too large") })
}

impl From<&ModelSpec> for pb::ModelSpec {
    fn from(spec: &ModelSpec) -> pb::ModelSpec {
        let kind = match spec {
            ModelSpec::MatrixFactorization(mf) => {
                pb::model_spec::Kind::MatrixFactorization(pb::MatrixFactorization {
                    n_items: mf.n_items as u64,
                    dim: mf.dim as u32,
                    learning_rate: mf.learning_rate,
                    regularization: mf.regularization,
                    init_std: mf.init_std,
                    rating_min: mf.rating_min,
                    rating_max: mf.rating_max,
                    init_mean: mf.init_mean,
                    local_item_offsets: mf.local_item_offsets.unwrap_or(0.0),
                    ranking: match mf.objective {
                        Objective::Rating => None,
                        Objective::Ranking { alpha, item_regularization } => {
                            Some(pb::RankingObjective { alpha, item_regularization })
                        }
                    },
                    category_affinity: mf.category_affinity.as_ref().map(|a| {
                        pb::CategoryAffinity {
                            categories: a.categories.clone(),
                            bias_scale: a.bias_scale,
                            levels: a.levels,
                        }
                    }),
                })
            }
            ModelSpec::Bench { n_params } => {
                pb::model_spec::Kind::Bench(pb::BenchModel { n_params: *n_params as u64 })
            }
            ModelSpec::Demand(d) => pb::model_spec::Kind::Demand(pb::DemandModel {
                groups: d.groups.clone(),
                planned_discounts: d.planned_discounts,
                personal_regularization: d.personal_regularization,
                whole_units: d.whole_units,
                relative_to_recent: d.relative_to_recent,
                hidden_units: d.hidden_units,
                trees: d.trees.as_ref().map(|t| pb::DemandTrees {
                    trees: t.trees,
                    depth: t.depth,
                    bins: t.bins,
                    shrinkage: t.shrinkage,
                    min_child_share: t.min_child_share,
                }),
                lad: d
                    .lad
                    .as_ref()
                    .map(|l| pb::DemandLad { ridge: l.ridge, weight_floor: l.weight_floor }),
                first_test_week: d.first_test_week,
                horizon: d.horizon,
                harmonics: d.harmonics,
                learning_rate: d.learning_rate,
                regularization: d.regularization,
                loss: match d.loss {
                    DemandLoss::Poisson => pb::DemandLoss::Poisson,
                    DemandLoss::Log1pSquared => pb::DemandLoss::Log1pSquared,
                    DemandLoss::Log1pAbsolute => pb::DemandLoss::Log1pAbsolute,
                } as i32,
            }),
        };
        pb::ModelSpec { kind: Some(kind) }
    }
}

impl TryFrom<pb::ModelSpec> for ModelSpec {
    type Error = ConvertError;
    fn try_from(m: pb::ModelSpec) -> Result<ModelSpec, ConvertError> {
        Ok(match m.kind.ok_or_else(|| missing("model.kind"))? {
            pb::model_spec::Kind::MatrixFactorization(mf) => {
                ModelSpec::MatrixFactorization(MfSpec {
                    n_items: to_usize("model.n_items", mf.n_items)?,
                    dim: mf.dim as usize,
                    learning_rate: mf.learning_rate,
                    regularization: mf.regularization,
                    init_std: mf.init_std,
                    rating_min: mf.rating_min,
                    rating_max: mf.rating_max,
                    init_mean: mf.init_mean,
                    local_item_offsets: (mf.local_item_offsets != 0.0)
                        .then_some(mf.local_item_offsets),
                    objective: match mf.ranking {
                        None => Objective::Rating,
                        Some(r) => Objective::Ranking {
                            alpha: r.alpha,
                            item_regularization: r.item_regularization,
                        },
                    },
                    category_affinity: mf.category_affinity.map(|a| CategoryAffinity {
                        categories: a.categories,
                        levels: a.levels.max(1),
                        bias_scale: a.bias_scale,
                    }),
                })
            }
            pb::model_spec::Kind::Bench(b) => {
                ModelSpec::Bench { n_params: to_usize("model.n_params", b.n_params)? }
            }
            pb::model_spec::Kind::Demand(d) => ModelSpec::Demand(DemandSpec {
                loss: match pb::DemandLoss::try_from(d.loss) {
                    Ok(pb::DemandLoss::Poisson) => DemandLoss::Poisson,
                    Ok(pb::DemandLoss::Log1pSquared) => DemandLoss::Log1pSquared,
                    Ok(pb::DemandLoss::Log1pAbsolute) => DemandLoss::Log1pAbsolute,
                    _ => {
                        return Err(ConvertError {
                            field: "model.loss",
                            message: format!("unknown demand loss {}", d.loss),
                        });
                    }
                },
                groups: d.groups,
                planned_discounts: d.planned_discounts,
                personal_regularization: d.personal_regularization,
                whole_units: d.whole_units,
                relative_to_recent: d.relative_to_recent,
                hidden_units: d.hidden_units,
                trees: d.trees.map(|t| TreeSpec {
                    trees: t.trees,
                    depth: t.depth,
                    bins: t.bins,
                    shrinkage: t.shrinkage,
                    min_child_share: t.min_child_share,
                }),
                lad: d.lad.map(|l| LadSpec { ridge: l.ridge, weight_floor: l.weight_floor }),
                first_test_week: d.first_test_week,
                horizon: d.horizon,
                harmonics: d.harmonics,
                learning_rate: d.learning_rate,
                regularization: d.regularization,
            }),
        })
    }
}

impl From<&ServerOptimizer> for pb::ServerOptimizer {
    fn from(o: &ServerOptimizer) -> pb::ServerOptimizer {
        use pb::server_optimizer::Kind;
        let kind = match *o {
            ServerOptimizer::FedAvg { learning_rate } => Kind::FedAvg(pb::FedAvg { learning_rate }),
            ServerOptimizer::FedAvgM { learning_rate, momentum } => {
                Kind::FedAvgM(pb::FedAvgM { learning_rate, momentum })
            }
            ServerOptimizer::FedAdam { learning_rate, beta1, beta2, tau } => {
                Kind::FedAdam(pb::FedAdam { learning_rate, beta1, beta2, tau })
            }
        };
        pb::ServerOptimizer { kind: Some(kind) }
    }
}

impl TryFrom<pb::ServerOptimizer> for ServerOptimizer {
    type Error = ConvertError;
    fn try_from(o: pb::ServerOptimizer) -> Result<ServerOptimizer, ConvertError> {
        use pb::server_optimizer::Kind;
        Ok(match o.kind.ok_or_else(|| missing("plan.server_optimizer.kind"))? {
            Kind::FedAvg(a) => ServerOptimizer::FedAvg { learning_rate: a.learning_rate },
            Kind::FedAvgM(a) => {
                ServerOptimizer::FedAvgM { learning_rate: a.learning_rate, momentum: a.momentum }
            }
            Kind::FedAdam(a) => ServerOptimizer::FedAdam {
                learning_rate: a.learning_rate,
                beta1: a.beta1,
                beta2: a.beta2,
                tau: a.tau,
            },
        })
    }
}

fn ms(secs: f64) -> u64 {
    (secs * 1000.0).round() as u64
}

impl From<&TaskSpec> for pb::TaskSpec {
    fn from(spec: &TaskSpec) -> pb::TaskSpec {
        let p = &spec.plan;
        pb::TaskSpec {
            name: spec.name.clone(),
            model: Some((&spec.model).into()),
            plan: Some(pb::TrainingPlan {
                rounds: p.rounds,
                cohort_size: p.cohort_size,
                min_clients: p.min_clients,
                local_epochs: p.local_epochs,
                clip_norm: p.clip_norm,
                server_optimizer: Some((&p.server_optimizer).into()),
                eval_every: p.eval_every,
                eval_fraction: p.eval_fraction,
                select_timeout_ms: ms(p.select_timeout_secs),
                configure_timeout_ms: ms(p.configure_timeout_secs),
                collect_timeout_ms: ms(p.collect_timeout_secs),
                evaluate_timeout_ms: ms(p.evaluate_timeout_secs),
                seed: p.seed,
                weight_by_examples: p.weight_by_examples,
                secure_aggregation: match p.secure_aggregation {
                    SecureAggregation::Off => pb::SecureAggregation::Off.into(),
                    SecureAggregation::SecAggPlus => pb::SecureAggregation::SecaggPlus.into(),
                },
            }),
            privacy: spec.privacy.as_ref().map(Into::into),
        }
    }
}

impl TryFrom<pb::TaskSpec> for TaskSpec {
    type Error = ConvertError;
    fn try_from(t: pb::TaskSpec) -> Result<TaskSpec, ConvertError> {
        let p = t.plan.ok_or_else(|| missing("plan"))?;
        let secs = |v: u64| v as f64 / 1000.0;
        Ok(TaskSpec {
            name: t.name,
            model: t.model.ok_or_else(|| missing("model"))?.try_into()?,
            plan: TrainingPlan {
                rounds: p.rounds,
                cohort_size: p.cohort_size,
                min_clients: p.min_clients,
                local_epochs: p.local_epochs,
                clip_norm: p.clip_norm,
                server_optimizer: p
                    .server_optimizer
                    .ok_or_else(|| missing("plan.server_optimizer"))?
                    .try_into()?,
                eval_every: p.eval_every,
                eval_fraction: p.eval_fraction,
                select_timeout_secs: secs(p.select_timeout_ms),
                configure_timeout_secs: secs(p.configure_timeout_ms),
                collect_timeout_secs: secs(p.collect_timeout_ms),
                evaluate_timeout_secs: secs(p.evaluate_timeout_ms),
                seed: p.seed,
                weight_by_examples: p.weight_by_examples,
                secure_aggregation: match pb::SecureAggregation::try_from(p.secure_aggregation) {
                    Ok(pb::SecureAggregation::SecaggPlus) => SecureAggregation::SecAggPlus,
                    Ok(_) => SecureAggregation::Off,
                    Err(_) => {
                        return Err(ConvertError {
                            field: "plan.secure_aggregation",
                            message: format!("{} is not one of off, secagg+", p.secure_aggregation),
                        });
                    }
                },
            },
            privacy: t.privacy.map(TryInto::try_into).transpose()?,
        })
    }
}

impl From<&EvalSums> for pb::EvalSums {
    fn from(e: &EvalSums) -> pb::EvalSums {
        pb::EvalSums {
            n_ratings: e.n_ratings,
            squared_error: e.squared_error,
            absolute_error: e.absolute_error,
            n_ranked: e.n_ranked,
            hits_at_10: e.hits_at_10,
            ndcg_at_10: e.ndcg_at_10,
            actual_sum: e.actual_sum,
        }
    }
}

impl TryFrom<pb::EvalSums> for EvalSums {
    type Error = ConvertError;
    fn try_from(e: pb::EvalSums) -> Result<EvalSums, ConvertError> {
        for (field, v) in [
            ("sums.squared_error", e.squared_error),
            ("sums.absolute_error", e.absolute_error),
            ("sums.hits_at_10", e.hits_at_10),
            ("sums.ndcg_at_10", e.ndcg_at_10),
            ("sums.actual_sum", e.actual_sum),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConvertError {
                    field,
                    message: format!("must be finite and non-negative, got {v}"),
                });
            }
        }
        if e.hits_at_10 > e.n_ranked as f64 || e.ndcg_at_10 > e.n_ranked as f64 {
            return Err(ConvertError {
                field: "sums.hits_at_10",
                message: "exceeds the number of ranked users".into(),
            });
        }
        Ok(EvalSums {
            n_ratings: e.n_ratings,
            squared_error: e.squared_error,
            absolute_error: e.absolute_error,
            n_ranked: e.n_ranked,
            hits_at_10: e.hits_at_10,
            ndcg_at_10: e.ndcg_at_10,
            actual_sum: e.actual_sum,
        })
    }
}

/// Secure aggregation's wire forms (`fedretail_core::secagg`).
pub mod secagg {
    use super::{ConvertError, pb};
    use fedretail_core::secagg::ddg::DdgParams;
    use fedretail_core::secagg::graph::GraphParams;
    use fedretail_core::secagg::protocol::{Advertised, Identity, Revealed, Sealed, SeedKind};
    use fedretail_core::secagg::round::RoundParams;
    use fedretail_core::secagg::shamir::Share;

    fn bad(field: &'static str, message: &str) -> ConvertError {
        ConvertError { field, message: message.into() }
    }

    fn key(field: &'static str, bytes: &[u8]) -> Result<[u8; 32], ConvertError> {
        bytes.try_into().map_err(|_| bad(field, "must be 32 bytes"))
    }

    impl From<&RoundParams> for pb::SecAggParams {
        fn from(p: &RoundParams) -> pb::SecAggParams {
            pb::SecAggParams {
                n: p.graph.n as u32,
                degree: p.graph.k as u32,
                threshold: p.graph.t as u32,
                graph_seed: p.graph_seed,
                rotation_seed: p.rotation_seed,
                bits: p.ddg.bits,
                gamma: p.ddg.gamma,
                clip: p.ddg.clip,
                beta: p.ddg.beta,
                sigma2_num: p.ddg.sigma2.0,
                sigma2_den: p.ddg.sigma2.1,
                input_len: p.input_len as u64,
            }
        }
    }

    impl TryFrom<pb::SecAggParams> for RoundParams {
        type Error = ConvertError;
        /// Shapes only; whether the values are safe for a task is
        /// [`RoundParams::check`]'s question. `meets` is not carried (set false).
        fn try_from(p: pb::SecAggParams) -> Result<RoundParams, ConvertError> {
            let usable = (1..=32).contains(&p.bits)
                && p.gamma.is_finite()
                && p.gamma > 0.0
                && p.clip.is_finite()
                && p.clip > 0.0
                && (0.0..1.0).contains(&p.beta)
                && p.sigma2_den > 0
                && p.degree < p.n.max(1)
                && p.threshold >= 1
                && p.threshold <= p.degree
                && p.input_len > 0
                && p.input_len <= 1 << 26;
            if !usable {
                return Err(bad("secagg.params", "out of range"));
            }
            Ok(RoundParams {
                graph: GraphParams {
                    n: p.n as usize,
                    k: p.degree as usize,
                    t: p.threshold as usize,
                    meets: false,
                },
                graph_seed: p.graph_seed,
                rotation_seed: p.rotation_seed,
                ddg: DdgParams {
                    bits: p.bits,
                    gamma: p.gamma,
                    clip: p.clip,
                    beta: p.beta,
                    sigma2: (p.sigma2_num, p.sigma2_den),
                },
                input_len: p.input_len as usize,
            })
        }
    }

    /// An advert and the identity it is signed by.
    pub fn advertised_to_pb(a: &Advertised, identity: &Identity) -> pb::AdvertisedKeys {
        let (certificate, key) = match identity {
            Identity::Certificate(der) => (der.clone(), Vec::new()),
            Identity::Key(key) => (Vec::new(), key.to_vec()),
        };
        pb::AdvertisedKeys {
            index: a.index,
            certificate,
            signing_public_key: key,
            signature: a.signature.clone(),
            cipher_public_key: a.cipher_key.to_vec(),
            mask_public_key: a.mask_key.to_vec(),
        }
    }

    /// The inverse of [`advertised_to_pb`].
    ///
    /// # Errors
    ///
    /// Keys or signature of the wrong length.
    pub fn advertised_from_pb(
        a: &pb::AdvertisedKeys,
    ) -> Result<(Advertised, Identity), ConvertError> {
        if a.signature.len() > 256 || a.certificate.len() > 16_384 {
            return Err(bad("advert", "signature or certificate too long"));
        }
        let identity = if a.certificate.is_empty() {
            Identity::Key(key("signing_public_key", &a.signing_public_key)?)
        } else {
            Identity::Certificate(a.certificate.clone())
        };
        Ok((
            Advertised {
                index: a.index,
                cipher_key: key("cipher_public_key", &a.cipher_public_key)?,
                mask_key: key("mask_public_key", &a.mask_public_key)?,
                signature: a.signature.clone(),
            },
            identity,
        ))
    }

    impl From<&Sealed> for pb::EncryptedShare {
        fn from(s: &Sealed) -> pb::EncryptedShare {
            pb::EncryptedShare {
                sender_id: u64::from(s.from),
                recipient_id: u64::from(s.to),
                ciphertext: s.ciphertext.clone(),
            }
        }
    }

    impl TryFrom<&pb::EncryptedShare> for Sealed {
        type Error = ConvertError;
        fn try_from(s: &pb::EncryptedShare) -> Result<Sealed, ConvertError> {
            let index = |v: u64| u32::try_from(v).map_err(|_| bad("share", "index out of range"));
            if s.ciphertext.len() > 1024 {
                return Err(bad("share.ciphertext", "longer than 1024 bytes"));
            }
            Ok(Sealed {
                from: index(s.sender_id)?,
                to: index(s.recipient_id)?,
                ciphertext: s.ciphertext.clone(),
            })
        }
    }

    impl From<&Revealed> for pb::SeedShare {
        fn from(r: &Revealed) -> pb::SeedShare {
            pb::SeedShare { owner_id: u64::from(r.owner), x: r.share.x, y: r.share.to_bytes() }
        }
    }

    /// A revealed share of `kind`.
    ///
    /// # Errors
    ///
    /// A malformed share, or one whose point disagrees with its encoding.
    pub fn revealed_from_pb(s: &pb::SeedShare, kind: SeedKind) -> Result<Revealed, ConvertError> {
        let share = Share::from_bytes(&s.y).map_err(|e| bad("seed_share", &e.to_string()))?;
        if share.x != s.x {
            return Err(bad("seed_share.x", "disagrees with the share"));
        }
        Ok(Revealed {
            owner: u32::try_from(s.owner_id)
                .map_err(|_| bad("seed_share", "index out of range"))?,
            kind,
            share,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_spec_round_trips_through_the_wire() {
        let spec = TaskSpec {
            name: "ml".into(),
            model: ModelSpec::MatrixFactorization(MfSpec {
                n_items: 1682,
                dim: 50,
                learning_rate: 0.01,
                regularization: 0.1,
                init_std: 0.1,
                rating_min: 1.0,
                rating_max: 5.0,
                init_mean: 0.0,
                local_item_offsets: Some(5.0),
                objective: Objective::Ranking { alpha: 3.0, item_regularization: 0.01 },
                // Two catalogue levels per item, groups of two and four items: they cross
                // the wire.
                category_affinity: Some(CategoryAffinity {
                    categories: (0..1682).flat_map(|i| [i / 2, 841 + i / 4]).collect(),
                    levels: 2,
                    bias_scale: 3.0,
                }),
            }),
            plan: TrainingPlan {
                rounds: 100,
                cohort_size: 11,
                min_clients: 8,
                local_epochs: 2,
                clip_norm: 5.0,
                server_optimizer: ServerOptimizer::FedAdam {
                    learning_rate: 0.1,
                    beta1: 0.9,
                    beta2: 0.99,
                    tau: 1e-3,
                },
                eval_every: 10,
                eval_fraction: 0.5,
                select_timeout_secs: 1.5,
                configure_timeout_secs: 30.0,
                collect_timeout_secs: 60.0,
                evaluate_timeout_secs: 20.0,
                seed: 42,
                weight_by_examples: false,
                secure_aggregation: SecureAggregation::SecAggPlus,
            },
            privacy: Some(PrivacySpec {
                unit: PrivacyUnit::Client,
                noise_placement: NoisePlacement::Central,
                target_epsilon: 2.0,
                delta: 1e-5,
                sampling_rate: 0.25,
                noise_multiplier: Some(1.3),
                population: Some(943),
                adaptive_clipping: Some(AdaptiveClipping {
                    target_quantile: 0.5,
                    learning_rate: 0.2,
                    count_noise_std: 5.0,
                }),
                accountant: AccountantKind::Pld,
                domain: "stores-2026".into(),
                evaluation_epsilon: fedretail_core::privacy::default_evaluation_epsilon(),
                evaluation_noise_multiplier: None,
                max_stores_per_customer: 3,
            }),
        };
        let wire: pb::TaskSpec = (&spec).into();
        assert_eq!(TaskSpec::try_from(wire).unwrap(), spec);
        // A spec written before catalogue levels existed (levels unset) has one.
        let mut one_level: pb::ModelSpec = (&spec.model).into();
        if let Some(pb::model_spec::Kind::MatrixFactorization(mf)) = &mut one_level.kind {
            let affinity = mf.category_affinity.as_mut().unwrap();
            affinity.levels = 0;
            affinity.categories.truncate(1682);
        }
        let ModelSpec::MatrixFactorization(mf) = ModelSpec::try_from(one_level).unwrap() else {
            panic!("a matrix factorisation spec")
        };
        assert_eq!(mf.category_affinity.unwrap().levels, 1);

        for loss in [DemandLoss::Poisson, DemandLoss::Log1pSquared, DemandLoss::Log1pAbsolute] {
            let demand = ModelSpec::Demand(DemandSpec {
                groups: vec!["Binders".into(), "Paper".into()],
                first_test_week: 2480,
                horizon: 4,
                harmonics: 2,
                learning_rate: 0.003,
                regularization: 0.001,
                loss,
                planned_discounts: true,
                personal_regularization: 30.0,
                whole_units: true,
                relative_to_recent: loss == DemandLoss::Log1pAbsolute,
                hidden_units: 0,
                trees: (loss == DemandLoss::Log1pAbsolute).then(TreeSpec::default),
                // Not a valid spec (LAD needs the absolute loss): the conversion carries it as is.
                lad: (loss == DemandLoss::Log1pSquared).then(LadSpec::default),
            });
            let wire: pb::ModelSpec = (&demand).into();
            assert_eq!(ModelSpec::try_from(wire).unwrap(), demand);
        }
        let sums =
            EvalSums { n_ratings: 3, absolute_error: 2.0, actual_sum: 7.5, ..Default::default() };
        assert_eq!(EvalSums::try_from(pb::EvalSums::from(&sums)).unwrap(), sums);
    }

    #[test]
    fn missing_and_hostile_fields_are_named() {
        let err = TaskSpec::try_from(pb::TaskSpec {
            name: "x".into(),
            model: None,
            plan: None,
            privacy: None,
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "plan: is required");
        let err =
            EvalSums::try_from(pb::EvalSums { squared_error: f64::NAN, ..Default::default() })
                .unwrap_err();
        assert_eq!(err.field, "sums.squared_error");
        let err =
            EvalSums::try_from(pb::EvalSums { n_ranked: 1, hits_at_10: 2.0, ..Default::default() })
                .unwrap_err();
        assert_eq!(err.field, "sums.hits_at_10");
    }
}
