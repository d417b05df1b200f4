//! The policy file: raw TOML schema, then validation into the types `decide` uses.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use serde::Deserialize;

use crate::duration;
use crate::path::normalize_path;

/// A problem in the policy file, with the key path it was found at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

impl PolicyError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    allow_unknown_host_networks: Vec<String>,
    #[serde(default)]
    drop_user_agents: Vec<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    /// Named networks that any `networks` list may refer to.
    #[serde(default)]
    networks: BTreeMap<String, Vec<String>>,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
    #[serde(default)]
    roles: BTreeMap<String, RawRoleSettings>,
    #[serde(default, rename = "user")]
    users: Vec<RawUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: String,
    access: String,
    #[serde(default)]
    networks: Vec<String>,
    step_up: Option<String>,
    #[serde(default)]
    basic_credentials: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoleSettings {
    #[serde(default)]
    require_passkey: bool,
    #[serde(default)]
    networks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    email: Option<String>,
    display_name: Option<String>,
    language: Option<String>,
    #[serde(default = "default_role")]
    role: String,
    #[serde(default)]
    networks: Vec<String>,
    #[serde(default)]
    require_passkey: bool,
    #[serde(default)]
    password_login: bool,
    #[serde(default)]
    basic_auth: bool,
}

/// A language tag's shape (RFC 5646, simplified): a primary language of two
/// or three letters, then subtags of letters and digits.
fn is_language_tag(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let primary = parts.next().unwrap_or_default();
    (2..=3).contains(&primary.len())
        && primary.bytes().all(|b| b.is_ascii_lowercase())
        && parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn default_role() -> String {
    "user".into()
}

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (after screening).
    Public,
    /// Clients in the route's networks, no login (phones fetching provisioning files).
    Network,
    /// Any logged-in person.
    User,
    /// Logged-in admins.
    Admin,
    /// API accounts, or clients in the route's networks (Vodia's API access list).
    Api,
}

impl Access {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "public" => Self::Public,
            "network" => Self::Network,
            "user" => Self::User,
            "admin" => Self::Admin,
            "api" => Self::Api,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Network => "network",
            Self::User => "user",
            Self::Admin => "admin",
            Self::Api => "api",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    User,
    Admin,
    Api,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "user" => Self::User,
            "admin" => Self::Admin,
            "api" => Self::Api,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Admin => "admin",
            Self::Api => "api",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Position in the file (0-based), for naming the rule in logs.
    pub index: usize,
    /// Normalised path prefix.
    pub path: String,
    pub access: Access,
    pub networks: Vec<IpNet>,
    /// Longest unlock window a person may choose; `None`: no unlock needed.
    pub step_up: Option<std::time::Duration>,
    /// For `access = "api"`: SHA-256 (hex) of `user:password` Basic
    /// credentials accepted without an account (Vodia's API access list).
    pub basic_credentials: Vec<String>,
    /// How logs name it (`route[0] user /`), made once at load.
    pub label: String,
}

impl Route {
    /// Whether `path` (normalised) falls under this route. `/admin/` also covers
    /// `/admin`, so the bare directory cannot slip past to a weaker rule.
    pub fn matches(&self, path: &str) -> bool {
        path.starts_with(&self.path)
            || (self.path.len() > 1 && self.path.ends_with('/') && path == &self.path[..self.path.len() - 1])
    }

    /// [`Route::matches`] for a lower-case `path`, the route's own ignoring case.
    pub fn matches_ignoring_case(&self, path: &str) -> bool {
        let own = self.path.as_bytes();
        let bare = own.strip_suffix(b"/").filter(|b| !b.is_empty());
        path.as_bytes().get(..own.len()).is_some_and(|p| p.eq_ignore_ascii_case(own))
            || bare.is_some_and(|b| path.as_bytes().eq_ignore_ascii_case(b))
    }
}

