// figment::Jail closures return figment::Error, which is large by its design.
#![allow(clippy::result_large_err)]

use std::path::Path;
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::{Figment, Jail};

use super::*;

const POLICY: &str = "domains = [\"localhost\"]\n[[route]]\npath = \"/\"\naccess = \"user\"\n";

fn load(jail: &Jail) -> Result<Config, ConfigErrors> {
    let path = jail.directory().join("gateway.toml");
    Config::from_figment(&path, Figment::new().merge(Toml::file_exact(&path)).merge(env_provider()))
}

fn paths(errors: &ConfigErrors) -> Vec<String> {
    errors.0.iter().map(|e| e.path.clone()).collect()
}

#[test]
fn minimal_file_gets_the_vodia_defaults() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", POLICY)?;
        jail.create_file("gateway.toml", "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n")?;
        let c = load(jail).map_err(|e| e.to_string())?;
        assert_eq!(c.session.idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.session.login_token_ttl, Duration::from_secs(30 * 86_400));
        assert_eq!(c.links.ttl, Duration::from_secs(15 * 60));
        assert_eq!(c.links.invite_ttl, Duration::from_secs(72 * 3600));
        assert_eq!(c.history.retention, Duration::from_secs(14 * 86_400));
        assert_eq!(c.webauthn.max_passkeys_per_user, 20);
        assert_eq!(c.webauthn.rp_id, "localhost");
        assert_eq!(c.webauthn.user_verification, UserVerification::Required, "what passkeys do");
        assert_eq!(c.passwords.strength, PasswordStrength::Medium);
        assert!(!c.passwords.allow_empty && !c.passwords.users_may_set);
        assert_eq!(c.public_url.origin, "https://localhost:8443");
        assert_eq!((c.tls.min_version, c.tls.max_version), (TlsVersion::V1_2, TlsVersion::V1_3));
        assert_eq!(c.headers.user.as_str(), "remote-user");
        assert!(c.listen.workers >= 1, "0 means one per core");
        assert!(c.policy_file.ends_with("policy.toml"));
        Ok(())
    });
}

#[test]
fn environment_overrides_with_double_underscore_nesting() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", POLICY)?;
        jail.create_file("gateway.toml", "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n")?;
        jail.set_env("PBXGATE_TLS__MIN_VERSION", "1.3");
        jail.set_env("PBXGATE_SESSION__IDLE_TIMEOUT", "600");
        jail.set_env("PBXGATE_STORE__URL", "redis://127.0.0.1:6379/0");
        jail.set_env("PBXGATE_UPSTREAM__URL", "https://10.0.0.5:8443");
        jail.set_env("PBXGATE_LISTEN__HTTP", "127.0.0.1:8000");
        let c = load(jail).map_err(|e| e.to_string())?;
        assert_eq!(c.tls.min_version, TlsVersion::V1_3);
        assert_eq!(c.session.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.store.url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.upstream.url.to_string(), "https://10.0.0.5:8443/");
        assert_eq!(c.listen.http.map(|a| a.port()), Some(8000));
        Ok(())
    });
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", "domains = []\n[[route]]\npath = \"/\"\naccess = \"everyone\"\n")?;
        jail.create_file(
            "gateway.toml",
            r#"
policy_file = "policy.toml"
public_url = "ftp://x"
[listen]
https = "127.0.0.1:99999"
[tls]
min_version = "1.3"
max_version = "1.2"
session_ticket_lifetime = "forever"
[upstream]
url = "not a url"
[session]
idle_timeout = "0s"
[store]
url = "mysql://x"
[log]
format = "xml"
"#,
        )?;
        let errors = load(jail).expect_err("invalid");
        let paths = paths(&errors);
        for want in [
            "public_url",
            "listen.https",
            "tls.min_version",
            "tls.session_ticket_lifetime",
            "upstream.url",
            "session.idle_timeout",
            "store.url",
            "log.format",
        ] {
            assert!(paths.iter().any(|p| p == want), "missing {want} in {paths:?}");
        }
        assert!(paths.iter().any(|p| p.ends_with(": domains")), "{paths:?}");
        assert!(paths.iter().any(|p| p.ends_with(": route[0].access")), "{paths:?}");
        Ok(())
    });
}

#[test]
fn store_urls_are_checked_without_showing_their_password() {
    let message = |url: &str| {
        let mut message = String::new();
        Jail::expect_with(|jail| {
            jail.create_file("policy.toml", POLICY)?;
            jail.create_file(
                "gateway.toml",
                &format!(
                    "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n[store]\nurl = \"{url}\"\n"
                ),
            )?;
            let errors = load(jail).expect_err(url);
            assert_eq!(paths(&errors), vec!["store.url".to_string()]);
            message = errors.to_string();
            Ok(())
        });
        message
    };
    let unknown = message("mysql://root:hunter2@db/pbx");
    assert!(unknown.contains("redis+sentinel://") && !unknown.contains("hunter2"), "{unknown}");
    let unnamed = message("redis+sentinel://:hunter2@10.0.0.1:26379");
    assert!(unnamed.contains("name the master") && !unnamed.contains("hunter2"), "{unnamed}");
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", POLICY)?;
        jail.set_env("PBXGATE_STORE__URL", "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/pbx");
        jail.create_file("gateway.toml", "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n")?;
        load(jail).map_err(|e| e.to_string())?;
        Ok(())
    });
}

