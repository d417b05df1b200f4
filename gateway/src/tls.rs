//! The TLS front door: rustls server configuration built once at start-up.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pbxgate_policies::Policy;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};

use crate::config::{Tls, TlsVersion};
use crate::error::Error;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Builds the server configuration: certificates per SNI name, the allowed
/// protocol versions, resumption, ALPN h2 + http/1.1 and the optional key log.
/// With `self_signed`, the certificate kept in the state directory (made,
/// or made again, when missing, near its end or for other domains).
pub fn server_config(tls: &Tls, policy: &Policy) -> Result<Arc<ServerConfig>, Error> {
    build(tls, policy, Keep::Write)
}

/// Checks what [`server_config`] would load, writing nothing (`check-config`
/// may run as another user than the service, whose files these are).
pub fn check(tls: &Tls, policy: &Policy) -> Result<(), Error> {
    build(tls, policy, Keep::ReadOnly).map(drop)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Write,
    ReadOnly,
}

fn build(tls: &Tls, policy: &Policy, keep: Keep) -> Result<Arc<ServerConfig>, Error> {
    let resolver = Arc::new(SniResolver::load(tls, policy, keep)?);
    let versions: Vec<&'static SupportedProtocolVersion> =
        [(TlsVersion::V1_2, &rustls::version::TLS12), (TlsVersion::V1_3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (tls.min_version..=tls.max_version).contains(v))
            .map(|(_, v)| v)
            .collect();
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions)
        .map_err(|e| Error::Tls(format!("protocol versions: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let lifetime = u32::try_from(tls.session_ticket_lifetime.as_secs()).unwrap_or(u32::MAX);
    if lifetime == 0 {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        let cache = ServerSessionMemoryCache::new(4096);
        config.session_storage = Arc::new(ExpiringSessions { inner: cache, lifetime });
        let inner = ring::Ticketer::new().map_err(|e| Error::Tls(format!("ticketer: {e}")))?;
        config.ticketer = Arc::new(LimitedTicketer { inner, lifetime });
    }
    if let Some(path) = &tls.key_log_file {
        tracing::warn!(path = %path.display(), "TLS key log is on: anyone with this file can decrypt the traffic");
        config.key_log = Arc::new(FileKeyLog::open(path)?);
    }
    Ok(Arc::new(config))
}

/// Picks the certificate for the SNI name: exact, then wildcard, then the default.
#[derive(Debug)]
struct SniResolver {
    by_name: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn load(tls: &Tls, policy: &Policy, keep: Keep) -> Result<Self, Error> {
        let mut by_name = Vec::new();
        let mut default = None;
        for files in &tls.certificates {
            let key = load_certified_key(&files.cert, &files.key)?;
            default.get_or_insert_with(|| key.clone());
            for domain in &files.domains {
                by_name.push((domain.clone(), key.clone()));
            }
        }
        if tls.self_signed {
            let key = self_signed(policy, &tls.self_signed_dir, keep)?;
            for domain in &policy.domains {
                let name = domain.name();
                if !by_name.iter().any(|(n, _)| *n == name) {
                    by_name.push((name, key.clone()));
                }
            }
            default.get_or_insert(key);
        }
        let default = default.ok_or_else(|| Error::Tls("no certificate configured".into()))?;
        Ok(Self { by_name, default })
    }

    fn find(&self, sni: &str) -> Option<&Arc<CertifiedKey>> {
        let exact = self.by_name.iter().find(|(n, _)| n.eq_ignore_ascii_case(sni));
        exact
            .or_else(|| {
                let parent = sni.split_once('.')?.1;
                self.by_name
                    .iter()
                    .find(|(n, _)| n.strip_prefix("*.").is_some_and(|p| p.eq_ignore_ascii_case(parent)))
            })
            .map(|(_, k)| k)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(hello.server_name().and_then(|sni| self.find(sni)).unwrap_or(&self.default).clone())
    }
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Tls(format!("{}: no certificate in file", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?;
    let signing =
        ring::sign::any_supported_type(&key).map_err(|e| Error::Tls(format!("private key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The self-signed certificate's files in the state directory.
pub const SELF_SIGNED_CERT: &str = "self-signed.crt";
pub const SELF_SIGNED_KEY: &str = "self-signed.key";
/// A self-signed certificate is made for about a year...
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// ...and made again once less than this is left of it.
const SELF_SIGNED_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// The names a self-signed certificate is for: the policy's domains in their
/// order (wildcards included), then `localhost` if they lack it.
fn self_signed_names(policy: &Policy) -> Vec<String> {
    let mut names: Vec<String> = policy.domains.iter().map(|d| d.name()).collect();
    if !names.iter().any(|n| n == "localhost") {
        names.push("localhost".into());
    }
    names
}

/// The certificate for the policy's domains kept in `dir`: reused while it
/// names the same domains and has more than [`SELF_SIGNED_RENEW_BEFORE`] left,
/// otherwise made anew (and, with [`Keep::Write`], kept). A certificate that
/// stays the same across restarts and reloads lets a browser's exception for
/// it stay valid.
fn self_signed(policy: &Policy, dir: &Path, keep: Keep) -> Result<Arc<CertifiedKey>, Error> {
    let names = self_signed_names(policy);
    let (cert_file, key_file) = (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY));
    // A key that is not the certificate's (a write cut short) makes a new pair.
    let kept = kept_certificate(&cert_file, &names).and_then(|()| {
        let key = load_certified_key(&cert_file, &key_file).map_err(|e| e.to_string())?;
        key.keys_match().map_err(|e| format!("{}: {e}", key_file.display()))?;
        Ok(key)
    });
    match kept {
        Ok(key) => {
            tracing::info!(file = %cert_file.display(), names = ?names, "serving the kept self-signed certificate: browsers warn about it");
            return Ok(key);
        }
        Err(why) if cert_file.exists() => {
            tracing::info!(file = %cert_file.display(), reason = %why, "making a new self-signed certificate")
        }
        Err(_) => {}
    }
    let (cert_pem, key_pem) = make_self_signed(&names, SELF_SIGNED_VALIDITY)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Tls(format!("self-signed key: {e}")))?;
    let signing =
        ring::sign::any_supported_type(&key).map_err(|e| Error::Tls(format!("self-signed key: {e}")))?;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| Error::Tls(format!("self-signed certificate: {e}")))?;
    if keep == Keep::Write {
        match write_self_signed(dir, &cert_pem, &key_pem) {
            Ok(()) => tracing::warn!(file = %cert_file.display(), names = ?names,
                "made a self-signed certificate, kept for a year: browsers warn about it; use the plain http listener on localhost for a first look"),
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, names = ?names,
                "made a self-signed certificate but cannot keep it: a new one at every start"),
        }
    }
    Ok(Arc::new(CertifiedKey::new(vec![cert], signing)))
}

/// Ok when `file` holds a certificate for exactly `names` (CN the first)
/// with more than [`SELF_SIGNED_RENEW_BEFORE`] of validity left.
fn kept_certificate(file: &Path, names: &[String]) -> Result<(), String> {
    let der = CertificateDer::from_pem_file(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| format!("unreadable: {e}"))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                sans.push((*dns).to_string());
            }
        }
    }
    let cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok());
    if sans != names || cn != names.first().map(String::as_str) {
        return Err(format!("it names {sans:?}, the policy {names:?}"));
    }
    let left = cert.validity().not_after.timestamp() - i64::try_from(unix_now()).unwrap_or(i64::MAX);
    if left < i64::try_from(SELF_SIGNED_RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX) {
        return Err(format!("{} days of validity left", left / 86_400));
    }
    Ok(())
}

/// A new key (ECDSA P-256) and a certificate for `names`, valid from an hour
/// ago (clocks differ) for `validity`: PEM, (certificate, key).
fn make_self_signed(names: &[String], validity: Duration) -> Result<(String, String), Error> {
    let fail = |e: rcgen::Error| Error::Tls(format!("self-signed certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(fail)?;
    let mut subject = rcgen::DistinguishedName::new();
    if let Some(first) = names.first() {
        subject.push(rcgen::DnType::CommonName, first.as_str());
    }
    params.distinguished_name = subject;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + validity;
    let cert = params.self_signed(&key).map_err(fail)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes the pair next to each other, the key readable by this user alone;
/// each file is replaced whole (a rename), never seen half written.
fn write_self_signed(dir: &Path, cert_pem: &str, key_pem: &str) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    for (name, text) in [(SELF_SIGNED_KEY, key_pem), (SELF_SIGNED_CERT, cert_pem)] {
        let part = dir.join(format!("{name}.part"));
        let _ = std::fs::remove_file(&part);
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&part)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&part, dir.join(name))?;
    }
    Ok(())
}

/// Wraps the ticketer so tickets say, and are held to, `session_ticket_lifetime`.
#[derive(Debug)]
struct LimitedTicketer {
    inner: Arc<dyn rustls::server::ProducesTickets>,
    lifetime: u32,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

impl rustls::server::ProducesTickets for LimitedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        // The issue time travels inside the encrypted ticket.
        self.inner.encrypt(&stamped(plain))
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        unstamped(&self.inner.decrypt(cipher)?, self.lifetime)
    }
}

