//! The file's shape, exactly as written (unknown keys refused), and its
//! validation into [`Config`](super::Config).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::Uri;
use pbxgate_policies::Policy;
use serde::Deserialize;

use super::*;
use crate::store::{RedisOptions, RedisTls};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    policy_file: String,
    #[serde(default)]
    state_directory: String,
    #[serde(default = "d_public_url")]
    public_url: String,
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    session: RawSession,
    #[serde(default)]
    links: RawLinks,
    #[serde(default)]
    email: RawEmail,
    #[serde(default)]
    webauthn: RawWebauthn,
    #[serde(default)]
    passwords: RawPasswords,
    #[serde(default)]
    history: RawHistory,
    #[serde(default)]
    headers: RawHeaders,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    bootstrap: RawBootstrap,
    #[serde(default)]
    ui: RawUi,
}

fn d_public_url() -> String {
    "https://localhost:8443".into()
}

macro_rules! defaults {
    ($name:ident { $($field:ident : $ty:ty = $default:expr),* $(,)? }) => {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct $name { $($field: $ty),* }
        impl Default for $name {
            fn default() -> Self { Self { $($field: $default.into()),* } }
        }
    };
}

defaults!(RawListen {
    https: String = "127.0.0.1:8443",
    http: String = "",
    redirect_http: String = "",
    admin: String = "127.0.0.1:9464",
    shutdown_timeout: Text = "30s",
    header_read_timeout: Text = "30s",
    workers: usize = 0usize,
    worker_scheduling: String = "batch",
});

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    domains: Vec<String>,
    cert: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    min_version: Text,
    max_version: Text,
    self_signed: bool,
    session_ticket_lifetime: Text,
    key_log_file: String,
    handshake_timeout: Text,
    hsts_max_age: Text,
    certificates: Vec<RawCertificate>,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            min_version: "1.2".into(),
            max_version: "1.3".into(),
            self_signed: false,
            session_ticket_lifetime: "1h".into(),
            key_log_file: String::new(),
            handshake_timeout: "10s".into(),
            hsts_max_age: "0s".into(),
            certificates: Vec::new(),
        }
    }
}

defaults!(RawUpstream {
    url: String = "http://127.0.0.1:8080",
    ca_file: String = "",
    insecure_skip_verify: bool = false,
    connect_timeout: Text = "5s",
    timeout: Text = "60s",
    pool_idle_timeout: Text = "90s",
    pool_max_idle_per_host: usize = 256usize,
});

defaults!(RawLimits { max_header_size: Text = "64KiB", max_request_body: Text = "1GiB" });

defaults!(RawStore {
    url: String = "embedded://pbxgate-data/store.db",
    key_prefix: String = "pbxgate:",
    ca_file: String = "",
    client_cert_file: String = "",
    client_key_file: String = "",
    password_file: String = "",
    sentinel_username: String = "",
    sentinel_password: String = "",
    sentinel_password_file: String = "",
});

defaults!(RawSession {
    idle_timeout: Text = "3600s",
    max_lifetime: Text = "12h",
    login_token_ttl: Text = "30d",
});

defaults!(RawLinks { ttl: Text = "15m", invite_ttl: Text = "72h" });

defaults!(RawEmail {
    smtp_url: String = "",
    smtp_password_file: String = "",
    from: String = "PBX <pbx@example.com>",
});

defaults!(RawWebauthn {
    rp_id: String = "",
    rp_name: String = "PBX",
    origins: Vec<String> = Vec::<String>::new(),
    user_verification: String = "required",
    max_passkeys_per_user: usize = 20usize,
});

defaults!(RawPasswords {
    strength: String = "medium",
    allow_empty: bool = false,
    users_may_set: bool = false,
});

defaults!(RawHistory { retention: Text = "14d" });

defaults!(RawHeaders {
    user: String = "Remote-User",
    email: String = "Remote-Email",
    groups: String = "Remote-Groups",
    name: String = "Remote-Name",
    assertion: String = "",
});

