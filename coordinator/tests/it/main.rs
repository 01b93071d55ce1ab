//! Coordinator integration tests over real gRPC on loopback: one binary, several modules.

mod crash_kill;
mod crash_resume;
mod happy_path;
mod mtls;
mod policy;
mod privacy_cli;
mod rejects;
mod secure_aggregation;
mod stress;
mod support;
