//! fedretail store client: trains on a store's own data and sends only clipped updates of the
//! global model parameters.
//!
//! # Layout
//!
//! - [`participant`]: the client side of a task ([`participant::Participant`], the API that
//!   store software embeds).
//! - [`transport`]: the [`transport::Transport`] trait and its gRPC implementation.
//! - [`data`]: CSV loading and the store's train/held-out split.
//! - [`personal`]: user parameters saved on disk; never sent.
//! - [`audit_log`]: an append-only record of everything sent, written before it is sent.
//! - [`keygen`]: the store's own key and certificate request.
//! - [`policy`]: the store's privacy policy, checked before it trains.
//! - [`ledger`]: the store's own durable record of the privacy it has spent.

pub mod audit_log;
pub mod data;
pub mod identity;
pub mod keygen;
pub mod ledger;
pub mod participant;
pub mod personal;
pub mod policy;
pub mod transport;
