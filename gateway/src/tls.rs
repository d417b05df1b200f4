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
pub fn server_config(tls: &Tls, policy: &Policy) -> Result<Arc<ServerConfig>, Error> {
    let resolver = Arc::new(SniResolver::load(tls, policy)?);
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
    fn load(tls: &Tls, policy: &Policy) -> Result<Self, Error> {
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
            let key = self_signed(policy)?;
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

/// A certificate for the policy's domains (and localhost), made at start-up.
fn self_signed(policy: &Policy) -> Result<Arc<CertifiedKey>, Error> {
    let mut names: Vec<String> = policy.domains.iter().map(|d| d.name()).collect();
    if !names.iter().any(|n| n == "localhost") {
        names.push("localhost".into());
    }
    let certified = rcgen::generate_simple_self_signed(names.clone())
        .map_err(|e| Error::Tls(format!("self-signed certificate: {e}")))?;
    let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der())
        .map_err(|e| Error::Tls(format!("self-signed key: {e}")))?;
    let signing =
        ring::sign::any_supported_type(&key).map_err(|e| Error::Tls(format!("self-signed key: {e}")))?;
    tracing::warn!(names = ?names, "serving a self-signed certificate: browsers will warn; use the plain http listener on localhost for a first look");
    Ok(Arc::new(CertifiedKey::new(vec![certified.cert.der().clone()], signing)))
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
