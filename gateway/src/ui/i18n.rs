//! Languages: the message catalogues (one key file per language, embedded),
//! the choice of a person's language, and dates and durations in it.
//!
//! A catalogue line is `key = text`; `{name}` in a text is a placeholder;
//! `#` starts a comment line. Every language has every key (a test checks),
//! so a lookup only falls back to English, then to the key, when a file an
//! operator edited lost one.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use http::HeaderMap;

/// The languages the pages and emails are written in. All are written
/// left to right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Lang {
    En,
    De,
    Fr,
    Es,
    It,
    Nl,
}

impl Lang {
    pub const ALL: [Lang; 6] = [Lang::En, Lang::De, Lang::Fr, Lang::Es, Lang::It, Lang::Nl];

    pub fn code(self) -> &'static str {
        match self {
            Self::En => "en",
            Self::De => "de",
            Self::Fr => "fr",
            Self::Es => "es",
            Self::It => "it",
            Self::Nl => "nl",
        }
    }

    /// The language's own name, as the picker shows it.
    pub fn native_name(self) -> &'static str {
        match self {
            Self::En => "English",
            Self::De => "Deutsch",
            Self::Fr => "Français",
            Self::Es => "Español",
            Self::It => "Italiano",
            Self::Nl => "Nederlands",
        }
    }

    pub fn dir(self) -> &'static str {
        "ltr"
    }

    /// The language of a tag such as `de`, `de-CH` or `fr_FR` (its primary
    /// subtag), when it is one of ours.
    pub fn from_tag(tag: &str) -> Option<Self> {
        let primary = tag.trim().split(['-', '_']).next().unwrap_or_default();
        Self::ALL.into_iter().find(|l| primary.eq_ignore_ascii_case(l.code()))
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The cookie that remembers the language picked on the sign-in page.
pub const LANG_COOKIE: &str = "__Host-pbxgate-lang";

/// The language for a request from someone not (yet) known: the one picked
/// on the sign-in page, else the best of `Accept-Language`, else `default`.
pub fn negotiate(headers: &HeaderMap, default: Lang) -> Lang {
    picked(headers).or_else(|| accepted(headers)).unwrap_or(default)
}

/// The language in the picker's cookie.
fn picked(headers: &HeaderMap) -> Option<Lang> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == LANG_COOKIE).then(|| Lang::from_tag(value)).flatten()
        })
}

/// The most wanted of our languages in `Accept-Language` (q-values
/// respected; the first listed wins a tie; `q=0` means not wanted).
pub fn accepted(headers: &HeaderMap) -> Option<Lang> {
    let mut best: Option<(Lang, u16)> = None;
    for value in headers.get_all(http::header::ACCEPT_LANGUAGE).iter().filter_map(|v| v.to_str().ok()) {
        for item in value.split(',').take(32) {
            let mut parts = item.split(';');
            let Some(lang) = parts.next().and_then(Lang::from_tag) else { continue };
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .map_or(1000, quality);
            if q > 0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((lang, q));
            }
        }
    }
    best.map(|(lang, _)| lang)
}

/// A q-value in thousandths; anything unreadable counts as 0.
fn quality(text: &str) -> u16 {
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let whole: u16 = match whole {
        "1" => 1,
        "0" => 0,
        _ => return 0,
    };
    let mut thousandths = 0u16;
    for (i, digit) in fraction.bytes().take(3).enumerate() {
        if !digit.is_ascii_digit() {
            return 0;
        }
        thousandths += u16::from(digit - b'0') * [100, 10, 1][i];
    }
    (whole * 1000 + thousandths).min(1000)
}

/// One catalogue per language.
pub struct Messages {
    catalogues: Vec<HashMap<String, String>>,
}

const BUILT_IN: [&str; 6] = [
    include_str!("../../locales/en.txt"),
    include_str!("../../locales/de.txt"),
    include_str!("../../locales/fr.txt"),
    include_str!("../../locales/es.txt"),
    include_str!("../../locales/it.txt"),
    include_str!("../../locales/nl.txt"),
];

static BUILT_IN_MESSAGES: LazyLock<Messages> =
    LazyLock::new(|| Messages { catalogues: BUILT_IN.iter().map(|text| parse(text).0).collect() });

/// The catalogues built into the binary.
pub fn messages() -> &'static Messages {
    &BUILT_IN_MESSAGES
}

#[cfg(test)]
pub(crate) fn tests_built_in() -> [&'static str; 6] {
    BUILT_IN
}

/// A catalogue's entries, and the lines that are not `key = text`.
pub fn parse(text: &str) -> (HashMap<String, String>, Vec<usize>) {
    let mut entries = HashMap::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                entries.insert(key.trim().to_string(), value.trim().to_string());
            }
            _ => bad.push(n + 1),
        }
    }
    (entries, bad)
}

impl Messages {
    /// The raw text of `key` (placeholders left in).
    pub fn raw(&self, lang: Lang, key: &str) -> Option<&str> {
        self.catalogues.get(lang.index()).and_then(|c| c.get(key)).map(String::as_str)
    }

    /// `key` in `lang` with its placeholders filled in.
    pub fn text(&self, lang: Lang, key: &str, args: &[(&str, &str)]) -> String {
        let raw = self.raw(lang, key).or_else(|| self.raw(Lang::En, key)).unwrap_or(key);
        fill(raw, args)
    }

    pub fn keys(&self, lang: Lang) -> impl Iterator<Item = &str> {
        self.catalogues.get(lang.index()).into_iter().flat_map(|c| c.keys().map(String::as_str))
    }
}

/// Replaces every `{name}` whose name is in `args`; others stay as written.
pub fn fill(raw: &str, args: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(raw.len() + 16);
    let mut rest = raw;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}').map(|close| (&after[..close], close)) {
            Some((name, close)) if args.iter().any(|(n, _)| *n == name) => {
                let value = args.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| v);
                out.push_str(value);
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The placeholders a text uses, sorted.
pub fn placeholders(raw: &str) -> Vec<&str> {
    let mut names: Vec<&str> = raw
        .split('{')
        .skip(1)
        .filter_map(|part| part.split_once('}').map(|(name, _)| name))
        .filter(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// "15 minutes", "72 hours", "30 days": minutes under two hours, hours
/// under a week, then days (rounded up: a link never lives shorter than it says).
pub fn duration(lang: Lang, d: Duration) -> String {
    let minutes = d.as_secs().div_ceil(60).max(1);
    let (n, unit) = if minutes < 120 {
        (minutes, "minute")
    } else if minutes < 7 * 24 * 60 {
        (minutes.div_ceil(60), "hour")
    } else {
        (minutes.div_ceil(24 * 60), "day")
    };
    let key = format!("duration.{unit}.{}", if n == 1 { "one" } else { "other" });
    messages().text(lang, &key, &[("n", &n.to_string())])
}

/// A moment for people: "21 November 2026, 10:05 UTC" in `lang`; `None` is
/// "never".
pub fn when(lang: Lang, ms: Option<u64>) -> String {
    let Some(ms) = ms else { return messages().text(lang, "common.never", &[]) };
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let month = messages().text(lang, &format!("month.{m}"), &[]);
    let time = format!("{:02}:{:02}", rem / 3600, (rem % 3600) / 60);
    messages().text(
        lang,
        "date.format",
        &[("day", &d.to_string()), ("month", &month), ("year", &y.to_string()), ("time", &time)],
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
