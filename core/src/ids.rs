//! Identifier newtypes: a round id can never be passed where a client id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A training task on one coordinator. Never reused.
    TaskId,
    "task-"
);
id_type!(
    /// One round of a task. Allocated from a persisted counter and never reused, so an upload
    /// for a round from before a crash is recognised as stale.
    RoundId,
    "round-"
);
id_type!(
    /// A store client enrolled with a coordinator.
    ClientId,
    "client-"
);
id_type!(
    /// A version of a task's global model; version 0 is the initial model.
    ModelVersion,
    "v"
);

impl ModelVersion {
    /// The version after this one.
    pub fn next(self) -> ModelVersion {
        ModelVersion(self.0 + 1)
    }
}

/// Longest store or administrator name (bytes).
pub const MAX_NAME_BYTES: usize = 64;

/// Whether `name` may name a store or an administrator: 1 to [`MAX_NAME_BYTES`] letters,
/// digits, '-', '_' and '.', not starting with '.'. Such names become file names (certificates,
/// keys) and appear in logs, so nothing else is allowed.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