defaults!(RawLog { format: String = "pretty" });

defaults!(RawUi {
    product_name: String = "",
    logo: String = "",
    accent_color: String = "",
    support: String = "",
    default_language: String = "en",
    templates_dir: String = "",
});

defaults!(RawBootstrap { admin: String = "", one_time_password_file: String = "" });

/// Reports, and removes from `root`, every unknown key and every value of
/// the wrong type, each at its key path and with the `PBXGATE_*` variable
/// it came from; what is left deserializes. A number or boolean from the
/// environment for a string key is taken as its text
/// (`PBXGATE_BOOTSTRAP__ADMIN=100`).
pub(super) fn check_keys(figment: &figment::Figment, root: &mut figment::value::Dict) -> Vec<ConfigError> {
    let mut c = Check::default();
    let known = fields_of::<RawConfig>();
    unknown_keys(&mut c, figment, root, &[], known);
    for key in ["policy_file", "state_directory", "public_url"] {
        if let Some(value) = root.get_mut(key) {
            if !typed::<String>(&mut c, figment, value, &[key]) {
                root.remove(key);
            }
        }
    }
    type Section = fn(&mut Check, &figment::Figment, &mut figment::value::Dict, &str);
    let sections: [(&str, Section); 14] = [
        ("listen", section::<RawListen>),
        ("tls", section::<RawTls>),
        ("upstream", section::<RawUpstream>),
        ("limits", section::<RawLimits>),
        ("store", section::<RawStore>),
        ("session", section::<RawSession>),
        ("links", section::<RawLinks>),
        ("email", section::<RawEmail>),
        ("webauthn", section::<RawWebauthn>),
        ("passwords", section::<RawPasswords>),
        ("history", section::<RawHistory>),
        ("headers", section::<RawHeaders>),
        ("log", section::<RawLog>),
        ("bootstrap", section::<RawBootstrap>),
    ];
    for (name, check) in sections {
        match root.get_mut(name) {
            Some(figment::value::Value::Dict(_, dict)) => check(&mut c, figment, dict, name),
            Some(_) => {
                c.error(name, "must be a table ([section])");
                root.remove(name);
            }
            None => {}
        }
    }
    c.errors
}

/// One `[section]`: its unknown keys, then each key on its own (the section's
/// other keys keep their defaults), so every wrong value is reported.
fn section<T: serde::de::DeserializeOwned>(
    c: &mut Check,
    figment: &figment::Figment,
    dict: &mut figment::value::Dict,
    name: &str,
) {
    unknown_keys(c, figment, dict, &[name], fields_of::<T>());
    if name == "tls" {
        if let Some(figment::value::Value::Array(_, certificates)) = dict.get_mut("certificates") {
            for (i, certificate) in certificates.iter_mut().enumerate() {
                if let figment::value::Value::Dict(_, d) = certificate {
                    let at = format!("tls.certificates[{i}]");
                    unknown_keys(c, figment, d, &[&at], fields_of::<RawCertificate>());
                }
            }
        }
    }
    let keys: Vec<String> = dict.keys().cloned().collect();
    for key in keys {
        let Some(value) = dict.get_mut(&key) else { continue };
        let mut one = figment::value::Dict::new();
        one.insert(key.clone(), value.clone());
        // Boxed: figment's error is large.
        let alone =
            |one: figment::value::Dict| figment::value::Value::from(one).deserialize::<T>().map_err(Box::new);
        let Err(e) = alone(one) else { continue };
        // A number or boolean the environment parsed, for a string key.
        let from_env = from_environment(figment, value, &[name, key.as_str()]).is_some();
        if from_env && matches!(value, figment::value::Value::Num(..) | figment::value::Value::Bool(..)) {
            let text = figment::value::Value::String(value.tag(), value_text(value));
            let mut one = figment::value::Dict::new();
            one.insert(key.clone(), text.clone());
            if alone(one).is_ok() {
                *value = text;
                continue;
            }
        }
        let message = e.kind.to_string();
        let path = format!("{name}.{key}");
        c.error(&path, with_origin(figment, value, &[name, key.as_str()], message));
        dict.remove(&key);
    }
}

