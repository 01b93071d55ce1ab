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