#[derive(Debug, Clone, Default)]
pub struct RoleSettings {
    pub require_passkey: bool,
    pub networks: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub email: Option<String>,
    pub display_name: Option<String>,
    /// The language pages and emails are in for this person: a language
    /// tag such as `de` or `fr-CH`, lower case; the gateway falls back to
    /// its default for one it does not speak.
    pub language: Option<String>,
    pub role: Role,
    /// Where this account may come from; empty: anywhere (the role's networks still apply).
    pub networks: Vec<IpNet>,
    pub require_passkey: bool,
    pub password_login: bool,
    pub basic_auth: bool,
}

/// A domain the gateway serves: exact, or `*.example.com` for any subdomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    Exact(String),
    AnySubdomainOf(String),
}

impl Domain {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host.eq_ignore_ascii_case(name),
            Self::AnySubdomainOf(parent) => {
                host.len() > parent.len() + 1
                    && host.as_bytes()[host.len() - parent.len() - 1] == b'.'
                    && host[host.len() - parent.len()..].eq_ignore_ascii_case(parent)
            }
        }
    }

    /// The name as written (`*.example.com` for a wildcard), for certificates.
    pub fn name(&self) -> String {
        match self {
            Self::Exact(name) => name.clone(),
            Self::AnySubdomainOf(parent) => format!("*.{parent}"),
        }
    }
}

/// A validated policy. Built once per load; requests only read it.
#[derive(Debug, Clone)]
pub struct Policy {
    pub domains: Vec<Domain>,
    pub allow_unknown_host_networks: Vec<IpNet>,
    /// Lower-cased scanner strings.
    pub drop_user_agents: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    /// Longest path first, so the first match is the most specific.
    pub routes: Vec<Route>,
    /// Fx-hashed here and below: every request looks these up, the keys
    /// come from this file (not from clients), so there is no flooding to
    /// resist and SipHash would only be slower.
    pub roles: FxHashMap<Role, RoleSettings>,
    pub users: Vec<User>,
    by_login: FxHashMap<String, usize>,
}

impl Policy {
    /// Parses and validates a policy file, reporting every problem found.
    /// Every problem at once, each at its key path: unknown keys are
    /// reported and left out, so that they hide nothing else; a value of the
    /// wrong type is reported at its route or user. Only TOML syntax errors,
    /// which leave no key to name, are given by line.
    pub fn from_toml(source: &str) -> Result<Self, Vec<PolicyError>> {
        let mut table: toml::Table = toml::from_str(source).map_err(|e| vec![toml_error(source, &e)])?;
        let mut errors = Vec::new();
        unknown_keys(&mut table, "", fields_of::<RawPolicy>(), &mut errors);
        for (key, fields) in [("route", fields_of::<RawRoute>()), ("user", fields_of::<RawUser>())] {
            if let Some(toml::Value::Array(items)) = table.get_mut(key) {
                for (i, item) in items.iter_mut().enumerate() {
                    let at = format!("{key}[{i}]");
                    match item {
                        toml::Value::Table(t) => {
                            unknown_keys(t, &at, fields, &mut errors);
                            if key == "route" {
                                typed::<RawRoute>(t, &at, &mut errors);
                            } else {
                                typed::<RawUser>(t, &at, &mut errors);
                            }
                        }
                        _ => errors.push(PolicyError::new(at, format!("use [[{key}]] tables"))),
                    }
                }
            }
        }
        if let Some(toml::Value::Table(roles)) = table.get_mut("roles") {
            for (name, settings) in roles.iter_mut() {
                if let toml::Value::Table(t) = settings {
                    let at = format!("roles.{name}");
                    unknown_keys(t, &at, fields_of::<RawRoleSettings>(), &mut errors);
                    typed::<RawRoleSettings>(t, &at, &mut errors);
                }
            }
        }
        // The other keys one by one: a wrong type names its key.
        let keys: Vec<String> =
            table.keys().filter(|k| !matches!(k.as_str(), "route" | "user")).cloned().collect();
        for key in keys {
            if let Some(value) = table.get(&key) {
                let mut one = toml::Table::new();
                one.insert(key.clone(), value.clone());
                if let Err(e) = RawPolicy::deserialize(toml::Value::Table(one)) {
                    errors.push(PolicyError::new(key, e.message().trim().to_string()));
                }
            }
        }
        if !errors.is_empty() {
            // With the unknown keys left out, the rest can still be checked.
            let only_unknown = errors.iter().all(|e| e.message == UNKNOWN_KEY);
            if only_unknown {
                if let Ok(raw) = RawPolicy::deserialize(toml::Value::Table(table)) {
                    if let Err(more) = Self::validate(raw) {
                        errors.extend(more);
                    }
                }
            }
            return Err(errors);
        }
        let raw = RawPolicy::deserialize(toml::Value::Table(table))
            .map_err(|e| vec![PolicyError::new("policy", e.message().trim().to_string())])?;
        Self::validate(raw)
    }