/// `plain` after the time it is stored or sealed at.
fn stamped(plain: &[u8]) -> Vec<u8> {
    let mut stamped = Vec::with_capacity(plain.len() + 8);
    stamped.extend_from_slice(&unix_now().to_be_bytes());
    stamped.extend_from_slice(plain);
    stamped
}

/// What [`stamped`] made, unless it is older than `lifetime` seconds.
fn unstamped(stamped: &[u8], lifetime: u32) -> Option<Vec<u8>> {
    let (issued, plain) = stamped.split_at_checked(8)?;
    let issued = u64::from_be_bytes(issued.try_into().ok()?);
    (unix_now().saturating_sub(issued) <= u64::from(lifetime)).then(|| plain.to_vec())
}

/// TLS 1.2 sessions resumed by id, held to `session_ticket_lifetime` as
/// tickets are: rustls's cache forgets a session only to make room.
#[derive(Debug)]
struct ExpiringSessions {
    inner: Arc<ServerSessionMemoryCache>,
    lifetime: u32,
}

impl StoresServerSessions for ExpiringSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, stamped(&value))
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        unstamped(&self.inner.get(key)?, self.lifetime)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        unstamped(&self.inner.take(key)?, self.lifetime)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// NSS key log format (`SSLKEYLOGFILE`), for Wireshark, to a configured file.
#[derive(Debug)]
struct FileKeyLog {
    file: Mutex<File>,
}

