//! Conversions between `pb` messages and the coordinator's domain types that only the
//! coordinator needs (assignments, task status). Shared ones live in `fedretail_proto::convert`.

use crate::round::{Assignment, PrivacyReport, RoundSummary, TaskState, TaskStatus};

impl From<&PrivacyReport> for pb::PrivacyReport {
    fn from(p: &PrivacyReport) -> pb::PrivacyReport {
        pb::PrivacyReport {
            epsilon: p.epsilon,
            delta: p.delta,
            unit: pb::PrivacyUnit::from(p.unit).into(),
            noise_placement: pb::NoisePlacement::from(p.noise_placement).into(),
            rounds: p.rounds,
            sampling_rate: p.sampling_rate,
            noise_multiplier: p.noise_multiplier,
            clip_norm: p.clip_norm,
            target_epsilon: p.target_epsilon,
            accountant: pb::Accountant::from(p.accountant).into(),
            epsilon_against_coordinator: p.epsilon_against_coordinator,
            domain: p.domain.clone(),
            domain_epsilon: p.domain_epsilon.unwrap_or(f64::NAN),
            domain_delta: p.domain_delta,
            interrupted_rounds: p.interrupted_rounds,
            evaluation_epsilon: p.evaluation_epsilon,
            evaluation_budget: p.evaluation_budget,
            total_epsilon: p.total_epsilon,
            evaluation_rounds: p.evaluation_rounds,
        }
    }
}
use fedretail_proto::pb;

impl From<TaskState> for pb::TaskState {
    fn from(s: TaskState) -> pb::TaskState {
        match s {
            TaskState::Running => pb::TaskState::Running,
            TaskState::Finished => pb::TaskState::Finished,
            TaskState::Failed => pb::TaskState::Failed,
            TaskState::BudgetExhausted => pb::TaskState::BudgetExhausted,
            TaskState::Paused => pb::TaskState::Paused,
            TaskState::Cancelled => pb::TaskState::Cancelled,
        }
    }
}

impl From<Assignment> for pb::NextAssignmentResponse {
    fn from(a: Assignment) -> pb::NextAssignmentResponse {
        use pb::next_assignment_response::Assignment as A;
        let assignment = match a {
            Assignment::Wait => A::Wait(pb::Wait { retry_after_ms: 0 }),
            Assignment::Train {
                round,
                version,
                n_params,
                local_epochs,
                clip_norm,
                round_seed,
                upload_timeout,
                privacy,
                masked,
            } => A::Train(pb::TrainAssignment {
                privacy: privacy.map(Into::into),
                round_id: round.0,
                model_version: version.0,
                n_params: n_params as u64,
                local_epochs,
                clip_norm,
                round_seed,
                upload_timeout_ms: upload_timeout.as_millis() as u64,
                encoding: if masked.is_some() {
                    pb::UpdateEncoding::MaskedU32Le.into()
                } else {
                    pb::UpdateEncoding::Float32Le.into()
                },
                masked: masked.map(|m| pb::MaskedTrain {
                    params: Some(m.params.as_ref().into()),
                    index: m.index,
                    shares: m.shares.iter().map(Into::into).collect(),
                }),
            }),
            Assignment::Evaluate { round, version, n_params, seed, privacy } => {
                A::Evaluate(pb::EvaluateAssignment {
                    round_id: round.0,
                    model_version: version.0,
                    n_params: n_params as u64,
                    round_seed: seed,
                    privacy: privacy.map(Into::into),
                })
            }
            Assignment::Advertise { round, params, cohort, index } => {
                A::AdvertiseKeys(pb::AdvertiseKeysAssignment {
                    round_id: round.0,
                    cohort: cohort.iter().map(|c| c.0).collect(),
                    index,
                    params: Some(params.as_ref().into()),
                })
            }
            Assignment::ShareKeys { round, adverts } => A::ShareKeys(pb::ShareKeysAssignment {
                round_id: round.0,
                neighbours: adverts
                    .iter()
                    .map(|(a, identity)| {
                        fedretail_proto::convert::secagg::advertised_to_pb(a, identity)
                    })
                    .collect(),
            }),
            Assignment::Unmask { round, survivors, dropped } => A::Unmask(pb::UnmaskAssignment {
                round_id: round.0,
                survivors: survivors.into_iter().map(u64::from).collect(),
                dropped: dropped.into_iter().map(u64::from).collect(),
            }),
            Assignment::Finished { state, reason } => {
                A::Finished(pb::TaskFinished { state: pb::TaskState::from(state).into(), reason })
            }
        };
        pb::NextAssignmentResponse { assignment: Some(assignment) }
    }
}

impl From<&RoundSummary> for pb::RoundStatus {
    fn from(r: &RoundSummary) -> pb::RoundStatus {
        pb::RoundStatus {
            round_id: r.round.0,
            phase: r.phase.to_string(),
            cohort_size: r.cohort_size,
            n_uploads: r.n_uploads,
            n_rejected: r.n_rejected,
            failure: r.failure.clone().unwrap_or_default(),
            eval: r.eval.as_ref().map(Into::into),
            model_version: r.model_version.0,
            mean_train_loss: r.mean_train_loss,
            secure_aggregation: r.secure.map(|s| pb::SecureAggregationStatus {
                cohort: s.cohort,
                bits: s.bits,
                degree: s.degree,
                threshold: s.threshold,
                dropped_before_advertising: s.dropped_before_advertising,
                dropped_before_sharing: s.dropped_before_sharing,
                dropped_before_upload: s.dropped_before_upload,
                dropped_before_unmasking: s.dropped_before_unmasking,
            }),
        }
    }
}

impl From<&TaskStatus> for pb::TaskStatus {
    fn from(t: &TaskStatus) -> pb::TaskStatus {
        pb::TaskStatus {
            task_id: t.task.0,
            spec: Some(t.spec.as_ref().into()),
            state: pb::TaskState::from(t.state).into(),
            state_reason: t.state_reason.clone(),
            model_version: t.model_version.0,
            committed_rounds: t.committed_rounds,
            failed_rounds: t.failed_rounds,
            connected_clients: t.connected_clients,
            phase: t.phase.to_string(),
            rounds: t.rounds.iter().map(Into::into).collect(),
            privacy: t.privacy.as_ref().map(Into::into),
        }
    }
}
