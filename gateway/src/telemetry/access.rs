//! The access line, one per request, formatted by hand. The generic event
//! formatter (field visitors, `fmt` machinery, a timestamp formatted from
//! scratch, a `String` per line) cost about as much as all of the gateway's
//! own work on a proxied request; this writes the same fields straight into
//! the worker's buffer.

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One request, as logged on target `pbxgate::access`.
pub(crate) struct AccessLine<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// 0 for a dropped connection.
    pub status: u16,
    /// Until the upstream's response head; `None` when nothing went upstream.
    pub upstream: Option<Duration>,
    pub decision: &'a str,
    pub rule: &'a str,
    pub user: &'a str,
    pub client: IpAddr,
}

static JSON: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The current second, formatted ("2026-11-21T17:52:59."): made once a second.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

pub(super) fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Logs the line unless `RUST_LOG` turns `pbxgate::access` off.
pub(crate) fn log(line: &AccessLine<'_>) {
    if tracing::enabled!(target: "pbxgate::access", tracing::Level::INFO) {
        super::write_access(|buffer| format(line, JSON.load(Ordering::Relaxed), buffer));
    }
}

fn format(l: &AccessLine<'_>, json: bool, out: &mut Vec<u8>) {
    // One reservation for the whole line: the fixed part is under 200 bytes.
    out.reserve(200 + l.host.len() + l.path.len() + l.rule.len() + l.user.len());
    if json {
        // As the JSON formatter writes events (flattened).
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out);
        out.extend_from_slice(b"\",\"level\":\"INFO\"");
    } else {
        // As the compact formatter writes events, without colours.
        timestamp(out);
        out.extend_from_slice(b"  INFO pbxgate::access:");
    }
    let mut line = Fields { out, json };
    line.word("method", l.method);
    line.text("host", l.host);
    line.text("path", l.path);
    line.key("status");
    number(l.status.into(), line.out);
    line.key("upstream_ms");
    upstream_ms(l.upstream, line.out);
    line.text("decision", l.decision);
    // Rule names hold spaces (`route[0] user /`): quoted, so logfmt splits right.
    line.text("rule", l.rule);
    line.text("user", l.user);
    // An address needs no escaping, but JSON wants it as a string.
    line.key("client");
    if json {
        line.out.push(b'"');
    }
    ip(l.client, line.out);
    line.out.extend_from_slice(if json { b"\",\"target\":\"pbxgate::access\"}\n" } else { b"\n" });
}

/// Writes `name=value` (pretty) or `,"name":value` (JSON).
struct Fields<'o> {
    out: &'o mut Vec<u8>,
    json: bool,
}

impl Fields<'_> {
    // Inlined, so each name is a constant and its copy a few stores.
    #[inline(always)]
    fn key(&mut self, name: &str) {
        if self.json {
            self.out.extend_from_slice(b",\"");
            self.out.extend_from_slice(name.as_bytes());
            self.out.extend_from_slice(b"\":");
        } else {
            self.out.push(b' ');
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b'=');
        }
    }

    /// Quoted in both formats.
    #[inline(always)]
    fn text(&mut self, name: &str, value: &str) {
        self.key(name);
        quoted(value, self.out);
    }

    /// Quoted in JSON only (as the pretty formatter writes `Display` fields).
    #[inline(always)]
    fn word(&mut self, name: &str, value: &str) {
        self.key(name);
        if self.json {
            quoted(value, self.out);
        } else {
            self.out.extend_from_slice(value.as_bytes());
        }
    }
}

fn number(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` (below 10^width) with leading zeros.
fn zero_padded(n: u32, width: usize, out: &mut Vec<u8>) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(n);
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(digits.len())));
    out.extend_from_slice(digits.as_bytes());
}

/// Milliseconds with microsecond precision; -1 when nothing went upstream.
fn upstream_ms(upstream: Option<Duration>, out: &mut Vec<u8>) {
    match upstream {
        Some(d) => {
            let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            number(micros / 1000, out);
            out.push(b'.');
            zero_padded((micros % 1000) as u32, 3, out);
        }
        None => out.extend_from_slice(b"-1"),
    }
}

fn ip(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(octet.into(), out);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// RFC 3339 in UTC with microseconds, as the other log lines have it.
fn timestamp(out: &mut Vec<u8>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != now.as_secs() || second.1.is_empty() {
            *second = (now.as_secs(), format_second(now.as_secs()));
        }
        out.extend_from_slice(second.1.as_bytes());
    });
    zero_padded(now.subsec_micros(), 6, out);
    out.push(b'Z');
}

fn format_second(secs: u64) -> String {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Bytes [`quoted`] escapes: one lookup per byte on the common path.
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// A JSON string (also how the pretty lines quote), with the escapes JSON
/// requires (RFC 8259 section 7): quote, backslash, control characters.
fn quoted(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    if !bytes.iter().any(|&b| ESCAPED[usize::from(b)]) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !ESCAPED[usize::from(b)] {
            continue;
        }
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"\\u00",
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        out.extend_from_slice(escape);
        if escape == b"\\u00" {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(upstream: Option<Duration>, path: &str) -> AccessLine<'_> {
        AccessLine {
            method: "GET",
            host: "pbx.example.com",
            path,
            status: 200,
            upstream,
            decision: "allow",
            rule: "route[0] user /",
            user: "bob",
            client: "192.0.2.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        }
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let mut out = Vec::new();
        let tricky = "/a\"b\\c\u{1}d\ne/é";
        format(&line(Some(Duration::from_micros(3_626)), tricky), true, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["path"], tricky);
        assert_eq!(v["upstream_ms"], 3.626);
        assert_eq!(v["status"], 200);
        assert_eq!(v["rule"], "route[0] user /");
        assert_eq!(v["client"], "192.0.2.7");
        assert_eq!(v["target"], "pbxgate::access");
        assert_eq!(v["level"], "INFO");
        let ts = v["timestamp"].as_str().unwrap_or_default();
        assert_rfc3339_micros(ts);

        out.clear();
        format(&line(None, "/"), true, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["upstream_ms"], -1);
    }

    #[test]
    fn pretty_lines_look_like_the_other_log_lines() {
        let mut out = Vec::new();
        format(&line(Some(Duration::from_micros(328)), "/x"), false, &mut out);
        let text = String::from_utf8(out).unwrap_or_default();
        let (ts, rest) = text.split_once("  INFO ").unwrap_or_default();
        assert_rfc3339_micros(ts);
        assert_eq!(
            rest,
            "pbxgate::access: method=GET host=\"pbx.example.com\" path=\"/x\" status=200 upstream_ms=0.328 \
             decision=\"allow\" rule=\"route[0] user /\" user=\"bob\" client=192.0.2.7\n"
        );
    }

    /// `2026-11-21T17:52:59.140852Z`
    fn assert_rfc3339_micros(ts: &str) {
        let shape = ts.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'.',
            26 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
        assert!(shape && ts.len() == 27, "{ts:?}");
    }

    #[test]
    fn the_date_is_the_calendar_date() {
        assert_eq!(format_second(0), "1970-01-01T00:00:00.");
        assert_eq!(format_second(1_795_283_579), "2026-11-21T17:52:59.");
    }
}
