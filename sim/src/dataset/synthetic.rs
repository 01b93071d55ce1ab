//! Synthetic ratings for tests and scale runs.