    fn validate(raw: RawPolicy) -> Result<Self, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut named = HashMap::new();
        for (name, entries) in &raw.networks {
            let nets = parse_networks(entries, &HashMap::new(), &format!("networks.{name}"), &mut errors);
            named.insert(name.clone(), nets);
        }

        if raw.domains.is_empty() {
            errors.push(PolicyError::new("domains", "at least one domain is required"));
        }
        let domains = raw
            .domains
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match parse_domain(d) {
                Ok(domain) => Some(domain),
                Err(message) => {
                    errors.push(PolicyError::new(format!("domains[{i}]"), message));
                    None
                }
            })
            .collect();

        let allow_unknown_host_networks = parse_networks(
            &raw.allow_unknown_host_networks,
            &named,
            "allow_unknown_host_networks",
            &mut errors,
        );
        let trusted_proxies = parse_networks(&raw.trusted_proxies, &named, "trusted_proxies", &mut errors);

        let mut drop_user_agents = Vec::new();
        for (i, ua) in raw.drop_user_agents.iter().enumerate() {
            if ua.trim().is_empty() {
                errors.push(PolicyError::new(
                    format!("drop_user_agents[{i}]"),
                    "an empty string would drop every request",
                ));
            } else {
                drop_user_agents.push(ua.to_ascii_lowercase());
            }
        }

        let mut routes: Vec<Route> = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let at = format!("route[{i}]");
            let Some(access) = Access::parse(&r.access) else {
                errors.push(PolicyError::new(
                    format!("{at}.access"),
                    format!("unknown access {:?} (public, network, user, admin or api)", r.access),
                ));
                continue;
            };
            let path = match normalize_path(&r.path) {
                Ok(p) if p == r.path => p.into_owned(),
                Ok(p) => {
                    errors.push(PolicyError::new(
                        format!("{at}.path"),
                        format!("{:?} is not in normal form; write {p:?}", r.path),
                    ));
                    continue;
                }
                Err(e) => {
                    errors.push(PolicyError::new(format!("{at}.path"), format!("{:?}: {e}", r.path)));
                    continue;
                }
            };
            if let Some(other) = routes.iter().find(|o| o.path == path) {
                errors.push(PolicyError::new(
                    format!("{at}.path"),
                    format!("{path:?} is already used by route[{}]", other.index),
                ));
            }
            let networks = parse_networks(&r.networks, &named, &format!("{at}.networks"), &mut errors);
            if access == Access::Network && networks.is_empty() {
                errors.push(PolicyError::new(
                    format!("{at}.networks"),
                    "access = \"network\" needs at least one network",
                ));
            }
            let step_up = match &r.step_up {
                None => None,
                Some(text) => match duration::parse(text) {
                    Ok(d) if d.is_zero() => {
                        errors.push(PolicyError::new(format!("{at}.step_up"), "must be longer than 0"));
                        None
                    }
                    Ok(d) => Some(d),
                    Err(e) => {
                        errors.push(PolicyError::new(format!("{at}.step_up"), e));
                        None
                    }
                },
            };
            if step_up.is_some() && !matches!(access, Access::User | Access::Admin) {
                errors.push(PolicyError::new(
                    format!("{at}.step_up"),
                    "only routes with access \"user\" or \"admin\" can be unlocked",
                ));
            }
            let mut basic_credentials = Vec::new();
            for (j, c) in r.basic_credentials.iter().enumerate() {
                let c = c.trim().trim_start_matches("sha256:").to_ascii_lowercase();
                if c.len() != 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
                    errors.push(PolicyError::new(
                        format!("{at}.basic_credentials[{j}]"),
                        "write the SHA-256 of \"user:password\" in hex (e.g. printf %s 'user:pass' | sha256sum)",
                    ));
                } else {
                    basic_credentials.push(c);
                }
            }
            if !basic_credentials.is_empty() && access != Access::Api {
                errors.push(PolicyError::new(
                    format!("{at}.basic_credentials"),
                    "only routes with access = \"api\" take an access list",
                ));
            }
            let label = format!("route[{i}] {} {path}", access.as_str());
            routes.push(Route { index: i, path, access, networks, step_up, basic_credentials, label });
        }
        routes.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(a.index.cmp(&b.index)));

        let mut roles = FxHashMap::default();
        for (name, settings) in &raw.roles {
            let at = format!("roles.{name}");
            let Some(role) = Role::parse(name) else {
                errors.push(PolicyError::new(at, "unknown role (user, admin or api)"));
                continue;
            };
            let networks = parse_networks(&settings.networks, &named, &format!("{at}.networks"), &mut errors);
            roles.insert(role, RoleSettings { require_passkey: settings.require_passkey, networks });
        }

        let mut users = Vec::new();
        let mut by_login = FxHashMap::default();
        for (i, u) in raw.users.iter().enumerate() {
            let at = format!("user[{i}]");
            let name = u.name.trim();
            if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control() || c == ':') {
                errors.push(PolicyError::new(
                    format!("{at}.name"),
                    "a name is 1 to 128 characters, without ':' or control characters",
                ));
                continue;
            }
            let Some(role) = Role::parse(&u.role) else {
                errors.push(PolicyError::new(
                    format!("{at}.role"),
                    format!("unknown role {:?} (user, admin or api)", u.role),
                ));
                continue;
            };
            let email = u.email.as_deref().map(str::trim).filter(|e| !e.is_empty());
            if let Some(email) = email {
                if !looks_like_email(email) {
                    errors.push(PolicyError::new(
                        format!("{at}.email"),
                        format!("{email:?} is not an email address"),
                    ));
                }
            }
            let networks = parse_networks(&u.networks, &named, &format!("{at}.networks"), &mut errors);
            if role == Role::Api && networks.is_empty() {
                errors.push(PolicyError::new(
                    format!("{at}.networks"),
                    "an API account must be limited to at least one network",
                ));
            }
            if u.basic_auth && role != Role::Api {
                errors.push(PolicyError::new(
                    format!("{at}.basic_auth"),
                    "only accounts with role = \"api\" may use Basic auth",
                ));
            }
            let language =
                u.language.as_deref().map(str::trim).map(|tag| tag.to_ascii_lowercase().replace('_', "-"));
            if let Some(tag) = language.as_deref().filter(|tag| !is_language_tag(tag)) {
                errors.push(PolicyError::new(
                    format!("{at}.language"),
                    format!("{tag:?} is not a language tag like \"de\" or \"fr-CH\""),
                ));
            }
            for login in std::iter::once(name).chain(email) {
                let key = login.to_lowercase();
                if let Some(&other) = by_login.get(&key) {
                    errors.push(PolicyError::new(
                        at.clone(),
                        format!("{login:?} is already the name or email of user[{other}]"),
                    ));
                } else {
                    by_login.insert(key, users.len());
                }
            }
            users.push(User {
                name: name.to_string(),
                email: email.map(str::to_string),
                display_name: u.display_name.clone(),
                language,
                role,
                networks,
                require_passkey: u.require_passkey,
                password_login: u.password_login,
                basic_auth: u.basic_auth,
            });
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            domains,
            allow_unknown_host_networks,
            drop_user_agents,
            trusted_proxies,
            routes,
            roles,
            users,
            by_login,
        })
    }

    /// The user whose name or email is `login` (case-insensitive).
    pub fn user(&self, login: &str) -> Option<&User> {
        let login = login.trim();
        // Names and addresses are usually lower case already: no copy for them.
        let index = if login.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
            self.by_login.get(login)
        } else {
            self.by_login.get(&login.to_lowercase())
        };
        index.map(|&i| &self.users[i])
    }

    /// The most specific route for a normalised path.
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path))
    }

    pub fn is_known_host(&self, host: &str) -> bool {
        self.domains.iter().any(|d| d.matches(host))
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        contains(&self.trusted_proxies, ip)
    }

    pub fn role_settings(&self, role: Role) -> Option<&RoleSettings> {
        self.roles.get(&role)
    }

    /// Whether a user must have a passkey (set on the user or on their role).
    pub fn requires_passkey(&self, user: &User) -> bool {
        user.require_passkey || self.role_settings(user.role).is_some_and(|r| r.require_passkey)
    }
}

