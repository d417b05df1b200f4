use std::net::IpAddr;
use std::time::Duration;

use proptest::prelude::*;

use crate::*;

const EXAMPLE: &str = include_str!("../examples/pbx.toml");

fn policy(src: &str) -> Policy {
    match Policy::from_toml(src) {
        Ok(p) => p,
        Err(errors) => panic!("policy should be valid: {errors:?}"),
    }
}

fn errors(src: &str) -> Vec<String> {
    match Policy::from_toml(src) {
        Ok(_) => panic!("policy should be refused"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn facts<'a>(ip: &str, host: &'a str, path: &'a str, ua: Option<&'a str>) -> Facts<'a> {
    Facts {
        client_ip: ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        host,
        method: "GET",
        path,
        user_agent: ua,
    }
}

#[test]
fn example_policy_is_valid() {
    let p = policy(EXAMPLE);
    assert_eq!(p.routes.first().map(|r| r.path.as_str()), Some("/provisioning/"));
    assert!(p.user("ALICE@example.com").is_some_and(|u| u.name == "100"));
    assert!(p.user(" 101 ").is_some());
    assert!(p.user("102").is_none());
}

#[test]
fn normalize_path_table() {
    let ok = [
        ("/", "/"),
        ("//", "/"),
        ("/a//b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/admin/..", "/"),
        ("/admin/.", "/admin/"),
        ("/admin/", "/admin/"),
        ("/%61dmin/", "/admin/"),
        ("/%2e%2e/admin", "/admin"),
        ("/x/%2E%2E/admin/", "/admin/"),
        ("/a%20b", "/a%20b"),
        ("/a%3fb", "/a%3Fb"),
        ("/caf\u{e9}", "/caf\u{e9}"),
        ("/a/b/", "/a/b/"),
    ];
    for (input, want) in ok {
        assert_eq!(normalize_path(input).as_deref(), Ok(want), "input {input:?}");
    }
    let refused = [
        ("admin", PathError::NotAbsolute),
        ("", PathError::NotAbsolute),
        ("/a#b", PathError::Fragment),
        ("/admin%2fx", PathError::EncodedSeparator),
        ("/admin%2Fx", PathError::EncodedSeparator),
        ("/a%5cb", PathError::EncodedSeparator),
        ("/a%00b", PathError::EncodedSeparator),
        ("/a\\b", PathError::Backslash),
        ("/a%zz", PathError::BadEncoding),
        ("/a%4", PathError::BadEncoding),
        ("/a\u{1}b", PathError::Control),
    ];
    for (input, want) in refused {
        assert_eq!(normalize_path(input), Err(want), "input {input:?}");
    }
}

#[test]
fn screen_table() {
    let p = policy(
        r#"
        domains = ["pbx.example.com", "*.tenants.example.com"]
        allow_unknown_host_networks = ["10.9.0.0/16"]
        drop_user_agents = ["friendly-scanner", "SIP Call"]
        [[route]]
        path = "/"
        access = "user"
        "#,
    );
    let cases: &[(&str, &str, Option<&str>, Screen)] = &[
        ("1.2.3.4", "pbx.example.com", Some("Mozilla/5.0"), Screen::Continue),
        ("1.2.3.4", "PBX.Example.COM", None, Screen::Continue),
        ("1.2.3.4", "a.tenants.example.com", None, Screen::Continue),
        ("1.2.3.4", "tenants.example.com", None, Screen::Drop(DropReason::UnknownHost)),
        ("1.2.3.4", "xtenants.example.com", None, Screen::Drop(DropReason::UnknownHost)),
        ("1.2.3.4", "evil.example", None, Screen::Drop(DropReason::UnknownHost)),
        ("1.2.3.4", "", None, Screen::Drop(DropReason::UnknownHost)),
        ("10.9.1.1", "192.0.2.1", None, Screen::Continue),
        ("::ffff:10.9.1.1", "192.0.2.1", None, Screen::Continue),
        (
            "1.2.3.4",
            "pbx.example.com",
            Some("Friendly-Scanner/1.0"),
            Screen::Drop(DropReason::ScannerUserAgent { index: 0 }),
        ),
        (
            "1.2.3.4",
            "pbx.example.com",
            Some("my sip call agent"),
            Screen::Drop(DropReason::ScannerUserAgent { index: 1 }),
        ),
        // A scanner inside an allowed network is still dropped: UA rules only deny.
        (
            "10.9.1.1",
            "pbx.example.com",
            Some("sip call"),
            Screen::Drop(DropReason::ScannerUserAgent { index: 1 }),
        ),
        ("1.2.3.4", "pbx.example.com", Some("SIPCall"), Screen::Continue),
    ];
    for (ip, host, ua, want) in cases {
        assert_eq!(screen(&p, &facts(ip, host, "/", *ua)), *want, "{ip} {host} {ua:?}");
    }
}

#[test]
fn decide_table() {
    let p = policy(
        r#"
        domains = ["pbx.example.com"]
        [networks]
        lan = ["192.168.1.0/24"]
        [[route]]
        path = "/provisioning/"
        access = "network"
        networks = ["10.0.0.0/8"]
        [[route]]
        path = "/admin/"
        access = "admin"
        step_up = "15m"
        [[route]]
        path = "/api/"
        access = "api"
        networks = ["172.16.0.0/12"]
        [[route]]
        path = "/public/"
        access = "public"
        [[route]]
        path = "/"
        access = "user"
        [roles.admin]
        networks = ["192.168.0.0/16", "127.0.0.1"]
        [[user]]
        name = "100"
        role = "admin"
        networks = ["lan", "127.0.0.1"]
        [[user]]
        name = "101"
        [[user]]
        name = "svc"
        role = "api"
        networks = ["203.0.113.0/24"]
        basic_auth = true
        "#,
    );
    let now = 1_000_000;
    let open = [("/admin/".to_string(), now + 60)];
    let closed = [("/admin/".to_string(), now)];
    let elsewhere = [("/other/".to_string(), now + 60), (ADMIN_PAGES_SCOPE.to_string(), now + 60)];
    let admin = person("100", &[]);
    let unlocked = person("100", &open);
    let expired = person("100", &closed);
    let unlocked_elsewhere = person("100", &elsewhere);
    let pending = Principal { passkey_pending: true, ..unlocked };
    let user = person("101", &[]);
    let api = Principal::verified_now("svc", now);
    let gone = person("999", &[]);
    let step_up = Verdict::StepUp { max: Duration::from_secs(900) };
    use DenyReason::*;
    use Verdict::*;
    let cases: &[(&str, &str, Option<&Principal<'_>>, Verdict, &str)] = &[
        ("192.168.1.5", "/", None, Login, "route[4] user /"),
        ("192.168.1.5", "/", Some(&user), Allow, "route[4] user /"),
        ("192.168.1.5", "/", Some(&gone), Login, "route[4] user /"),
        ("192.168.1.5", "/public/x", None, Allow, "route[3] public /public/"),
        ("10.1.2.3", "/provisioning/0004f2.cfg", None, Allow, "route[0] network /provisioning/"),
        ("8.8.8.8", "/provisioning/0004f2.cfg", None, Deny(RouteNetwork), "route[0] network /provisioning/"),
        ("8.8.8.8", "/provisioning/", Some(&user), Deny(RouteNetwork), "route[0] network /provisioning/"),
        ("192.168.1.5", "/admin/", None, Login, "route[1] admin /admin/"),
        ("192.168.1.5", "/admin", None, Login, "route[1] admin /admin/"),
        ("192.168.1.5", "/admin/x", Some(&user), Deny(Role), "route[1] admin /admin/"),
        ("192.168.1.5", "/admin/x", Some(&admin), step_up, "route[1] admin /admin/"),
        ("192.168.1.5", "/admin/x", Some(&expired), step_up, "route[1] admin /admin/"),
        ("192.168.1.5", "/admin/x", Some(&unlocked), Allow, "route[1] admin /admin/"),
        // A window opened for another route or for the gateway's pages opens nothing here.
        ("192.168.1.5", "/admin/x", Some(&unlocked_elsewhere), step_up, "route[1] admin /admin/"),
        // A pending passkey closes every route that needs a person, after the network check.
        ("192.168.1.5", "/admin/x", Some(&pending), PasskeyFirst, "route[1] admin /admin/"),
        ("192.168.1.5", "/", Some(&pending), PasskeyFirst, "route[4] user /"),
        ("192.168.1.5", "/public/x", Some(&pending), Allow, "route[3] public /public/"),
        ("192.168.2.5", "/", Some(&pending), Deny(UserNetwork), "route[4] user /"),
        ("127.0.0.1", "/admin/x", Some(&unlocked), Allow, "route[1] admin /admin/"),
        // Own networks allow 192.168.1.0/24; the role's 192.168.0.0/16 would allow 192.168.2.x.
        ("192.168.2.5", "/admin/x", Some(&unlocked), Deny(UserNetwork), "route[1] admin /admin/"),
        ("192.168.2.5", "/", Some(&admin), Deny(UserNetwork), "route[4] user /"),
        ("172.16.0.9", "/api/calls", None, Allow, "route[2] api /api/"),
        ("203.0.113.7", "/api/calls", None, Login, "route[2] api /api/"),
        ("203.0.113.7", "/api/calls", Some(&api), Allow, "route[2] api /api/"),
        ("8.8.8.8", "/api/calls", Some(&api), Deny(UserNetwork), "route[2] api /api/"),
        ("203.0.113.7", "/", Some(&api), Deny(Role), "route[4] user /"),
        ("192.168.1.5", "/api/calls", Some(&user), Deny(Role), "route[2] api /api/"),
    ];
    for (ip, path, who, want, rule) in cases {
        let d = decide(&p, &facts(ip, "pbx.example.com", path, None), *who, now);
        assert_eq!(d.verdict, *want, "{ip} {path} {who:?}");
        assert_eq!(d.rule.to_string(), *rule, "{ip} {path} {who:?}");
    }
}

/// A signed-in person who really authenticated at second 1,000,000.
fn person<'a>(name: &'a str, unlocked: &'a [(String, u64)]) -> Principal<'a> {
    Principal { name, unlocked, passkey_pending: false, authenticated_at: Some(1_000_000) }
}

const ENDPOINTS: [Endpoint; 8] = [
    Endpoint::Account,
    Endpoint::PasskeyRegister,
    Endpoint::PasskeyRename,
    Endpoint::PasskeyDelete,
    Endpoint::PasswordSet,
    Endpoint::Unlock,
    Endpoint::Admin,
    Endpoint::SignOut,
];

#[test]
fn endpoint_table() {
    let p = policy(
        r#"
        domains = ["pbx.example.com"]
        [[route]]
        path = "/"
        access = "user"
        [roles.admin]
        networks = ["192.168.0.0/16"]
        [[user]]
        name = "100"
        role = "admin"
        networks = ["192.168.1.0/24"]
        [[user]]
        name = "101"
        networks = ["10.0.0.0/8"]
        [[user]]
        name = "svc"
        role = "api"
        networks = ["203.0.113.0/24"]
        "#,
    );
    let now = 1_000_100;
    let admin_open = [(ADMIN_PAGES_SCOPE.to_string(), now + 60)];
    let route_open = [("/".to_string(), now + 60)];
    let admin = person("100", &[]);
    let unlocked = person("100", &admin_open);
    let unlocked_route_only = person("100", &route_open);
    let pending = Principal { passkey_pending: true, ..unlocked };
    // Made from a remember token: never a fresh sign-in.
    let remembered = Principal { authenticated_at: None, ..unlocked };
    let stale = Principal { authenticated_at: Some(now - 301), ..unlocked };
    let user = person("101", &[]);
    let api = Principal::verified_now("svc", now);
    let gone = person("999", &[]);
    let lan = "192.168.1.5";
    let step_up = Verdict::StepUp { max: ADMIN_UNLOCK_MAX };
    use DenyReason::*;
    use Endpoint::*;
    use Verdict::*;
    let cases: &[(&str, Endpoint, Option<&Principal<'_>>, Verdict)] = &[
        // Nobody signed in.
        (lan, Account, None, Login),
        (lan, Admin, None, Login),
        (lan, SignOut, None, Allow),
        (lan, Account, Some(&gone), Login),
        // The account's own networks and its role's hold on every endpoint.
        (lan, Account, Some(&admin), Allow),
        ("192.168.2.5", Account, Some(&admin), Deny(UserNetwork)),
        ("192.168.2.5", PasskeyRegister, Some(&admin), Deny(UserNetwork)),
        ("192.168.2.5", Unlock, Some(&unlocked), Deny(UserNetwork)),
        ("192.168.2.5", Admin, Some(&unlocked), Deny(UserNetwork)),
        ("192.168.2.5", SignOut, Some(&unlocked), Allow),
        (lan, Account, Some(&user), Deny(UserNetwork)),
        ("10.1.1.1", Account, Some(&user), Allow),
        // API accounts have no pages.
        ("203.0.113.7", Account, Some(&api), Deny(Role)),
        ("203.0.113.7", PasskeyRegister, Some(&api), Deny(Role)),
        // Admin pages: admins, unlocked for the admin pages themselves.
        ("10.1.1.1", Admin, Some(&user), Deny(Role)),
        (lan, Admin, Some(&admin), step_up),
        (lan, Admin, Some(&unlocked_route_only), step_up),
        (lan, Admin, Some(&unlocked), Allow),
        // A pending passkey: passkey creation, the account view and sign-out only.
        (lan, Account, Some(&pending), Allow),
        (lan, PasskeyRegister, Some(&pending), Allow),
        (lan, SignOut, Some(&pending), Allow),
        (lan, Admin, Some(&pending), PasskeyFirst),
        (lan, Unlock, Some(&pending), PasskeyFirst),
        (lan, PasswordSet, Some(&pending), PasskeyFirst),
        (lan, PasskeyRename, Some(&pending), PasskeyFirst),
        (lan, PasskeyDelete, Some(&pending), PasskeyFirst),
        // Credential changes need a recent real ceremony.
        (lan, PasskeyRegister, Some(&unlocked), Allow),
        (lan, PasskeyRegister, Some(&remembered), Reauthenticate),
        (lan, PasskeyRegister, Some(&stale), Reauthenticate),
        (lan, PasswordSet, Some(&remembered), Reauthenticate),
        (lan, PasswordSet, Some(&unlocked), Allow),
        (lan, PasskeyDelete, Some(&remembered), Reauthenticate),
        (lan, PasskeyRename, Some(&remembered), Allow),
        (lan, Unlock, Some(&remembered), Allow),
        (lan, Account, Some(&remembered), Allow),
    ];
    for (ip, endpoint, who, want) in cases {
        let got = decide_endpoint(&p, *endpoint, &facts(ip, "pbx.example.com", "/", None), *who, now);
        assert_eq!(got, *want, "{ip} {endpoint:?} {who:?}");
    }
}

#[test]
fn sign_in_table() {
    let p = policy(
        r#"
        domains = ["pbx.example.com"]
        [roles.admin]
        networks = ["192.168.0.0/16"]
        [[user]]
        name = "100"
        email = "alice@example.com"
        role = "admin"
        password_login = true
        [[user]]
        name = "101"
        networks = ["10.0.0.0/8"]
        [[user]]
        name = "svc"
        role = "api"
        basic_auth = true
        networks = ["203.0.113.0/24"]
        [[user]]
        name = "svc2"
        role = "api"
        networks = ["203.0.113.0/24"]
        "#,
    );
    use Proof::*;
    use SignInRefusal::*;
    let cases: &[(&str, &str, Proof, Result<&str, SignInRefusal>)] = &[
        ("192.168.1.5", "100", Password, Ok("100")),
        ("192.168.1.5", " Alice@Example.com ", Password, Ok("100")),
        ("192.168.1.5", "100", OneTimePassword, Ok("100")),
        ("8.8.8.8", "100", Password, Err(Network)),
        ("8.8.8.8", "100", Passkey, Err(Network)),
        ("10.1.1.1", "101", Password, Err(NotAllowed)),
        ("10.1.1.1", "101", OneTimePassword, Err(Role)),
        ("10.1.1.1", "101", Link, Ok("101")),
        ("10.1.1.1", "101", Remembered, Ok("101")),
        ("192.168.1.5", "101", Link, Err(Network)),
        ("10.1.1.1", "101", Basic, Err(Role)),
        ("203.0.113.7", "svc", Basic, Ok("svc")),
        ("203.0.113.7", "svc2", Basic, Err(NotAllowed)),
        ("8.8.8.8", "svc", Basic, Err(Network)),
        ("203.0.113.7", "svc", Password, Err(Role)),
        ("203.0.113.7", "svc", Link, Err(Role)),
        ("203.0.113.7", "svc", Remembered, Err(Role)),
        ("203.0.113.7", "nobody", Link, Err(UnknownUser)),
    ];
    for (ip, login, proof, want) in cases {
        let got =
            sign_in(&p, login, *proof, &facts(ip, "pbx.example.com", "/", None)).map(|u| u.name.as_str());
        assert_eq!(got, *want, "{ip} {login} {proof:?}");
    }
}

#[test]
fn unlock_scopes_are_per_route() {
    let p = policy(
        r#"
        domains = ["pbx.example.com"]
        [[route]]
        path = "/admin/"
        access = "admin"
        step_up = "15m"
        [[route]]
        path = "/reports/"
        access = "user"
        step_up = "8h"
        [[route]]
        path = "/"
        access = "user"
        "#,
    );
    let min = |m: u64| Duration::from_secs(m * 60);
    assert_eq!(unlock_scope(&p, "/admin/users"), ("/admin/", min(15)));
    assert_eq!(unlock_scope(&p, "/admin"), ("/admin/", min(15)));
    assert_eq!(unlock_scope(&p, "/reports/x"), ("/reports/", min(480)));
    assert_eq!(unlock_scope(&p, "/.pbxgate/admin/user"), (ADMIN_PAGES_SCOPE, ADMIN_UNLOCK_MAX));
    // Nothing to unlock there: the narrowest window, for the admin pages.
    assert_eq!(unlock_scope(&p, "/calls"), (ADMIN_PAGES_SCOPE, ADMIN_UNLOCK_MAX));
}

#[test]
fn no_route_denies() {
    let p = policy("domains = [\"a.example\"]\n[[route]]\npath = \"/only/\"\naccess = \"public\"\n");
    let d = decide(&p, &facts("1.1.1.1", "a.example", "/other", None), None, 0);
    assert_eq!(d.verdict, Verdict::Deny(DenyReason::NoRoute));
}

#[test]
fn validation_names_every_bad_key() {
    let errs = errors(
        r#"
        domains = ["bad domain", "ok.example"]
        trusted_proxies = ["10.0.0/8"]
        [[route]]
        path = "/a/../b"
        access = "user"
        [[route]]
        path = "/p/"
        access = "network"
        [[route]]
        path = "/x/"
        access = "everyone"
        [[route]]
        path = "/y/"
        access = "public"
        step_up = "5m"
        [[user]]
        name = "100"
        role = "root"
        [[user]]
        name = "svc"
        role = "api"
        [[user]]
        name = "101"
        basic_auth = true
        email = "not-an-email"
        [[user]]
        name = "102"
        email = "101@example.com"
        [[user]]
        name = "103"
        email = "101@EXAMPLE.com"
        "#,
    );
    let joined = errs.join("\n");
    for want in [
        "domains[0]:",
        "trusted_proxies[0]:",
        "route[0].path:",
        "route[1].networks:",
        "route[2].access:",
        "route[3].step_up:",
        "user[0].role:",
        "user[1].networks:",
        "user[2].basic_auth:",
        "user[2].email:",
        "user[4]: \"101@EXAMPLE.com\" is already",
    ] {
        assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
    }
}

#[test]
fn unknown_keys_are_refused_by_key_path_and_hide_no_other_problem() {
    let head = "domains = [\"a.example\"]\n";
    // (policy, every error expected, in order)
    let cases: &[(&str, &[&str])] = &[
        ("[[route]]\npath = \"/\"\naccess = \"user\"\nstepup = \"5m\"\n", &["route[0].stepup: unknown key"]),
        (
            "dommains = [\"b\"]\n[[route]]\npath = \"/\"\nacess = \"user\"\naccess = \"everyone\"\n\
             [[user]]\nname = \"100\"\nrole = \"root\"\nemial = \"a@b.c\"\n",
            &[
                "dommains: unknown key",
                "route[0].acess: unknown key",
                "user[0].emial: unknown key",
                "route[0].access:",
                "user[0].role:",
            ],
        ),
        (
            "[roles.admin]\nrequire_pass = true\n[[route]]\npath = \"/\"\naccess = \"user\"\n",
            &["roles.admin.require_pass: unknown key"],
        ),
        (
            "trusted_proxies = \"10.0.0.1\"\n[[route]]\npath = 5\naccess = \"user\"\n",
            &["route[0]: invalid type: integer `5`", "trusted_proxies: invalid type: string"],
        ),
    ];
    for (policy, want) in cases {
        let errs = errors(&format!("{head}{policy}"));
        assert_eq!(errs.len(), want.len(), "{policy}\n{errs:#?}");
        for (err, want) in errs.iter().zip(want.iter()) {
            assert!(err.starts_with(want), "{policy}\nwanted {want:?}, got {errs:#?}");
        }
    }
    // Syntax errors leave no key to name: they are given by line.
    let errs = errors("domains = [\"a.example\"\n[[route]]\n");
    assert!(errs.len() == 1 && errs[0].starts_with("line "), "{errs:?}");
}

#[test]
fn empty_policy_needs_domains() {
    assert!(errors("").iter().any(|e| e.starts_with("domains:")));
}

#[test]
fn durations() {
    for (text, secs) in
        [("3600s", 3600), ("15m", 900), ("30d", 2_592_000), ("1h30m", 5400), ("90", 90), ("2w", 1_209_600)]
    {
        assert_eq!(duration::parse(text), Ok(Duration::from_secs(secs)), "{text}");
    }
    assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
    for bad in ["", "s", "10y", "-5s", "99999999999999999999d"] {
        assert!(duration::parse(bad).is_err(), "{bad:?}");
    }
    for secs in [1, 60, 900, 3600, 86_400 * 30, 5400] {
        let d = Duration::from_secs(secs);
        assert_eq!(duration::parse(&duration::format(d)), Ok(d));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn scanner_search_finds_what_comparing_every_window_finds(
        ua in "[a-zA-Z/ .é;()-]{0,80}|\\PC{0,600}",
        needles in proptest::collection::vec("[a-z/ é-]{1,6}", 0..4),
    ) {
        // The obvious search, as the oracle: every window against every needle.
        let naive = needles.iter().position(|n| {
            let (h, n) = (ua.as_bytes(), n.as_bytes());
            n.len() <= h.len() && h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
        });
        prop_assert_eq!(crate::screen::find_any_ignore_case(&ua, &needles), naive);
    }

    #[test]
    fn normalize_never_panics_and_is_idempotent(raw in "\\PC{0,40}|/[a-z%0-9./\\\\#]{0,30}") {
        if let Ok(once) = normalize_path(&raw) {
            prop_assert!(once.starts_with('/'));
            prop_assert!(!once.contains("//"));
            prop_assert!(!once.split('/').any(|s| s == ".." || s == "."));
            prop_assert_eq!(normalize_path(&once), Ok(once.clone()));
            // The fast path agrees with the full one.
            let dotted = format!("/.{once}");
            prop_assert_eq!(normalize_path(&dotted), Ok(once.clone()));
        }
    }

    #[test]
    fn screen_and_decide_never_panic(
        ip in any::<[u8; 16]>(),
        v4 in any::<bool>(),
        host in "\\PC{0,30}",
        path in "\\PC{0,40}|/[a-z/.]{0,20}",
        ua in proptest::option::of("\\PC{0,40}"),
        who in proptest::option::of("\\PC{0,8}|100|101"),
        until in proptest::option::of(any::<u64>()),
        now in any::<u64>(),
    ) {
        let p = policy(EXAMPLE);
        let client_ip = if v4 { IpAddr::from([ip[0], ip[1], ip[2], ip[3]]) } else { IpAddr::from(ip) };
        let f = Facts { client_ip, host: &host, method: "GET", path: &path, user_agent: ua.as_deref() };
        let _ = screen(&p, &f);
        let unlocked = until.map(|u| vec![("/admin/".to_string(), u)]).unwrap_or_default();
        let principal = who.as_deref().map(|name| Principal {
            name,
            unlocked: &unlocked,
            passkey_pending: until.is_some_and(|u| u % 2 == 0),
            authenticated_at: until,
        });
        let _ = decide(&p, &f, principal.as_ref(), now);
        for endpoint in ENDPOINTS {
            let _ = decide_endpoint(&p, endpoint, &f, principal.as_ref(), now);
        }
    }

    #[test]
    fn policy_parser_never_panics(src in "\\PC{0,200}") {
        let _ = Policy::from_toml(&src);
    }
}

#[test]
fn hosts() {
    for (raw, name, port) in [
        ("PBX.Example.com:8443", "pbx.example.com", Some(8443)),
        ("localhost", "localhost", None),
        ("[::1]:8443", "::1", Some(8443)),
        ("[::1]", "::1", None),
        ("[0:0::1]", "::1", None),
        ("example.com.", "example.com", None),
        ("host:", "host", None),
        ("127.0.0.1:80", "127.0.0.1", Some(80)),
        ("a_b.example", "a_b.example", None),
        ("", "", None),
    ] {
        let host = parse_host(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
        assert_eq!((host.name.as_ref(), host.port), (name, port), "{raw:?}");
    }
    for bad in [
        "[localhost]@evil.example",
        "[::1]@evil.example",
        "[::1]evil",
        "user@localhost",
        "evil.example#.tenant.example.com",
        "evil.example/.tenant.example.com",
        "evil.example?.tenant.example.com",
        "evil.example\\.tenant.example.com",
        "a%2eb",
        "a b",
        " localhost",
        "localhost ",
        "a:b",
        "a:99999",
        "a:123456",
        "a:+80",
        "a..b",
        ".a",
        "example.com..",
        "1.2.3.999",
        "[1.2.3.4]",
        "[::1%eth0]",
        "[::1",
        "a!b",
        "a;b",
        ":80",
        ".",
        "é.example",
    ] {
        assert_eq!(parse_host(bad), Err(HostError), "{bad:?}");
    }
    assert_eq!(parse_host("PBX.example.com:8443").map(|h| h.authority()), Ok("pbx.example.com:8443".into()));
    assert_eq!(parse_host("[::1]:1").map(|h| h.authority()), Ok("[::1]:1".into()));
}

proptest! {
    /// Whatever is accepted is what a URL parser reads as the same host and
    /// port: nothing after it (a path, a fragment, user info) can change
    /// where a URL built from it points.
    #[test]
    fn accepted_hosts_are_whole_authorities(raw in "\\PC{0,24}|[a-zA-Z0-9.:\\[\\]@#/_%-]{0,24}") {
        if let Ok(host) = parse_host(&raw) {
            prop_assert!(!raw.contains(['@', '#', '/', '?', '\\', '%', ' ']), "{raw:?}");
            if !host.name.is_empty() {
                let authority: http::uri::Authority = host.authority().parse().map_err(|_| TestCaseError::fail(format!("{raw:?}")))?;
                prop_assert_eq!(authority.host().trim_start_matches('[').trim_end_matches(']'), host.name.as_ref());
                prop_assert_eq!(authority.port_u16(), host.port);
            }
        }
    }
}

#[test]
fn path_parameters_never_move_a_path_to_another_rule() {
    let p = policy(
        r#"
        domains = ["pbx.example.com"]
        [[route]]
        path = "/admin/"
        access = "admin"
        [[route]]
        path = "/public/"
        access = "public"
        [[route]]
        path = "/"
        access = "user"
        "#,
    );
    for (path, read) in [
        ("/public/..;/admin/x", "/admin/x"),
        ("/admin;x=1/y", "/admin/y"),
        ("/admin;", "/admin"),
        ("/a;b/c;d", "/a/c"),
        ("/ADMIN/x", "/admin/x"),
        ("/admin./x", "/admin/x"),
        ("/admin%20/x", "/admin/x"),
        ("/admin.%20./x", "/admin/x"),
        ("/Public/../Admin/", "/admin/"),
    ] {
        assert_eq!(lenient_reading(path).as_deref(), Some(read), "{path}");
    }
    for same in ["/admin/x", "/a/b.c", "/x/y.z/", "/v1.2/"] {
        assert_eq!(lenient_reading(same), None, "{same}");
    }
    for moved in [
        "/public/..;/admin/x",
        "/public/..;jsessionid=1/admin/",
        "/admin;x=1/y",
        "/admin;",
        "/public;/x",
        "/ADMIN/users",
        "/Admin",
        "/admin./x",
        "/admin%20/x",
        "/PUBLIC/x",
    ] {
        assert!(lenient_reading_changes_route(&p, moved), "{moved}");
    }
    for kept in [
        "/public/x;jsessionid=1",
        "/admin/x;y",
        "/calls;v=2",
        "/public/",
        "/admin/users",
        "/admin/Users",
        "/Calls",
        "/x.",
    ] {
        assert!(!lenient_reading_changes_route(&p, kept), "{kept}");
    }
}

#[test]
fn a_users_language_is_a_language_tag() {
    let with = |tag: &str| {
        Policy::from_toml(&format!(
            "domains = [\"localhost\"]\n[[route]]\npath = \"/\"\naccess = \"user\"\n\
             [[user]]\nname = \"100\"\nlanguage = \"{tag}\"\n"
        ))
    };
    let p = with(" de_CH ").unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(p.user("100").and_then(|u| u.language.as_deref()), Some("de-ch"));
    assert!(with("fr").is_ok());
    for bad in ["", "deutsch", "d", "de-<script>", "de--x"] {
        let errors = with(bad).err().unwrap_or_default();
        assert!(errors.iter().any(|e| e.path.ends_with(".language")), "{bad:?}: {errors:?}");
    }
}
