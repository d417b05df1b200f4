//! The decision for an identified (or anonymous) request.

use std::fmt;
use std::time::Duration;

use crate::policy::{contains, Access, Policy, Role, Route, User};
use crate::Facts;

/// Who is asking, as the gateway's session store knows them.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    /// The user's name as in the policy file.
    pub name: &'a str,
    /// Unlocked (stepped up) until this Unix time, in seconds.
    pub step_up_until: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Identify first (a login page for browsers, 401 for others).
    Login,
    /// Re-verify first; the person may unlock for up to `max`.
    StepUp {
        max: Duration,
    },
    Deny(DenyReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// No route covers the path.
    NoRoute,
    /// The client is outside the route's networks.
    RouteNetwork,
    /// The client is outside the user's (or the user's role's) networks.
    UserNetwork,
    /// The user's role may not use this route.
    Role,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::RouteNetwork => "route_network",
            Self::UserNetwork => "user_network",
            Self::Role => "role",
        }
    }
}

/// Which rule fired, for the access log and the audit trail.
#[derive(Debug, Clone, Copy)]
pub enum Rule<'p> {
    Route(&'p Route),
    NoRoute,
}

impl<'p> Rule<'p> {
    /// `route[0] user /` or `no_route`, as logs name it.
    pub fn name(&self) -> &'p str {
        match self {
            Self::Route(r) => &r.label,
            Self::NoRoute => "no_route",
        }
    }
}

impl fmt::Display for Rule<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Decision<'p> {
    pub verdict: Verdict,
    pub rule: Rule<'p>,
    /// The principal's policy entry, when there is one.
    pub user: Option<&'p User>,
}

/// Decides a request. `now` is Unix time in seconds.
pub fn decide<'p>(
    policy: &'p Policy,
    facts: &Facts<'_>,
    principal: Option<&Principal<'_>>,
    now: u64,
) -> Decision<'p> {
    decide_on_route(policy, policy.route_for(facts.path), facts, principal, now)
}

/// [`decide`] with the route already looked up: `route` must be
/// `policy.route_for(facts.path)`.
pub fn decide_on_route<'p>(
    policy: &'p Policy,
    route: Option<&'p Route>,
    facts: &Facts<'_>,
    principal: Option<&Principal<'_>>,
    now: u64,
) -> Decision<'p> {
    // A principal the policy no longer names (user removed) is nobody.
    let user = principal.and_then(|p| policy.user(p.name));
    let Some(route) = route else {
        return Decision { verdict: Verdict::Deny(DenyReason::NoRoute), rule: Rule::NoRoute, user };
    };
    let verdict = verdict_for(policy, route, facts, principal.zip(user), now);
    Decision { verdict, rule: Rule::Route(route), user }
}

fn verdict_for(
    policy: &Policy,
    route: &Route,
    facts: &Facts<'_>,
    who: Option<(&Principal<'_>, &User)>,
    now: u64,
) -> Verdict {
    let in_route_networks = contains(&route.networks, facts.client_ip);
    match route.access {
        Access::Public | Access::User | Access::Admin if !route.networks.is_empty() && !in_route_networks => {
            return Verdict::Deny(DenyReason::RouteNetwork)
        }
        Access::Public => return Verdict::Allow,
        Access::Network if in_route_networks => return Verdict::Allow,
        Access::Network => return Verdict::Deny(DenyReason::RouteNetwork),
        // Vodia's API access list: a listed network needs no account.
        Access::Api if in_route_networks => return Verdict::Allow,
        Access::Api | Access::User | Access::Admin => {}
    }
    let Some((principal, user)) = who else {
        return Verdict::Login;
    };
    if !user_may_come_from(policy, user, facts) {
        return Verdict::Deny(DenyReason::UserNetwork);
    }
    let role_fits = match route.access {
        Access::Api => user.role == Role::Api,
        Access::Admin => user.role == Role::Admin,
        // API accounts never use the browser routes.
        _ => user.role != Role::Api,
    };
    if !role_fits {
        return Verdict::Deny(DenyReason::Role);
    }
    if let Some(max) = route.step_up {
        if principal.step_up_until.is_none_or(|until| until <= now) {
            return Verdict::StepUp { max };
        }
    }
    Verdict::Allow
}

/// A user's own networks and their role's networks both apply when set.
pub fn user_may_come_from(policy: &Policy, user: &User, facts: &Facts<'_>) -> bool {
    let own = user.networks.is_empty() || contains(&user.networks, facts.client_ip);
    let by_role = policy
        .role_settings(user.role)
        .is_none_or(|r| r.networks.is_empty() || contains(&r.networks, facts.client_ip));
    own && by_role
}
