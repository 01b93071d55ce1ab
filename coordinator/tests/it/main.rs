//! Coordinator integration tests over real gRPC on loopback: one binary, several modules.

mod crash_resume;
mod happy_path;
mod mtls;
mod policy;
mod privacy_cli;
mod rejects;
mod support;
