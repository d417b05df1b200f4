//! The decision for an identified (or anonymous) request.

use std::fmt;
use std::time::Duration;

use crate::policy::{contains, Access, Policy, Role, Route, User};
use crate::Facts;

/// The unlock window of the gateway's own admin pages, and their scope name.
pub const ADMIN_PAGES_SCOPE: &str = "/.pbxgate/admin";
pub const ADMIN_UNLOCK_MAX: Duration = Duration::from_secs(15 * 60);

/// How long a real sign-in (or unlock) counts as fresh: adding a passkey,
/// setting a password or deleting a passkey needs one this recent.
pub const RECENT_AUTH: Duration = Duration::from_secs(5 * 60);

/// Who is asking, with the conditions their session carries.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    /// The user's name as in the policy file.
    pub name: &'a str,
    /// Open unlock windows: (scope, until this Unix time in seconds). A scope
    /// is a route's path, or [`ADMIN_PAGES_SCOPE`].
    pub unlocked: &'a [(String, u64)],
    /// Must create a passkey before reaching anything else.
    pub passkey_pending: bool,
    /// When the person last proved who they are in a ceremony (Unix
    /// seconds); `None` when the session came from a remember token.
    pub authenticated_at: Option<u64>,
}

impl<'a> Principal<'a> {
    /// A principal with no conditions (an API account's Basic credentials,
    /// checked on this very request).
    pub fn verified_now(name: &'a str, now: u64) -> Self {
        Self { name, unlocked: &[], passkey_pending: false, authenticated_at: Some(now) }
    }

    fn unlocked_for(&self, scope: &str, now: u64) -> bool {
        self.unlocked.iter().any(|(s, until)| s == scope && *until > now)
    }

    fn fresh(&self, now: u64) -> bool {
        self.authenticated_at.is_some_and(|at| now.saturating_sub(at) <= RECENT_AUTH.as_secs())
    }
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
    /// Create a passkey first: nothing else is open until then.
    PasskeyFirst,
    /// Prove who you are again (a real ceremony, not a remember token).
    Reauthenticate,
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
    if principal.passkey_pending {
        return Verdict::PasskeyFirst;
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
        if !principal.unlocked_for(&route.path, now) {
            return Verdict::StepUp { max };
        }
    }
    Verdict::Allow
}

/// The gateway's own endpoints that act for a signed-in person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The person's own account: who they are, their sessions and passkeys,
    /// the passkey offer.
    Account,
    /// Adding a passkey.
    PasskeyRegister,
    PasskeyRename,
    PasskeyDelete,
    /// Setting one's own password (where the policy lets people).
    PasswordSet,
    /// The unlock page and its ceremonies.
    Unlock,
    /// The gateway's admin pages and API.
    Admin,
    /// Signing out: always open, to anyone.
    SignOut,
}

/// Decides a request to one of the gateway's own endpoints. `now`: Unix seconds.
pub fn decide_endpoint(
    policy: &Policy,
    endpoint: Endpoint,
    facts: &Facts<'_>,
    principal: Option<&Principal<'_>>,
    now: u64,
) -> Verdict {
    if endpoint == Endpoint::SignOut {
        return Verdict::Allow;
    }
    let Some((principal, user)) = principal.and_then(|p| Some((p, policy.user(p.name)?))) else {
        return Verdict::Login;
    };
    if user.role == Role::Api {
        return Verdict::Deny(DenyReason::Role);
    }
    if !user_may_come_from(policy, user, facts) {
        return Verdict::Deny(DenyReason::UserNetwork);
    }
    let fresh_or_again = |verdict| if principal.fresh(now) { verdict } else { Verdict::Reauthenticate };
    match endpoint {
        Endpoint::Account => Verdict::Allow,
        Endpoint::PasskeyRegister => fresh_or_again(Verdict::Allow),
        _ if principal.passkey_pending => Verdict::PasskeyFirst,
        Endpoint::PasskeyRename | Endpoint::Unlock => Verdict::Allow,
        Endpoint::PasskeyDelete | Endpoint::PasswordSet => fresh_or_again(Verdict::Allow),
        Endpoint::Admin if user.role != Role::Admin => Verdict::Deny(DenyReason::Role),
        Endpoint::Admin if !principal.unlocked_for(ADMIN_PAGES_SCOPE, now) => {
            Verdict::StepUp { max: ADMIN_UNLOCK_MAX }
        }
        Endpoint::Admin | Endpoint::SignOut => Verdict::Allow,
    }
}