pub(crate) fn contains(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    networks.iter().any(|n| n.contains(&ip))
}

/// `::ffff:10.0.0.1` is `10.0.0.1`: dual-stack sockets report IPv4 clients that way.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_networks(
    entries: &[String],
    named: &HashMap<String, Vec<IpNet>>,
    at: &str,
    errors: &mut Vec<PolicyError>,
) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let entry = entry.trim();
        if let Some(nets) = named.get(entry) {
            out.extend(nets.iter().copied());
        } else if let Ok(net) = entry.parse::<IpNet>() {
            out.push(net.trunc());
        } else if let Ok(ip) = entry.parse::<IpAddr>() {
            out.push(IpNet::from(ip));
        } else {
            errors.push(PolicyError::new(
                format!("{at}[{i}]"),
                format!("{entry:?} is not a CIDR, an IP address or a name from [networks]"),
            ));
        }
    }
    out
}

fn parse_domain(text: &str) -> Result<Domain, String> {
    let name = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let (wildcard, base) = match name.strip_prefix("*.") {
        Some(base) => (true, base.to_string()),
        None => (false, name.clone()),
    };
    let valid = !base.is_empty()
        && base.len() <= 253
        && base.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let is_ip = base.parse::<IpAddr>().is_ok();
    if !valid && !is_ip {
        return Err(format!("{text:?} is not a host name (or \"*.\" and a host name)"));
    }
    if wildcard && is_ip {
        return Err(format!("{text:?}: a wildcard needs a host name"));
    }
    Ok(if wildcard { Domain::AnySubdomainOf(base) } else { Domain::Exact(base) })
}

