//! Maps a [`Reject`] to a gRPC status in one function, so every code is chosen in one place.

use crate::round::Reject;
use tonic::{Code, Status};

/// The gRPC status for a rejected request.
pub(crate) fn to_status(reject: &Reject) -> Status {
    let code = match reject {
        Reject::UnknownClient(_) => Code::Unauthenticated,
        Reject::UnknownTask(_) | Reject::NoSuchModel(_) => Code::NotFound,
        Reject::TaskEnded
        | Reject::StaleRound { .. }
        | Reject::WrongPhase { .. }
        | Reject::WrongState { .. } => Code::FailedPrecondition,
        Reject::NotInCohort(_) | Reject::NotYours(_) => Code::PermissionDenied,
        Reject::TooManyClients(_) => Code::ResourceExhausted,
        Reject::Duplicate(_) => Code::AlreadyExists,
        Reject::InvalidUpdate(_) | Reject::Malformed(_) => Code::InvalidArgument,
        Reject::ShuttingDown => Code::Unavailable,
    };
    Status::new(code, reject.to_string())
}
