//! The policy language of pbxgate: plain data in, plain data out.
//!
//! No IO, no async runtime, no clock: the gateway reads the file, gathers the
//! request's facts and passes `now`; this crate says what to do. That keeps it
//! table-testable and safe to fuzz.

mod decide;
pub mod duration;
mod host;
mod path;
mod policy;
mod screen;

pub use decide::{
    decide, decide_endpoint, decide_on_route, lenient_reading_changes_route, sign_in, unlock_scope,
    user_may_come_from, Decision, DenyReason, Endpoint, Principal, Proof, Rule, SignInRefusal, Verdict,
    ADMIN_PAGES_SCOPE, ADMIN_UNLOCK_MAX, RECENT_AUTH,
};
pub use host::{parse_host, Host, HostError};
pub use path::{lenient_reading, normalize_path, PathError};
pub use policy::{fields_of, Access, Domain, Policy, PolicyError, Role, RoleSettings, Route, User};
pub use screen::{screen, DropReason, Screen};

use std::net::IpAddr;

/// What the gateway knows about a request before anyone is identified.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The client: the socket peer, or the address a trusted proxy reported.
    pub client_ip: IpAddr,
    /// Host without port or trailing dot, lower case; empty when absent.
    pub host: &'a str,
    pub method: &'a str,
    /// The normalised path (see [`normalize_path`]).
    pub path: &'a str,
    pub user_agent: Option<&'a str>,
}

#[cfg(test)]
mod tests;
