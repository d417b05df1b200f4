use std::time::Duration;

use http::HeaderMap;

use super::i18n::{self, Lang};
use super::{samples, Brand, Ui};

fn ui() -> Ui {
    let brand = Brand {
        product: "Acme PBX".into(),
        logo: None,
        logo_url: None,
        accent: super::DEFAULT_ACCENT.into(),
        support: Some("+49 30 1234567".into()),
    };
    match Ui::new(brand, Lang::En, None) {
        Ok(ui) => ui,
        Err(e) => panic!("built-in templates: {e}"),
    }
}

#[test]
fn every_key_is_in_every_language_with_the_same_placeholders() {
    let messages = i18n::messages();
    let english: Vec<&str> = messages.keys(Lang::En).collect();
    assert!(english.len() > 150, "the English catalogue is read: {}", english.len());
    for lang in Lang::ALL {
        for key in &english {
            let Some(text) = messages.raw(lang, key) else { panic!("{}: {key} is missing", lang.code()) };
            assert!(!text.is_empty(), "{}: {key} is empty", lang.code());
            let want = i18n::placeholders(messages.raw(Lang::En, key).unwrap_or_default());
            assert_eq!(i18n::placeholders(text), want, "{}: {key} placeholders", lang.code());
        }
        for key in messages.keys(lang) {
            assert!(english.contains(&key), "{}: {key} is not an English key", lang.code());
        }
    }
}

#[test]
fn the_catalogue_files_have_only_key_lines() {
    for (lang, text) in Lang::ALL.iter().zip(super::i18n::tests_built_in()) {
        let (_, bad) = i18n::parse(text);
        assert!(bad.is_empty(), "{}: lines {bad:?} are not `key = text`", lang.code());
    }
}

#[test]
fn every_page_and_email_renders_in_every_language_without_raw_keys() {
    let ui = ui();
    let key_like = regex_free_key_finder();
    for lang in Lang::ALL {
        for (name, page, view) in samples::all() {
            let out = match ui.render(lang, name, page, "T", &view) {
                Ok(out) => out,
                Err(e) => panic!("{name} in {}: {e:#}", lang.code()),
            };
            for key in &key_like {
                assert!(!out.contains(key.as_str()), "{name} in {} shows the key {key}", lang.code());
            }
            if name.ends_with(".html") && name != "email-link.html" {
                assert!(
                    out.contains(&format!("<html lang=\"{}\" dir=\"ltr\">", lang.code())),
                    "{name}: lang"
                );
            }
        }
    }
}

/// Every catalogue key, as it would show if a lookup fell through.
fn regex_free_key_finder() -> Vec<String> {
    i18n::messages().keys(Lang::En).filter(|k| k.contains('.')).map(str::to_string).collect()
}

#[test]
fn german_pages_are_german() {
    let ui = ui();
    let (_, _, view) = samples::all().remove(0);
    let out = ui.render(Lang::De, "login.html", "login", "Anmelden", &view).unwrap_or_default();
    assert!(out.contains("Anmeldelink per E-Mail senden"), "{out}");
    assert!(!out.contains("Email me a sign-in link"), "{out}");
    assert!(out.contains("Brauchen Sie Hilfe? +49 30 1234567"), "the support line: {out}");
}

#[test]
fn markup_in_values_is_inert() {
    let ui = ui();
    let evil = "<script>alert(1)</script>\"'><img src=x onerror=alert(1)>";
    let view = serde_json::json!({"user": evil, "notice": null,
        "passkeys": [{"id": evil, "name": evil, "created": evil, "used": evil}],
        "sessions": [{"current": false, "created": evil, "seen": evil, "ip": evil}]});
    let out = ui.render(Lang::En, "account.html", "account", evil, &view).unwrap_or_default();
    assert!(!out.contains("<script>alert") && !out.contains("<img src=x"), "{out}");
    assert!(out.contains("&lt;script&gt;"), "{out}");
    // The text email is not HTML: nothing to escape, and nothing rendered.
    let html = ui
        .render(
            Lang::En,
            "email-link.html",
            "",
            "s",
            &serde_json::json!({"subject": evil, "intro": "i", "user": evil,
            "valid_for": "v", "link": "https://pbx.example.com/.pbxgate/link?token=1&x=\"><b>"}),
        )
        .unwrap_or_default();
    assert!(!html.contains("<script>alert") && !html.contains("\"><b>"), "{html}");
}

