//! Generated gRPC code for the fedretail wire format, package `fedretail.v1`.
//!
//! # Layout
//!
//! - `proto/fedretail.proto`: the `Training` service that store clients call.
//! - `proto/admin.proto`: the `Admin` service that operators and the simulator call.
//!
//! Besides generated code, [`convert`] holds the conversions between `pb` messages and the
//! `fedretail-core` types that both the coordinator and the client need (task specs, model specs,
//! evaluation sums), so they exist once. Conversions only one side needs stay at that edge
//! (`coordinator/src/service/convert.rs`, `client/src/transport.rs`).

pub mod convert;

/// Messages and services of package `fedretail.v1`.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations)] // reason: generated code
#[allow(clippy::all)] // reason: generated code
pub mod pb {
    tonic::include_proto!("fedretail.v1");
}

/// Encoded `FileDescriptorSet` of both files, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fedretail_descriptor");