/// What unlocking for `path` (normalised) opens, and for how long at most:
/// the route's own window, or the admin pages' for the gateway's pages and
/// for paths that need no unlock.
pub fn unlock_scope<'p>(policy: &'p Policy, path: &str) -> (&'p str, Duration) {
    if !path.starts_with("/.pbxgate/") {
        if let Some((route, max)) = policy.route_for(path).and_then(|r| Some((r, r.step_up?))) {
            return (&route.path, max);
        }
    }
    (ADMIN_PAGES_SCOPE, ADMIN_UNLOCK_MAX)
}

/// Whether `path` (normalised) falls under another rule when a lenient PBX
/// reads it (see [`crate::lenient_reading`]: `;` parameters dropped, case
/// ignored, trailing dots and spaces trimmed): the rule that decided would
/// then not be the one guarding what the PBX serves (`/public/..;/admin/`,
/// `/admin;x/`, `/ADMIN/`, `/admin./`), so such a request is refused.
pub fn lenient_reading_changes_route(policy: &Policy, path: &str) -> bool {
    let Some(read) = crate::path::lenient_reading(path) else { return false };
    let strict = policy.route_for(path).map(|r| r.index);
    // Route paths are compared without case too: `/Admin/` covers `/admin/x` here.
    let lenient = policy.routes.iter().find(|r| r.matches_ignoring_case(&read)).map(|r| r.index);
    strict != lenient
}

/// A user's own networks and their role's networks both apply when set.
pub fn user_may_come_from(policy: &Policy, user: &User, facts: &Facts<'_>) -> bool {
    let own = user.networks.is_empty() || contains(&user.networks, facts.client_ip);
    let by_role = policy
        .role_settings(user.role)
        .is_none_or(|r| r.networks.is_empty() || contains(&r.networks, facts.client_ip));
    own && by_role
}

/// The ways a person proves who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// An emailed sign-in link or invite.
    Link,
    Passkey,
    /// A password at the sign-in page, or to unlock.
    Password,
    /// The one-time admin password (first admin, or recovery).
    OneTimePassword,
    /// HTTP Basic, for API accounts.
    Basic,
    /// A remember cookie renewing a session.
    Remembered,
}

/// Why a proof is not accepted for an account (never shown to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInRefusal {
    UnknownUser,
    /// API accounts use Basic only; people never do.
    Role,
    /// The account may not use this proof (`password_login`, `basic_auth`).
    NotAllowed,
    Network,
}

impl SignInRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownUser => "unknown_user",
            Self::Role => "role",
            Self::NotAllowed => "not_allowed",
            Self::Network => "network",
        }
    }
}

/// Whether `login` (a name or an email) may prove who they are with
/// `proof` from where the request comes: the account, its role, its flags
/// and its networks (and its role's).
pub fn sign_in<'p>(
    policy: &'p Policy,
    login: &str,
    proof: Proof,
    facts: &Facts<'_>,
) -> Result<&'p User, SignInRefusal> {
    let user = policy.user(login).ok_or(SignInRefusal::UnknownUser)?;
    let role_fits = match proof {
        Proof::Basic => user.role == Role::Api,
        Proof::OneTimePassword => user.role == Role::Admin,
        _ => user.role != Role::Api,
    };
    if !role_fits {
        return Err(SignInRefusal::Role);
    }
    let allowed = match proof {
        Proof::Password => user.password_login,
        Proof::Basic => user.basic_auth,
        Proof::Link | Proof::Passkey | Proof::OneTimePassword | Proof::Remembered => true,
    };
    if !allowed {
        return Err(SignInRefusal::NotAllowed);
    }
    if !user_may_come_from(policy, user, facts) {
        return Err(SignInRefusal::Network);
    }
    Ok(user)
}
