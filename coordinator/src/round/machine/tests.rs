//! Tests of the round state machine.
