//! Generated gRPC code for the fedretail wire format, package `fedretail.v1`.
//!
//! # Layout
//!
//! - `proto/fedretail.proto`: the `Training` service that store clients call.
//! - `proto/admin.proto`: the `Admin` service that operators and the simulator call.
//!
//! Nothing but generated code lives here: conversions to domain types sit at the edges
//! (`coordinator/src/service/convert.rs`, `client/src/transport.rs`).

/// Messages and services of package `fedretail.v1`.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations)] // reason: generated code
#[allow(clippy::all)] // reason: generated code
pub mod pb {
    tonic::include_proto!("fedretail.v1");
}

/// Encoded `FileDescriptorSet` of both files, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fedretail_descriptor");