#[test]
fn unknown_keys_are_refused() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", POLICY)?;
        jail.create_file(
            "gateway.toml",
            "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\nmin_versoin = \"1.3\"\n",
        )?;
        let errors = load(jail).expect_err("invalid");
        assert_eq!(paths(&errors), vec!["tls.min_versoin".to_string()]);
        Ok(())
    });
}

#[test]
fn missing_file_is_an_error_not_defaults() {
    let errors = Config::load(Path::new("/nonexistent/gateway.toml")).expect_err("missing");
    assert_eq!(paths(&errors), vec!["config".to_string()]);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("64KiB"), Ok(65536));
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("100MB"), Ok(100_000_000));
    assert_eq!(parse_size("512"), Ok(512));
    assert!(parse_size("1 parsec").is_err());
    assert!(parse_size("").is_err());
}

#[test]
fn store_tls_files_are_for_a_tls_redis_and_come_in_pairs() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", POLICY)?;
        jail.create_file("ca.pem", "")?;
        jail.create_file("client.pem", "")?;
        let head = "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n[store]\n";
        jail.create_file(
            "gateway.toml",
            &format!("{head}url = \"redis://127.0.0.1/0\"\nca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\n"),
        )?;
        let errors = load(jail).expect_err("invalid");
        assert_eq!(paths(&errors), vec!["store.client_key_file".to_string(), "store.ca_file".to_string()]);

        jail.create_file(
            "gateway.toml",
            &format!(
                "{head}url = \"rediss://127.0.0.1/0\"\nca_file = \"ca.pem\"\n\
                 client_cert_file = \"client.pem\"\nclient_key_file = \"client.pem\"\n"
            ),
        )?;
        let c = load(jail).map_err(|e| e.to_string())?;
        let dir = jail.directory();
        assert_eq!(c.store.redis.tls.ca_file, Some(dir.join("ca.pem")));
        assert_eq!(c.store.redis.tls.client_cert, Some((dir.join("client.pem"), dir.join("client.pem"))));
        Ok(())
    });
}

#[test]
fn sentinel_credentials_are_for_a_sentinel_url_and_never_shown() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", POLICY)?;
        let head = "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n[store]\n";
        jail.create_file(
            "gateway.toml",
            &format!("{head}url = \"redis://127.0.0.1/0\"\nsentinel_username = \"pbxgate\"\n"),
        )?;
        let errors = load(jail).expect_err("invalid");
        assert_eq!(
            paths(&errors),
            vec!["store.sentinel_password".to_string(), "store.sentinel_username".into()]
        );

        jail.create_file("gateway.toml", &format!("{head}url = \"redis+sentinel://127.0.0.1/pbx\"\n"))?;
        // A secret belongs in the environment rather than the file.
        jail.set_env("PBXGATE_STORE__SENTINEL_PASSWORD", "s3cret-sentinel");
        let c = load(jail).map_err(|e| e.to_string())?;
        assert_eq!(c.store.redis.sentinel_password.as_deref(), Some("s3cret-sentinel"));
        assert_eq!(c.store.redis.sentinel_username, None);
        assert!(!format!("{c:?}").contains("s3cret-sentinel"), "the password in a debug print");
        Ok(())
    });
}

#[test]
fn state_directory_is_relative_to_the_file_and_must_be_systemds() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", POLICY)?;
        let head = "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n";
        jail.create_file("gateway.toml", head)?;
        let c = load(jail).map_err(|e| e.to_string())?;
        assert_eq!(c.state_directory, jail.directory(), "by default the configuration's directory");
        assert_eq!(c.tls.self_signed_dir, jail.directory());

        jail.create_file("gateway.toml", &format!("state_directory = \"data\"\n{head}"))?;
        let c = load(jail).map_err(|e| e.to_string())?;
        assert_eq!(c.state_directory, jail.directory().join("data"));

        // Under systemd, another StateDirectory= than the file's is refused.
        std::fs::create_dir_all(jail.directory().join("data")).map_err(|e| e.to_string())?;
        jail.set_env("STATE_DIRECTORY", jail.directory().join("elsewhere").display());
        let errors = load(jail).expect_err("differs");
        assert_eq!(paths(&errors), vec!["state_directory".to_string()]);
        assert!(errors.to_string().contains("$STATE_DIRECTORY"), "{errors}");
        jail.set_env("STATE_DIRECTORY", jail.directory().join("data").display());
        load(jail).map_err(|e| e.to_string())?;
        Ok(())
    });
}

