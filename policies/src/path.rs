//! Path normalisation, done once per request so that the rule that decides and
//! the upstream that routes see the same path.

use std::borrow::Cow;

/// Why a request path is refused outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("path does not start with '/'")]
    NotAbsolute,
    #[error("path contains a fragment")]
    Fragment,
    #[error("path contains an encoded '/', '\\' or NUL")]
    EncodedSeparator,
    #[error("path contains a backslash")]
    Backslash,
    #[error("path contains a control character")]
    Control,
    #[error("path contains a malformed percent-encoding")]
    BadEncoding,
}

/// Normalises the path of a request target (without its query):
/// percent-decodes unreserved characters, upper-cases the remaining escapes,
/// resolves `.` and `..`, and collapses repeated slashes. A trailing slash is
/// kept. Encoded `/`, `\` and NUL, raw backslashes, control characters and
/// fragments are refused, because upstreams disagree on what they mean.
///
/// A path that is already normal (nearly every request's) is returned as is.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode_unreserved(raw)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// No escapes, nothing refused, no `.`/`..` segment and no empty segment
/// (but the last, a trailing slash): the normal form of itself.
fn is_normal(raw: &str) -> bool {
    // One pass: every request's path comes here.
    let bytes = raw.as_bytes();
    let tidy = |segment: &[u8], last: bool| !matches!(segment, b"." | b"..") && (last || !segment.is_empty());
    let mut start = 1;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b'#' | b'\\' | 0..=0x1f | 0x7f => return false,
            b'/' if i > 0 => {
                if !tidy(&bytes[start..i], false) {
                    return false;
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    tidy(bytes.get(start..).unwrap_or_default(), true)
}

/// The path as a lenient PBX may read it: servlet containers (Tomcat,
/// Jetty) drop `;` parameters from every segment (`/public/..;/admin/` is
/// `/admin/` to them); IIS and other Windows servers ignore case and trim
/// trailing dots and spaces from segments (`/ADMIN./` is `/admin/`). The
/// result is normalised again. `None` when `path` (normalised) reads the
/// same either way.
pub fn lenient_reading(path: &str) -> Option<String> {
    // Nearly every path has none of these: no copy for them.
    let lenient = path.bytes().any(|b| matches!(b, b';' | b'A'..=b'Z'))
        || path.contains("./")
        || path.ends_with('.')
        || path.contains("%20");
    if !lenient {
        return None;
    }
    let segments: Vec<String> = path
        .split('/')
        .map(|segment| {
            let segment = segment.split(';').next().unwrap_or_default();
            let mut segment = segment.to_ascii_lowercase();
            // Trailing dots and (encoded) spaces, in any mix, but not `.` and `..` themselves.
            while segment != "." && segment != ".." {
                if let Some(rest) = segment.strip_suffix("%20") {
                    segment = rest.to_string();
                } else if segment.len() > 1 && segment.ends_with('.') && !segment.ends_with("..") {
                    segment.pop();
                } else {
                    break;
                }
            }
            segment
        })
        .collect();
    let joined = segments.join("/");
    let read = normalize_path(&joined).map_or_else(|_| "/".to_string(), Cow::into_owned);
    (read != path).then_some(read)
}

fn decode_unreserved(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'#' => return Err(PathError::Fragment),
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::Control),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEncoding)?;
                let value = (hex_value(hex[0]).ok_or(PathError::BadEncoding)? << 4)
                    | hex_value(hex[1]).ok_or(PathError::BadEncoding)?;
                match value {
                    b'/' | b'\\' | 0 => return Err(PathError::EncodedSeparator),
                    v if is_unreserved(v) => out.push(char::from(v)),
                    v => {
                        out.push('%');
                        out.push(char::from(HEX[usize::from(v >> 4)]));
                        out.push(char::from(HEX[usize::from(v & 0xf)]));
                    }
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        // Copy the run of ordinary bytes up to the next special one (keeps UTF-8 intact).
        let start = i;
        while i < bytes.len() && !matches!(bytes[i], b'#' | b'\\' | b'%' | 0..=0x1f | 0x7f) {
            i += 1;
        }
        out.push_str(&raw[start..i]);
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}