/// A scalar value as text (`100`, `1.3`, `true`).
fn value_text(value: &figment::value::Value) -> String {
    use figment::value::{Num, Value};
    match value {
        Value::Num(_, Num::F32(f)) => f.to_string(),
        Value::Num(_, Num::F64(f)) => f.to_string(),
        Value::Num(..) => value
            .to_i128()
            .map(|i| i.to_string())
            .or_else(|| value.to_u128().map(|u| u.to_string()))
            .unwrap_or_default(),
        Value::Bool(_, b) => b.to_string(),
        Value::String(_, s) => s.clone(),
        Value::Char(_, ch) => ch.to_string(),
        _ => String::new(),
    }
}

/// `value` as a `T`, or an error at `keys` (and false).
fn typed<T: serde::de::DeserializeOwned>(
    c: &mut Check,
    figment: &figment::Figment,
    value: &mut figment::value::Value,
    keys: &[&str],
) -> bool {
    let Err(e) = value.deserialize::<T>() else { return true };
    if from_environment(figment, value, keys).is_some()
        && matches!(value, figment::value::Value::Num(..) | figment::value::Value::Bool(..))
    {
        *value = figment::value::Value::String(value.tag(), value_text(value));
        if value.deserialize::<T>().is_ok() {
            return true;
        }
    }
    let message = with_origin(figment, value, keys, e.kind.to_string());
    c.error(keys.join("."), message);
    false
}

/// Reports and removes the keys of `dict` that are not `fields`.
fn unknown_keys(
    c: &mut Check,
    figment: &figment::Figment,
    dict: &mut figment::value::Dict,
    at: &[&str],
    fields: &[&str],
) {
    let unknown: Vec<String> = dict.keys().filter(|k| !fields.contains(&k.as_str())).cloned().collect();
    for key in unknown {
        let Some(value) = dict.remove(&key) else { continue };
        let keys: Vec<&str> = at.iter().copied().chain([key.as_str()]).collect();
        let message = with_origin(figment, &value, &keys, "unknown key".to_string());
        c.error(keys.join("."), message);
    }
}

/// `message`, naming the environment variable `value` came from, if any.
fn with_origin(
    figment: &figment::Figment,
    value: &figment::value::Value,
    keys: &[&str],
    message: String,
) -> String {
    match from_environment(figment, value, keys) {
        Some(name) => format!("{message} (from {name})"),
        None => message,
    }
}

/// A string that the environment may have turned into a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
struct Text(#[serde(deserialize_with = "lenient_string")] String);

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// Collects problems instead of stopping at the first.
#[derive(Default)]
struct Check {
    errors: Vec<ConfigError>,
}

impl Check {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError { path: path.into(), message: message.into() });
    }

    fn duration(&mut self, path: &str, text: &Text) -> Duration {
        parse_duration(&text.0).unwrap_or_else(|e| {
            self.error(path, e);
            Duration::ZERO
        })
    }

    fn positive_duration(&mut self, path: &str, text: &Text) -> Duration {
        let d = self.duration(path, text);
        if d.is_zero() && parse_duration(&text.0).is_ok() {
            self.error(path, "must be longer than 0");
        }
        d
    }

    fn addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        text.parse()
            .map_err(|_| self.error(path, format!("{text:?} is not an address like 127.0.0.1:8443")))
            .ok()
    }

    fn tls_version(&mut self, path: &str, text: &Text) -> TlsVersion {
        match text.0.trim() {
            "1.2" => TlsVersion::V1_2,
            "1.3" => TlsVersion::V1_3,
            other => {
                self.error(path, format!("{other:?}: use \"1.2\" or \"1.3\""));
                TlsVersion::V1_2
            }
        }
    }

    fn header(&mut self, path: &str, text: &str) -> HeaderName {
        HeaderName::from_bytes(text.trim().as_bytes()).unwrap_or_else(|_| {
            self.error(path, format!("{text:?} is not a header name"));
            HeaderName::from_static("x-invalid")
        })
    }

    fn file(&mut self, path: &str, base: &Path, text: &str) -> Option<PathBuf> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let resolved = resolve_file(base, text);
        if !resolved.is_file() {
            self.error(path, format!("{}: no such file", resolved.display()));
        }
        Some(resolved)
    }

    /// The first line of a `*_file` secret, trimmed; an error when the file
    /// is missing, unreadable or empty.
    fn secret(&mut self, path: &str, base: &Path, text: &str) -> Option<String> {
        let file = self.file(path, base, text)?;
        match std::fs::read_to_string(&file) {
            Ok(text) => match text.lines().next().map(str::trim).filter(|l| !l.is_empty()) {
                Some(line) => Some(line.to_string()),
                None => {
                    self.error(path, format!("{}: empty", file.display()));
                    None
                }
            },
            Err(e) if file.is_file() => {
                self.error(path, format!("{}: {e}", file.display()));
                None
            }
            Err(_) => None,
        }
    }
}

