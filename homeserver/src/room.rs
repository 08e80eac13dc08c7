//! The room model: events, auth rules, state resolution, and the per-room writer.

pub mod auth;
pub mod object;
pub mod pdu;