impl FileKeyLog {
    fn open(path: &Path) -> Result<Self, Error> {
        // Anyone who can read it can decrypt the traffic.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::Tls(format!("key_log_file {}: {e}", path.display())))?;
        Ok(Self { file: Mutex::new(file) })
    }
}

impl rustls::KeyLog for FileKeyLog {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let mut line = String::with_capacity(label.len() + 2 + 2 * (client_random.len() + secret.len()));
        line.push_str(label);
        line.push(' ');
        hex(&mut line, client_random);
        line.push(' ');
        hex(&mut line, secret);
        line.push('\n');
        if let Ok(mut file) = self.file.lock() {
            // Best effort: a failing debug aid must not break handshakes.
            let _ = file.write_all(line.as_bytes());
        }
    }
}

fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_kept_certificate_is_reused_only_for_the_same_names_and_before_its_last_month() {
        let dir = std::env::temp_dir().join(format!("pbxgate-tls-unit-{}", std::process::id()));
        let wanted = names(&["pbx.test", "*.pbx.test", "localhost"]);
        let (cert, key) = make_self_signed(&wanted, SELF_SIGNED_VALIDITY).unwrap();
        write_self_signed(&dir, &cert, &key).unwrap();
        let file = dir.join(SELF_SIGNED_CERT);
        assert_eq!(kept_certificate(&file, &wanted), Ok(()));
        assert!(kept_certificate(&file, &names(&["pbx.test", "localhost"])).is_err(), "other names");
        assert!(
            kept_certificate(&file, &names(&["*.pbx.test", "pbx.test", "localhost"])).is_err(),
            "other CN"
        );

        // Within the last 30 days: made again.
        let (cert, key) = make_self_signed(&wanted, Duration::from_secs(29 * 86_400)).unwrap();
        write_self_signed(&dir, &cert, &key).unwrap();
        let why = kept_certificate(&file, &wanted).unwrap_err();
        assert!(why.contains("days of validity left"), "{why}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