/// A file a key names (`*_file`, certificates and keys): a relative path is
/// first looked up in `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`,
/// where the service finds root-only files copied for it), then next to the
/// configuration file. A credential named like the file it is loaded from
/// makes the service and a root shell's commands read the same file.
fn resolve_file(base: &Path, text: &str) -> PathBuf {
    let p = Path::new(text);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    if let Some(credentials) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
        let candidate = Path::new(&credentials).join(p);
        if candidate.is_file() {
            return candidate;
        }
    }
    base.join(p)
}

/// `url` with `password` as its password (percent-encoded), in place of any
/// the URL has: `scheme://[user[:password]@]rest`.
fn with_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (user, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (auth.split_once(':').map_or(auth, |(user, _)| user), hosts),
        None => ("", rest),
    };
    let mut encoded = String::with_capacity(password.len() * 3);
    for b in password.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{scheme}://{user}:{encoded}@{hosts}")
}

/// Relative paths in the config are relative to the config file's directory.
fn resolve(base: &Path, text: &str) -> PathBuf {
    let p = Path::new(text);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl RawConfig {
    pub(super) fn validate(self, source: &Path) -> Result<Config, ConfigErrors> {
        let base = source.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut c = Check::default();

        let policy_file = resolve(base, self.policy_file.trim());
        let state_directory = state_directory(&mut c, base, &self.state_directory);
        let policy = match std::fs::read_to_string(&policy_file) {
            Ok(text) => match Policy::from_toml(&text) {
                Ok(p) => Some(Arc::new(p)),
                Err(errors) => {
                    for e in errors {
                        c.error(format!("policy {}: {}", policy_file.display(), e.path), e.message);
                    }
                    None
                }
            },
            Err(e) => {
                c.error("policy_file", format!("cannot read {}: {e}", policy_file.display()));
                None
            }
        };

        let public_url = parse_public_url(&mut c, &self.public_url);

        let l = &self.listen;
        let listen = Listen {
            https: c.addr("listen.https", &l.https),
            http: c.addr("listen.http", &l.http),
            redirect_http: c.addr("listen.redirect_http", &l.redirect_http),
            admin: c.addr("listen.admin", &l.admin),
            shutdown_timeout: c.duration("listen.shutdown_timeout", &l.shutdown_timeout),
            header_read_timeout: c.positive_duration("listen.header_read_timeout", &l.header_read_timeout),
            workers: match l.workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            batch_scheduling: match l.worker_scheduling.as_str() {
                "batch" => true,
                "normal" => false,
                other => {
                    c.error("listen.worker_scheduling", format!("{other:?}: use batch or normal"));
                    false
                }
            },
        };
        if listen.https.is_none() && listen.http.is_none() {
            c.error("listen", "set listen.https or listen.http (or both)");
        }

        let t = &self.tls;
        let mut certificates = Vec::new();
        for (i, cert) in t.certificates.iter().enumerate() {
            let at = format!("tls.certificates[{i}]");
            if cert.domains.is_empty() {
                c.error(format!("{at}.domains"), "name at least one domain");
            }
            let (Some(cert_file), Some(key_file)) = (
                c.file(&format!("{at}.cert"), base, &cert.cert),
                c.file(&format!("{at}.key"), base, &cert.key),
            ) else {
                c.error(&at, "cert and key are both required");
                continue;
            };
            certificates.push(CertificateFiles {
                domains: cert.domains.iter().map(|d| d.trim().to_ascii_lowercase()).collect(),
                cert: cert_file,
                key: key_file,
            });
        }
        let tls = Tls {
            min_version: c.tls_version("tls.min_version", &t.min_version),
            max_version: c.tls_version("tls.max_version", &t.max_version),
            self_signed: t.self_signed,
            self_signed_dir: state_directory.clone(),
            session_ticket_lifetime: c.duration("tls.session_ticket_lifetime", &t.session_ticket_lifetime),
            key_log_file: Some(t.key_log_file.trim()).filter(|s| !s.is_empty()).map(|s| resolve(base, s)),
            handshake_timeout: c.positive_duration("tls.handshake_timeout", &t.handshake_timeout),
            hsts: hsts_header(c.duration("tls.hsts_max_age", &t.hsts_max_age)),
            certificates,
        };
        if tls.min_version > tls.max_version {
            c.error("tls.min_version", "is newer than tls.max_version");
        }
        if listen.https.is_some() && tls.certificates.is_empty() && !tls.self_signed {
            c.error("tls", "listen.https needs [[tls.certificates]] or self_signed = true");
        }

        let u = &self.upstream;
        let upstream_url = match u.url.trim().parse::<Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some()
                    && uri.query().is_none() =>
            {
                uri
            }
            _ => {
                c.error("upstream.url", format!("{:?} is not an http:// or https:// URL", u.url));
                Uri::from_static("http://127.0.0.1:8080")
            }
        };
        let upstream = Upstream {
            url: upstream_url,
            ca_file: c.file("upstream.ca_file", base, &u.ca_file),
            insecure_skip_verify: u.insecure_skip_verify,
            connect_timeout: c.positive_duration("upstream.connect_timeout", &u.connect_timeout),
            timeout: c.positive_duration("upstream.timeout", &u.timeout),
            pool_idle_timeout: c.duration("upstream.pool_idle_timeout", &u.pool_idle_timeout),
            pool_max_idle_per_host: u.pool_max_idle_per_host,
        };

        let max_header_bytes = parse_size(&self.limits.max_header_size.0).unwrap_or_else(|e| {
            c.error("limits.max_header_size", e);
            0
        });
        if !(4096..=1 << 24).contains(&max_header_bytes) {
            c.error("limits.max_header_size", "must be between 4KiB and 16MiB");
        }
        let limits = Limits {
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            max_request_body: parse_size(&self.limits.max_request_body.0).unwrap_or_else(|e| {
                c.error("limits.max_request_body", e);
                0
            }),
        };

        let mut store_url = self.store.url.trim().to_string();
        let known_store = [
            "embedded://",
            "redis://",
            "rediss://",
            "redis+cluster://",
            "rediss+cluster://",
            "redis+sentinel://",
            "rediss+sentinel://",
        ];
        // The URL may hold Redis's password: errors show it without.
        let shown = super::redact(&store_url);
        if !known_store.iter().any(|s| store_url.starts_with(s)) {
            c.error(
                "store.url",
                format!("{shown:?}: use embedded://PATH, redis://, rediss://, redis+cluster:// or redis+sentinel://"),
            );
        } else if store_url.starts_with("redis+sentinel://") || store_url.starts_with("rediss+sentinel://") {
            if let Err(e) = crate::store::check_sentinel_url(&store_url) {
                c.error("store.url", format!("{shown:?}: {e}"));
            }
        }
        let st = &self.store;
        if let Some(password) = c.secret("store.password_file", base, &st.password_file) {
            if store_url.starts_with("embedded://") {
                c.error("store.password_file", "is for Redis: the embedded store has no password");
            } else {
                store_url = with_password(&store_url, &password);
            }
        }
        let ca_file = c.file("store.ca_file", base, &st.ca_file);
        let cert = c.file("store.client_cert_file", base, &st.client_cert_file);
        let key = c.file("store.client_key_file", base, &st.client_key_file);
        let client_cert = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                c.error("store.client_key_file", "store.client_cert_file needs its key");
                None
            }
            (None, Some(_)) => {
                c.error("store.client_cert_file", "store.client_key_file needs its certificate");
                None
            }
        };
        let store_tls = RedisTls { ca_file, client_cert };
        if store_tls != RedisTls::default() && !store_url.starts_with("rediss") {
            let key = if store_tls.ca_file.is_some() { "store.ca_file" } else { "store.client_cert_file" };
            c.error(
                key,
                "is for a TLS Redis: use a rediss://, rediss+cluster:// or rediss+sentinel:// store.url",
            );
        }
        let sentinel = |value: &str| (!value.is_empty()).then(|| value.to_string());
        let (sentinel_username, mut sentinel_password) =
            (sentinel(&st.sentinel_username), sentinel(&st.sentinel_password));
        if let Some(password) = c.secret("store.sentinel_password_file", base, &st.sentinel_password_file) {
            if sentinel_password.is_some() {
                c.error("store.sentinel_password_file", "set store.sentinel_password or this, not both");
            }
            sentinel_password = Some(password);
        }
        if sentinel_username.is_some() && sentinel_password.is_none() {
            c.error("store.sentinel_password", "store.sentinel_username needs a password");
        }
        if (sentinel_username.is_some() || sentinel_password.is_some()) && !store_url.contains("+sentinel://")
        {
            let key = if sentinel_password.is_some() {
                "store.sentinel_password"
            } else {
                "store.sentinel_username"
            };
            c.error(key, "is for Redis Sentinel: use a redis+sentinel:// or rediss+sentinel:// store.url");
        }
        let redis = RedisOptions { tls: store_tls, sentinel_username, sentinel_password };
        let store = Store { url: store_url, key_prefix: st.key_prefix.clone(), redis };

        let session = Session {
            idle_timeout: c.positive_duration("session.idle_timeout", &self.session.idle_timeout),
            max_lifetime: c.positive_duration("session.max_lifetime", &self.session.max_lifetime),
            login_token_ttl: c.duration("session.login_token_ttl", &self.session.login_token_ttl),
        };
        let links = Links {
            ttl: c.positive_duration("links.ttl", &self.links.ttl),
            invite_ttl: c.positive_duration("links.invite_ttl", &self.links.invite_ttl),
        };
        let mut smtp_url = Some(self.email.smtp_url.trim()).filter(|s| !s.is_empty()).map(str::to_string);
        if let Some(password) = c.secret("email.smtp_password_file", base, &self.email.smtp_password_file) {
            match &mut smtp_url {
                Some(url) if url.split_once("://").is_some_and(|(_, rest)| rest.contains('@')) => {
                    *url = with_password(url, &password);
                }
                _ => c.error(
                    "email.smtp_password_file",
                    "needs an email.smtp_url with the user name, e.g. smtps://pbx@mail.example.com:465",
                ),
            }
        }
        if let Some(url) = &smtp_url {
            if !["smtp://", "smtps://"].iter().any(|s| url.starts_with(s)) {
                c.error("email.smtp_url", "use smtps://host:465, smtp://host:587?tls=required (STARTTLS) or smtp://host:25 (local relay)");
            } else if let Err(e) = crate::auth::mail::Mailer::check_url(url) {
                c.error("email.smtp_url", e);
            }
        }
        if self.email.from.parse::<lettre::message::Mailbox>().is_err() {
            c.error(
                "email.from",
                format!("{:?} is not an address like \"PBX <pbx@example.com>\"", self.email.from),
            );
        }
        let email = Email { smtp_url, from: self.email.from.clone() };

        let w = &self.webauthn;
        let user_verification = match w.user_verification.as_str() {
            "required" => UserVerification::Required,
            "preferred" => UserVerification::Preferred,
            "discouraged" => UserVerification::Discouraged,
            other => {
                c.error(
                    "webauthn.user_verification",
                    format!("{other:?}: use required, preferred or discouraged"),
                );
                UserVerification::Preferred
            }
        };
        let rp_id = match w.rp_id.trim() {
            "" => public_url.as_ref().map(|u| u.host.clone()).unwrap_or_default(),
            id => id.to_ascii_lowercase(),
        };
        let webauthn = Webauthn {
            rp_id,
            rp_name: w.rp_name.clone(),
            origins: w.origins.iter().map(|o| o.trim().trim_end_matches('/').to_string()).collect(),
            user_verification,
            max_passkeys_per_user: w.max_passkeys_per_user,
        };

        let strength = match self.passwords.strength.as_str() {
            "accept-all" => PasswordStrength::AcceptAll,
            "medium" => PasswordStrength::Medium,
            "high" => PasswordStrength::High,
            other => {
                c.error("passwords.strength", format!("{other:?}: use accept-all, medium or high"));
                PasswordStrength::Medium
            }
        };
        let passwords = Passwords {
            strength,
            allow_empty: self.passwords.allow_empty,
            users_may_set: self.passwords.users_may_set,
        };
        let history = History { retention: c.duration("history.retention", &self.history.retention) };

        let h = &self.headers;
        let assertion = Some(h.assertion.trim()).filter(|s| !s.is_empty());
        let headers = IdentityHeaders {
            user: c.header("headers.user", &h.user),
            email: c.header("headers.email", &h.email),
            groups: c.header("headers.groups", &h.groups),
            name: c.header("headers.name", &h.name),
            assertion: assertion.map(|a| c.header("headers.assertion", a)),
        };

        let format = match self.log.format.as_str() {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                c.error("log.format", format!("{other:?}: use pretty or json"));
                LogFormat::Pretty
            }
        };

        let b = &self.bootstrap;
        let mut bootstrap = Bootstrap::default();
        if let Some(file) = c.file("bootstrap.one_time_password_file", base, &b.one_time_password_file) {
            match std::fs::read_to_string(&file) {
                Ok(text) if !text.trim().is_empty() => {
                    bootstrap.one_time_password = Some(text.trim().to_string());
                    bootstrap.only_until_first_credential = true;
                }
                _ => c.error(
                    "bootstrap.one_time_password_file",
                    format!("{}: empty or unreadable", file.display()),
                ),
            }
            if b.admin.trim().is_empty() {
                c.error("bootstrap.admin", "name the admin the one-time password is for");
            }
        }
        if !b.admin.trim().is_empty() {
            bootstrap.admin = Some(b.admin.trim().to_string());
            let is_admin = policy
                .as_ref()
                .and_then(|p| p.user(b.admin.trim()))
                .is_some_and(|u| u.role == pbxgate_policies::Role::Admin);
            if policy.is_some() && !is_admin {
                c.error(
                    "bootstrap.admin",
                    format!("{:?} is not an admin in the policy file", b.admin.trim()),
                );
            }
        }

        let u = &self.ui;
        let logo = c.file("ui.logo", base, &u.logo);
        if let Some(logo) = &logo {
            if crate::ui::LogoKind::of(logo).is_none() {
                c.error("ui.logo", format!("{}: use an .svg or .png file", logo.display()));
            }
        }
        let accent_color = Some(u.accent_color.trim()).filter(|a| !a.is_empty()).map(str::to_ascii_lowercase);
        if let Some(accent) = accent_color.as_deref().filter(|a| !is_hex_colour(a)) {
            c.error("ui.accent_color", format!("{accent:?}: use a colour like \"#1f6feb\" or \"#36c\""));
        }
        let default_language = crate::ui::Lang::from_tag(&u.default_language).unwrap_or_else(|| {
            c.error("ui.default_language", format!("{:?}: use en, de, fr, es, it or nl", u.default_language));
            crate::ui::Lang::En
        });
        let templates_dir = Some(u.templates_dir.trim()).filter(|d| !d.is_empty()).map(|d| resolve(base, d));
        if let Some(dir) = templates_dir.as_ref().filter(|d| !d.is_dir()) {
            c.error("ui.templates_dir", format!("{}: no such directory", dir.display()));
        }
        let support = Some(u.support.trim()).filter(|s| !s.is_empty()).map(str::to_string);
        if support.as_ref().is_some_and(|s| s.chars().count() > 120 || s.chars().any(char::is_control)) {
            c.error("ui.support", "one line of at most 120 characters");
        }
        let product_name = match u.product_name.trim() {
            "" => self.webauthn.rp_name.clone(),
            name => name.to_string(),
        };
        let ui = UiSettings { product_name, logo, accent_color, support, default_language, templates_dir };

        match (policy, public_url, c.errors.is_empty()) {
            (Some(policy), Some(public_url), true) => Ok(Config {
                source: source.to_path_buf(),
                policy_file,
                state_directory,
                policy,
                public_url,
                listen,
                tls,
                upstream,
                limits,
                store,
                session,
                links,
                email,
                webauthn,
                passwords,
                history,
                headers,
                log: Log { format },
                bootstrap,
                ui,
            }),
            _ => Err(ConfigErrors(c.errors)),
        }
    }
}