#[test]
fn secret_files_come_from_the_credentials_directory_first() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", POLICY)?;
        std::fs::create_dir_all(jail.directory().join("credentials")).map_err(|e| e.to_string())?;
        jail.create_file("credentials/smtp-password", "p@ss word/1\n")?;
        jail.create_file("credentials/redis-password", "r3dis\n")?;
        jail.create_file("sentinel-password", "s3ntinel\n")?;
        jail.create_file(
            "gateway.toml",
            "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n\
             [email]\nsmtp_url = \"smtps://pbx@mail.example.com:465\"\nsmtp_password_file = \"smtp-password\"\n\
             [store]\nurl = \"redis+sentinel://:old@10.0.0.1:26379/pbx\"\npassword_file = \"redis-password\"\n\
             sentinel_password_file = \"sentinel-password\"\n",
        )?;
        // Without systemd's directory the relative names are next to the file: missing.
        let errors = load(jail).expect_err("not next to the file");
        assert_eq!(
            paths(&errors),
            vec!["store.password_file".to_string(), "email.smtp_password_file".into()],
            "{errors}"
        );

        jail.set_env("CREDENTIALS_DIRECTORY", jail.directory().join("credentials").display());
        let c = load(jail).map_err(|e| e.to_string())?;
        assert_eq!(c.email.smtp_url.as_deref(), Some("smtps://pbx:p%40ss%20word%2F1@mail.example.com:465"));
        assert_eq!(c.store.url, "redis+sentinel://:r3dis@10.0.0.1:26379/pbx", "in place of the URL's");
        // Not a credential: found next to the configuration file.
        assert_eq!(c.store.redis.sentinel_password.as_deref(), Some("s3ntinel"));
        Ok(())
    });
}

/// Every problem at once, at its key path, naming the `PBXGATE_*` variable
/// behind a value from the environment: (file, environment, expected
/// (path, part of the message) in order).
#[test]
fn every_problem_at_once_with_the_variable_behind_it() {
    type Case =
        (&'static str, &'static [(&'static str, &'static str)], &'static [(&'static str, &'static str)]);
    let cases: &[Case] = &[
        (
            "[tls]\nmin_versoin = \"1.3\"\n[log]\nformat = \"xml\"\n[listen]\nhttps = \"nowhere\"\n",
            &[],
            &[
                ("tls.min_versoin", "unknown key"),
                ("listen.https", "not an address"),
                ("listen", "set listen.https or listen.http"),
                ("log.format", "xml"),
            ],
        ),
        (
            "",
            &[("PBXGATE_TLS__MIN_VERSON", "1.3"), ("PBXGATE_UPSTREAM__TIMEOUT", "soon")],
            &[
                ("tls.min_verson", "unknown key (from PBXGATE_TLS__MIN_VERSON)"),
                ("upstream.timeout", "(from PBXGATE_UPSTREAM__TIMEOUT)"),
            ],
        ),
        (
            "[listen]\nworkers = \"many\"\n[passwords]\nstrength = \"weak\"\n",
            &[("PBXGATE_SESSION__MAX_LIFETIME", "true"), ("PBXGATE_LOG__FORMAT", "7")],
            &[
                ("listen.workers", "string \"many\""),
                ("session.max_lifetime", "(from PBXGATE_SESSION__MAX_LIFETIME)"),
                ("passwords.strength", "weak"),
                ("log.format", "\"7\": use pretty or json (from PBXGATE_LOG__FORMAT)"),
            ],
        ),
        // A number in the file for a string key is the file's mistake.
        ("[bootstrap]\nadmin = 100\n", &[], &[("bootstrap.admin", "invalid type")]),
    ];
    for (file, env, want) in cases {
        Jail::expect_with(|jail| {
            jail.create_file("policy.toml", POLICY)?;
            jail.create_file("gateway.toml", &format!("policy_file = \"policy.toml\"\n{file}"))?;
            jail.set_env("PBXGATE_TLS__SELF_SIGNED", "true");
            for (k, v) in env.iter() {
                jail.set_env(k, v);
            }
            let errors = load(jail).expect_err("invalid");
            let got: Vec<(String, String)> =
                errors.0.iter().map(|e| (e.path.clone(), e.message.clone())).collect();
            assert_eq!(got.len(), want.len(), "{file} {env:?}\n{errors}");
            for ((path, message), (want_path, want_message)) in got.iter().zip(want.iter()) {
                assert_eq!(path, want_path, "{file} {env:?}\n{errors}");
                assert!(message.contains(want_message), "{path}: {message:?} lacks {want_message:?}");
            }
            Ok(())
        });
    }
}

#[test]
fn numbers_from_the_environment_are_text_for_string_keys() {
    Jail::expect_with(|jail| {
        jail.create_file("policy.toml", &format!("{POLICY}[[user]]\nname = \"100\"\nrole = \"admin\"\n"))?;
        jail.create_file("otp", "Open sesame 99\n")?;
        jail.create_file(
            "gateway.toml",
            "policy_file = \"policy.toml\"\n[tls]\nself_signed = true\n[bootstrap]\none_time_password_file = \"otp\"\n",
        )?;
        jail.set_env("PBXGATE_BOOTSTRAP__ADMIN", "100");
        jail.set_env("PBXGATE_HEADERS__USER", "7");
        let c = load(jail).map_err(|e| e.to_string())?;
        assert_eq!(c.bootstrap.admin.as_deref(), Some("100"));
        assert_eq!(c.headers.user.as_str(), "7");
        Ok(())
    });
}
