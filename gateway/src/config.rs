//! Configuration: `gateway.toml` (figment: file, then `PBXGATE_` environment
//! variables with `__` for nesting) into raw structs that refuse unknown keys,
//! then validated into the runtime types below. Every problem is reported with
//! its key path.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use http::header::HeaderName;
use http::Uri;
use pbxgate_policies::{duration, Policy};
use serde::{Deserialize, Deserializer};

mod raw;

pub use raw::RawConfig;

/// One problem in the configuration, at a key path (`tls.min_version`,
/// `policy: route[2].networks[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found while loading, so an operator fixes them in one go.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (relative paths in it are relative to its directory).
    pub source: PathBuf,
    pub policy_file: PathBuf,
    /// Where the gateway keeps what it makes: the embedded store (a relative
    /// `embedded://` path is relative to it) and the self-signed certificate.
    /// `state_directory`, relative to the configuration file's directory;
    /// by default that directory itself.
    pub state_directory: PathBuf,
    pub policy: Arc<Policy>,
    pub public_url: PublicUrl,
    pub listen: Listen,
    pub tls: Tls,
    pub upstream: Upstream,
    pub limits: Limits,
    pub store: Store,
    pub session: Session,
    pub links: Links,
    pub email: Email,
    pub webauthn: Webauthn,
    pub passwords: Passwords,
    pub history: History,
    pub headers: IdentityHeaders,
    pub log: Log,
    pub bootstrap: Bootstrap,
    pub ui: UiSettings,
}

/// `[ui]`: the operator's brand and the pages' language.
#[derive(Debug, Clone)]
pub struct UiSettings {
    /// Shown on every page and email; default `webauthn.rp_name`.
    pub product_name: String,
    /// An SVG or PNG file, served under `/.pbxgate/assets/`.
    pub logo: Option<PathBuf>,
    /// `#rgb` or `#rrggbb`.
    pub accent_color: Option<String>,
    /// An email address or phone line shown on every page and email.
    pub support: Option<String>,
    /// For people whose language is not known and whose browser asks for none of ours.
    pub default_language: crate::ui::Lang,
    /// Templates here replace the built-in ones of the same name.
    pub templates_dir: Option<PathBuf>,
}

/// A one-time password for an admin, for a first start or a lost admin
/// (Vodia's admin password reset). Consumed at the first sign-in with it.
#[derive(Debug, Clone, Default)]
pub struct Bootstrap {
    pub admin: Option<String>,
    pub one_time_password: Option<String>,
    /// From `bootstrap.one_time_password_file`: only while no admin has a
    /// passkey or password. From the command line: always.
    pub only_until_first_credential: bool,
}

#[derive(Debug, Clone)]
pub struct PublicUrl {
    pub https: bool,
    pub host: String,
    pub port: Option<u16>,
    /// `https://host[:port]`, as browsers send it in `Origin`.
    pub origin: String,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub redirect_http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_timeout: Duration,
    /// How long a client has to send a request's headers, counted from the
    /// end of its previous response (or the connection's start): slow or idle
    /// HTTP/1 connections close after it.
    pub header_read_timeout: Duration,
    /// Threads serving connections, each with its own runtime (0 in the file: one per core).
    pub workers: usize,
    /// Worker threads under Linux's `SCHED_BATCH` (`listen.worker_scheduling = "batch"`).
    pub batch_scheduling: bool,
}

#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub domains: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    pub self_signed: bool,
    /// Where the self-signed certificate and its key are kept (the state directory).
    pub self_signed_dir: PathBuf,
    /// Zero turns session resumption off.
    pub session_ticket_lifetime: Duration,
    pub key_log_file: Option<PathBuf>,
    pub handshake_timeout: Duration,
    /// `Strict-Transport-Security` for the TLS listener's responses.
    pub hsts: Option<http::HeaderValue>,
    pub certificates: Vec<CertificateFiles>,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub url: Uri,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's response headers; past it, 504.
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_request_body: u64,
}

