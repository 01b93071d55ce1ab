//! Coordinator integration tests over real gRPC on loopback: one binary, several modules.

mod happy_path;
mod rejects;
mod support;