fn looks_like_email(text: &str) -> bool {
    match text.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !text.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

const UNKNOWN_KEY: &str = "unknown key";

/// Reports and removes the keys of `table` that are not `fields`.
fn unknown_keys(table: &mut toml::Table, at: &str, fields: &[&str], errors: &mut Vec<PolicyError>) {
    let unknown: Vec<String> = table.keys().filter(|k| !fields.contains(&k.as_str())).cloned().collect();
    for key in unknown {
        table.remove(&key);
        let path = if at.is_empty() { key } else { format!("{at}.{key}") };
        errors.push(PolicyError::new(path, UNKNOWN_KEY));
    }
}

/// Reports a table that is not a `T` (a value of the wrong type, a missing key).
fn typed<T: serde::de::DeserializeOwned>(table: &toml::Table, at: &str, errors: &mut Vec<PolicyError>) {
    if let Err(e) = T::deserialize(toml::Value::Table(table.clone())) {
        errors.push(PolicyError::new(at, e.message().trim().replace('\n', " ")));
    }
}

/// The field names a derived `Deserialize` struct accepts, as serde hands
/// them to the deserializer: the schema stays in the struct alone.
pub fn fields_of<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor};
    struct Grab<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Grab<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Grab(&mut fields));
    fields
}

fn toml_error(source: &str, error: &toml::de::Error) -> PolicyError {
    let path = match error.span() {
        Some(span) => {
            let line = source[..span.start.min(source.len())].matches('\n').count() + 1;
            format!("line {line}")
        }
        None => "policy".to_string(),
    };
    PolicyError::new(path, error.message().trim().to_string())
}
