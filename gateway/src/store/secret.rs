//! Secrets handed to browsers and mailboxes: 256 random bits, hex. The store
//! only ever sees their SHA-256, so a dump of it holds no live credential.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};

/// A secret in clear, as it goes into a cookie or a link. Never logged:
/// `Debug` shows only its short id.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// The SHA-256 of a secret: what the store keys on (in hex). Kept as bytes,
/// so looking a session up costs no allocation.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretHash([u8; 32]);

impl std::hash::Hash for SecretHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.prefix());
    }
}

impl Secret {
    pub fn generate() -> Self {
        Self(hex(&random::<32>()))
    }

    /// A secret as received from a client. Anything that is not 64 hex digits
    /// cannot be one of ours and is refused before any lookup.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim_ascii();
        (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(text.to_ascii_lowercase()))
    }

    /// A secret derived from text a person chose (a one-time admin password),
    /// so it can be stored and taken like the random ones.
    pub fn derive(text: &str) -> Self {
        Self(hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(self.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.hash().short_id())
    }
}

impl SecretHash {
    /// The hash of a secret as a client sent it ([`Secret::parse`], then
    /// [`Secret::hash`]) without a copy of the secret.
    pub fn of_sent(text: &[u8]) -> Option<Self> {
        let text = text.trim_ascii();
        let mut lower = [0u8; 64];
        if text.len() != lower.len() {
            return None;
        }
        let mut hex = true;
        for (l, &b) in lower.iter_mut().zip(text) {
            hex &= b.is_ascii_hexdigit();
            // Digits have this bit already; it makes A-F a-f.
            *l = b | 0x20;
        }
        hex.then(|| Self::of(&lower))
    }

    fn of(secret: &[u8]) -> Self {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, secret).as_ref());
        Self(hash)
    }

    /// A hash as the store writes it: 64 hex digits, either case.
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return None;
        }
        let mut hash = [0u8; 32];
        for (byte, pair) in hash.iter_mut().zip(text.chunks_exact(2)) {
            *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(Self(hash))
    }

    /// Lower-case hex, as the store keys on it.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 8 hex digits: enough to tell secrets apart in logs, useless to an attacker.
    pub fn short_id(&self) -> String {
        hex(&self.0[..4])
    }

    /// The hash's first eight bytes: already uniformly spread, so maps key
    /// on them without hashing again.
    fn prefix(&self) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(word)
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({}…)", self.short_id())
    }
}

impl fmt::Display for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

pub fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The system RNG failing is not something to limp on from.
    #[allow(clippy::expect_used)]
    SystemRandom::new().fill(&mut bytes).expect("system random number generator");
    bytes
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut digits = vec![0; bytes.len() * 2];
    for (pair, b) in digits.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
    String::from_utf8(digits).unwrap_or_default()
}

/// A random (version 4) UUID, for WebAuthn user handles.
pub fn uuid_v4() -> String {
    let mut b = random::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests {
    use super::{Secret, SecretHash};

    #[test]
    fn a_sent_secret_hashes_as_the_parsed_one() {
        let secret = Secret::generate();
        let upper = secret.expose().to_ascii_uppercase();
        for sent in [secret.expose().to_string(), upper, format!(" {} ", secret.expose())] {
            assert_eq!(SecretHash::of_sent(sent.as_bytes()), Some(secret.hash()), "{sent}");
        }
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(65), &"é".repeat(32)] {
            assert_eq!(SecretHash::of_sent(bad.as_bytes()), None, "{bad}");
            assert!(Secret::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_hash_is_written_and_read_as_hex() {
        let hash = Secret::generate().hash();
        let hex = hash.hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{hex}");
        assert_eq!(hash.to_string(), hex);
        assert_eq!(hash.short_id(), hex[..8]);
        assert_eq!(SecretHash::from_hex(&hex), Some(hash));
        assert_eq!(SecretHash::from_hex(&hex.to_ascii_uppercase()), Some(hash));
        for bad in [&hex[1..], &format!("{hex}0"), &format!("g{}", &hex[1..]), &format!("é{}", &hex[2..])] {
            assert_eq!(SecretHash::from_hex(bad), None, "{bad}");
        }
    }
}