#[test]
fn accept_language_is_weighed() {
    let pick = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::ACCEPT_LANGUAGE,
            http::HeaderValue::from_str(value).unwrap_or_else(|_| http::HeaderValue::from_static("")),
        );
        i18n::negotiate(&headers, Lang::En)
    };
    assert_eq!(pick("de-CH"), Lang::De);
    assert_eq!(pick("ja, fr;q=0.8, de;q=0.9"), Lang::De);
    assert_eq!(pick("nl;q=0, it;q=0.1"), Lang::It);
    assert_eq!(pick("es-419,es;q=0.9,en;q=0.8"), Lang::Es);
    assert_eq!(pick("ja, zh"), Lang::En, "none of ours: the default");
    assert_eq!(pick("fr;q=garbage, nl"), Lang::Nl);
    let mut headers = HeaderMap::new();
    headers.insert(http::header::ACCEPT_LANGUAGE, http::HeaderValue::from_static("de"));
    headers.insert(http::header::COOKIE, http::HeaderValue::from_static("a=b; __Host-pbxgate-lang=it"));
    assert_eq!(i18n::negotiate(&headers, Lang::En), Lang::It, "the picked language wins");
    assert_eq!(i18n::negotiate(&HeaderMap::new(), Lang::Fr), Lang::Fr);
}

#[test]
fn durations_and_dates_are_in_the_language() {
    assert_eq!(i18n::duration(Lang::En, Duration::from_secs(15 * 60)), "15 minutes");
    assert_eq!(i18n::duration(Lang::De, Duration::from_secs(15 * 60)), "15 Minuten");
    assert_eq!(i18n::duration(Lang::En, Duration::from_secs(60)), "1 minute");
    assert_eq!(i18n::duration(Lang::En, Duration::from_secs(72 * 3600)), "72 hours");
    assert_eq!(i18n::duration(Lang::Fr, Duration::from_secs(30 * 86_400)), "30 jours");
    assert_eq!(i18n::duration(Lang::Nl, Duration::from_secs(3600)), "60 minuten");
    assert_eq!(i18n::when(Lang::En, Some(0)), "1 January 1970, 00:00 UTC");
    assert_eq!(i18n::when(Lang::De, Some(1_795_000_000_000)), "18. November 2026, 11:06 UTC");
    assert_eq!(i18n::when(Lang::Es, Some(1_795_000_000_000)), "18 de noviembre de 2026, 11:06 UTC");
    assert_eq!(i18n::when(Lang::It, None), "mai");
}

#[test]
fn an_operator_template_replaces_the_built_in_one_and_a_broken_one_is_refused() {
    let dir = std::env::temp_dir().join(format!("pbxgate-templates-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let brand = ui().brand.clone();
    let _ = std::fs::write(
        dir.join("link-failed.html"),
        "{% extends \"base.html\" %}{% block content %}<p>Call {{ brand.support }}</p>{% endblock %}",
    );
    let custom = Ui::new(brand.clone(), Lang::En, Some(&dir)).map_err(|e| e.to_string());
    let out = custom.and_then(|ui| {
        ui.render(Lang::En, "link-failed.html", "link-failed", "T", &serde_json::json!({}))
            .map_err(|e| e.to_string())
    });
    assert!(out.as_deref().is_ok_and(|o| o.contains("<p>Call +49 30 1234567</p>")), "{out:?}");
    let _ = std::fs::write(dir.join("link-failed.html"), "{% if %}");
    assert!(Ui::new(brand.clone(), Lang::En, Some(&dir)).is_err(), "a syntax error stops start-up");
    let _ = std::fs::write(dir.join("link-failed.html"), "{{ no_such_value }}");
    assert!(Ui::new(brand, Lang::En, Some(&dir)).is_err(), "an unknown value stops start-up");
    let _ = std::fs::remove_dir_all(&dir);
}