/// `state_directory`, or the configuration file's directory. Under systemd
/// (`StateDirectory=`, which sets `$STATE_DIRECTORY`) the two must agree:
/// otherwise the service and a root shell's `pbxgate` commands would use
/// different stores.
fn state_directory(c: &mut Check, base: &Path, text: &str) -> PathBuf {
    let dir = match text.trim() {
        "" => base.to_path_buf(),
        text => resolve(base, text),
    };
    // systemd separates several state directories with ':'; the first is ours.
    let systemd = std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| v.to_str().and_then(|v| v.split(':').next()).map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty());
    if let Some(systemd) = systemd {
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        if !same(&dir, &systemd) {
            c.error(
                "state_directory",
                format!(
                    "is {} but systemd's StateDirectory= is {} ($STATE_DIRECTORY): set state_directory = {:?} \
                     so that the service and the pbxgate commands use the same store",
                    dir.display(),
                    systemd.display(),
                    systemd.display().to_string()
                ),
            );
        }
    }
    dir
}

fn parse_public_url(c: &mut Check, text: &str) -> Option<PublicUrl> {
    let bad = |c: &mut Check| {
        c.error("public_url", format!("{text:?} is not an origin like https://pbx.example.com"));
        None
    };
    let Ok(uri) = text.trim().trim_end_matches('/').parse::<Uri>() else {
        return bad(c);
    };
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return bad(c),
    };
    let (Some(host), None) = (uri.host(), uri.query()) else {
        return bad(c);
    };
    if uri.path() != "/" && !uri.path().is_empty() {
        return bad(c);
    }
    let host = host.to_ascii_lowercase();
    let port = uri.port_u16();
    let scheme = if https { "https" } else { "http" };
    let origin = match port {
        Some(p) if p != if https { 443 } else { 80 } => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    };
    Some(PublicUrl { https, host, port, origin })
}

/// `#rgb` or `#rrggbb`: nothing else reaches the stylesheet or an email.
fn is_hex_colour(text: &str) -> bool {
    text.strip_prefix('#')
        .is_some_and(|hex| matches!(hex.len(), 3 | 6) && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `Strict-Transport-Security` for `tls.hsts_max_age`; none for zero.
fn hsts_header(max_age: Duration) -> Option<HeaderValue> {
    let value = format!("max-age={}", max_age.as_secs());
    (!max_age.is_zero()).then(|| HeaderValue::try_from(value).ok()).flatten()
}