#[derive(Debug, Clone)]
pub struct Store {
    pub url: String,
    pub key_prefix: String,
    /// CA and client certificate for `rediss://`, the sentinels' credentials.
    pub redis: crate::store::RedisOptions,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub login_token_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Links {
    pub ttl: Duration,
    pub invite_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Email {
    /// `None`: links are written to the log (development).
    pub smtp_url: Option<String>,
    pub from: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserVerification {
    Required,
    Preferred,
    Discouraged,
}

#[derive(Debug, Clone)]
pub struct Webauthn {
    pub rp_id: String,
    pub rp_name: String,
    pub origins: Vec<String>,
    pub user_verification: UserVerification,
    pub max_passkeys_per_user: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordStrength {
    AcceptAll,
    Medium,
    High,
}

#[derive(Debug, Clone)]
pub struct Passwords {
    pub strength: PasswordStrength,
    pub allow_empty: bool,
    pub users_may_set: bool,
}

#[derive(Debug, Clone)]
pub struct History {
    pub retention: Duration,
}

/// Names of the identity headers sent upstream (and stripped from clients).
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub user: HeaderName,
    pub email: HeaderName,
    pub groups: HeaderName,
    pub name: HeaderName,
    pub assertion: Option<HeaderName>,
}

impl IdentityHeaders {
    pub fn all(&self) -> impl Iterator<Item = &HeaderName> {
        [&self.user, &self.email, &self.groups, &self.name].into_iter().chain(self.assertion.as_ref())
    }
}

#[derive(Debug, Clone)]
pub struct Log {
    pub format: LogFormat,
}

impl Config {
    /// Loads `path`, then `PBXGATE_*` environment overrides, then the policy file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::from_figment(path, Figment::new().merge(Toml::file_exact(path)).merge(env_provider()))
    }

    /// As [`Config::load`], with the provider chain given (tests use this).
    pub fn from_figment(path: &Path, figment: Figment) -> Result<Self, ConfigErrors> {
        if !path.is_file() {
            return Err(one("config", format!("cannot read {}: no such file", path.display())));
        }
        // The merged keys first, so that every problem is found in one pass:
        // unknown keys and values of the wrong type are reported and left out,
        // and what remains is still validated.
        let mut root: figment::value::Dict = figment.extract().map_err(figment_errors)?;
        let mut errors = raw::check_keys(&figment, &mut root);
        let merged = figment::value::Value::from(root);
        let raw: RawConfig = match merged.deserialize() {
            Ok(raw) => raw,
            Err(e) => {
                errors.extend(figment_errors(e).0);
                return Err(ConfigErrors(errors));
            }
        };
        match raw.validate(path) {
            Ok(config) if errors.is_empty() => Ok(config),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(more) => {
                for mut e in more.0 {
                    if let Some(name) = environment_variable(&figment, &merged, &e.path) {
                        e.message = format!("{} (from {name})", e.message);
                    }
                    errors.push(e);
                }
                Err(ConfigErrors(errors))
            }
        }
    }
}

/// The `PBXGATE_*` variable the value at `path` (`tls.min_version`,
/// `tls.certificates[0].cert`) came from, if it came from the environment.
fn environment_variable(figment: &Figment, merged: &figment::value::Value, path: &str) -> Option<String> {
    let keys: Vec<&str> = path.split('.').map(|k| k.split('[').next().unwrap_or(k)).collect();
    let value = merged.find_ref(&keys.join("."))?;
    from_environment(figment, value, &keys)
}

/// The variable behind `value` (at `keys`) when the environment provided it.
pub(crate) fn from_environment(
    figment: &Figment,
    value: &figment::value::Value,
    keys: &[&str],
) -> Option<String> {
    let metadata = figment.get_metadata(value.tag())?;
    let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
    metadata.name.contains("environment").then(|| format!("{ENV_PREFIX}{}", upper.join(ENV_SPLIT)))
}

const ENV_PREFIX: &str = "PBXGATE_";
const ENV_SPLIT: &str = "__";

/// The field names a derived `Deserialize` struct accepts (one helper for
/// both files: the policy's parser has it).
pub(crate) use pbxgate_policies::fields_of;

pub(crate) fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX).split(ENV_SPLIT)
}

fn one(path: impl Into<String>, message: impl Into<String>) -> ConfigErrors {
    ConfigErrors(vec![ConfigError { path: path.into(), message: message.into() }])
}

fn figment_errors(error: figment::Error) -> ConfigErrors {
    use figment::error::Kind;
    ConfigErrors(
        error
            .into_iter()
            .map(|e| {
                let mut path = e.path.join(".");
                let message = match &e.kind {
                    Kind::UnknownField(field, _) => {
                        append_key(&mut path, &e.path, field);
                        "unknown key".to_string()
                    }
                    Kind::MissingField(field) => {
                        append_key(&mut path, &e.path, field);
                        "missing key".to_string()
                    }
                    kind => kind.to_string(),
                };
                let message = match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                    Some(source) => format!("{message} (from {source})"),
                    None => message,
                };
                ConfigError { path: if path.is_empty() { "config".into() } else { path }, message }
            })
            .collect(),
    )
}

/// Figment sometimes names the offending key in the path already, sometimes not.
fn append_key(path: &mut String, segments: &[String], key: &str) {
    if segments.last().is_some_and(|last| last == key) {
        return;
    }
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

/// Accepts a string, or a number that environment parsing made of one
/// (`PBXGATE_TLS__MIN_VERSION=1.3`, `PBXGATE_SESSION__IDLE_TIMEOUT=600`).
pub(crate) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        S(String),
        I(i64),
        F(f64),
    }
    Ok(match Text::deserialize(d)? {
        Text::S(s) => s,
        Text::I(i) => i.to_string(),
        Text::F(f) => f.to_string(),
    })
}

/// Sizes such as `"64KiB"`, `"1GiB"`, `"100MB"` or a plain number of bytes.
/// Hides the credentials in a URL (`redis://:secret@host` -> `redis://***@host`).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let number: u64 = text[..split].parse().map_err(|_| format!("invalid size {text:?}"))?;
    let factor: u64 = match text[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        unit => return Err(format!("invalid size {text:?}: unknown unit {unit:?} (B, KiB, MiB, GiB)")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("invalid size {text:?}: too large"))
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    duration::parse(text)
}

#[cfg(test)]
mod tests;
