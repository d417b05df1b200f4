//! The deployment as deploy/README.md describes it: the systemd unit's
//! environment, its state directory and credentials, and the commands an
//! operator runs from a root shell beside it.

use std::path::Path;

use pbxgate_e2e::client::https_request;
use pbxgate_e2e::process::{command_in, GatewayProcess};
use pbxgate_e2e::redis::RedisServer;
use pbxgate_e2e::{TempDir, Upstream};

const POLICY: &str = r#"
domains = ["localhost"]

[[route]]
path = "/"
access = "user"

[[user]]
name = "100"
email = "alice@example.com"
role = "admin"

[[user]]
name = "101"
role = "user"
password_login = true
"#;

/// The `[Service]` settings of the shipped unit: (key, value), in order.
fn unit_settings() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("deploy/pbxgate.service")).unwrap();
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// /etc/pbxgate as deploy/README.md has it: the policy and a gateway.toml
/// whose state directory is the unit's (`/var/lib/pbxgate`, here `state`).
fn etc(dir: &TempDir, state: &Path, upstream: &str, extra: &str) -> std::path::PathBuf {
    dir.write("policy.toml", POLICY);
    dir.write(
        "gateway.toml",
        format!(
            r#"
policy_file = "policy.toml"
state_directory = "{}"
public_url = "https://localhost:8443"
[listen]
https = "127.0.0.1:0"
admin = "127.0.0.1:0"
[upstream]
url = "{upstream}"
[store]
url = "embedded://store.db"
[tls]
self_signed = true
{extra}
"#,
            state.display()
        ),
    )
}

fn password_login(https: std::net::SocketAddr, password: &str) -> impl std::future::Future<Output = u16> {
    let body = format!("login=101&password={}&rd=/", password.replace(' ', "+").replace('!', "%21"));
    async move {
        let headers =
            [("origin", "https://localhost:8443"), ("content-type", "application/x-www-form-urlencoded")];
        https_request(https, "POST", "/.pbxgate/login/password", &headers, &body).await.status.as_u16()
    }
}

/// The unit sets no store of its own: the configuration file names it for
/// the service and for the commands alike. A gateway started as the unit
/// starts it (its environment, `$STATE_DIRECTORY`, its working directory)
/// and the README's commands from a root shell elsewhere reach one store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unit_and_the_commands_of_a_root_shell_use_one_store() {
    let settings = unit_settings();
    let environment: Vec<(String, String)> = settings
        .iter()
        .filter(|(k, _)| k == "Environment")
        .flat_map(|(_, v)| v.split_whitespace().map(|a| a.trim_matches('"').to_string()).collect::<Vec<_>>())
        .filter_map(|a| a.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    assert!(
        environment.iter().all(|(k, _)| !k.starts_with("PBXGATE_")),
        "the unit overrides the configuration file: {environment:?}"
    );
    let value = |key: &str| settings.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    assert_eq!(value("StateDirectory").as_deref(), Some("pbxgate"));
    assert!(value("ExecStart").is_some_and(|e| e.ends_with("--config /etc/pbxgate/gateway.toml")));

    let upstream = Upstream::start().await;
    let (etc_dir, var_lib, shell) =
        (TempDir::new("etc"), TempDir::new("var-lib"), TempDir::new("root-shell"));
    let config = etc(&etc_dir, var_lib.path(), &upstream.url(), "");
    let state = var_lib.path().display().to_string();
    let mut unit_env: Vec<(&str, &str)> = environment.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    unit_env.push(("STATE_DIRECTORY", &state));
    let gw = GatewayProcess::start_in(Some(var_lib.path()), &config, &unit_env, &[]);
    let https = gw.https.expect("https");

    let shell = |args: &[&str], stdin: &str| command_in(Some(shell.path()), &config, &[], args, stdin);
    let (code, out) = shell(&["user", "set-password", "101"], "Correct horse 42!\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("no running gateway"), "through the running gateway: {out}");
    assert_eq!(password_login(https, "Correct horse 42!").await, 303, "the gateway has the password");
    let (code, users) = shell(&["user", "list"], "");
    assert!(code == Some(0) && users.contains("1 active sessions"), "{users}");
    assert!(var_lib.path().join("store.db").is_file());
    assert!(!etc_dir.path().join("store.db").exists(), "no store next to the configuration");
    drop(gw);

    // Stopped: the commands still find the store, and say that no gateway runs.
    let (code, out) = shell(&["user", "list"], "");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no running gateway uses this store"), "{out}");

    // Another configuration (a copy elsewhere, a typo in the path) would make
    // a store no gateway reads: refused unless asked for.
    let other = TempDir::new("other-etc");
    let other_config = etc(&other, &other.path().join("state"), &upstream.url(), "");
    let (code, out) = command_in(Some(other.path()), &other_config, &[], &["user", "list"], "");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--create") && out.contains("no gateway has used it"), "{out}");
    assert!(!other.path().join("state/store.db").exists(), "nothing made");
    let (code, out) = command_in(Some(other.path()), &other_config, &[], &["user", "list", "--create"], "");
    assert_eq!(code, Some(0), "{out}");
    assert!(other.path().join("state/store.db").is_file());

    // Started by systemd with another state directory than the file's: refused.
    let elsewhere = TempDir::new("elsewhere");
    let dir = elsewhere.path().display().to_string();
    let (code, out) = command_in(None, &config, &[("STATE_DIRECTORY", &dir)], &["serve"], "");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("state_directory") && out.contains("$STATE_DIRECTORY"), "{out}");
}

/// On Redis too: a command refuses a key space no gateway has used, and
/// says when no gateway is running on the one it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_redis_refuse_a_store_no_gateway_has_used() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let (etc_dir, state) = (TempDir::new("etc-redis"), TempDir::new("state-redis"));
    let config = etc(&etc_dir, state.path(), &upstream.url(), "");
    let url = redis.url();
    let env = [("PBXGATE_STORE__URL", url.as_str())];
    let cli = |env: &[(&str, &str)], args: &[&str]| command_in(None, &config, env, args, "");
    let (code, out) = cli(&env, &["user", "list"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("holds no pbxgate store") && out.contains("--create"), "{out}");

    let gw = GatewayProcess::start(&config, &env);
    let (code, out) = cli(&env, &["user", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("no running gateway"), "a gateway runs on it: {out}");
    drop(gw);

    let other = [("PBXGATE_STORE__URL", url.as_str()), ("PBXGATE_STORE__KEY_PREFIX", "other:")];
    let (code, out) = cli(&other, &["history"]);
    assert_eq!(code, Some(2), "another key prefix is another store: {out}");
    let (code, out) = cli(&other, &["history", "--create"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no running gateway uses this store"), "{out}");
    let (code, out) = cli(&other, &["history"]);
    assert_eq!(code, Some(0), "made once, then known: {out}");
}

/// The first admin under systemd, as deploy/README.md says: a one-time
/// password in a root-only file, loaded as a credential (systemd copies it
/// into `$CREDENTIALS_DIRECTORY`), named relative in `gateway.toml`. A root
/// shell (no credentials directory) reads the same file in /etc/pbxgate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_admin_signs_in_with_a_one_time_password_from_a_credential() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = Upstream::start().await;
    let (etc_dir, state, credentials) =
        (TempDir::new("etc-otp"), TempDir::new("state-otp"), TempDir::new("credentials"));
    let bootstrap = "[bootstrap]\nadmin = \"100\"\none_time_password_file = \"admin-otp\"\n";
    let config = etc(&etc_dir, state.path(), &upstream.url(), bootstrap);
    let source = etc_dir.write("admin-otp", "Open sesame 1234\n");
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o600)).unwrap();
    // LoadCredential=admin-otp:/etc/pbxgate/admin-otp
    std::fs::copy(&source, credentials.path().join("admin-otp")).unwrap();
    std::fs::remove_file(&source).unwrap();

    let (code, out) = command_in(None, &config, &[], &["check-config"], "");
    assert_eq!(code, Some(2), "a root shell looks next to gateway.toml: {out}");
    assert!(out.contains("bootstrap.one_time_password_file"), "{out}");

    let dir = credentials.path().display().to_string();
    let state_dir = state.path().display().to_string();
    let unit = [("CREDENTIALS_DIRECTORY", dir.as_str()), ("STATE_DIRECTORY", state_dir.as_str())];
    let gw = GatewayProcess::start_in(Some(state.path()), &config, &unit, &[]);
    gw.wait_for_log(|l| l.contains("one-time admin password armed"));
    let https = gw.https.expect("https");
    let login = || async {
        let headers =
            [("origin", "https://localhost:8443"), ("content-type", "application/x-www-form-urlencoded")];
        let body = "login=100&password=Open+sesame+1234&rd=/";
        https_request(https, "POST", "/.pbxgate/login/password", &headers, body).await.status.as_u16()
    };
    assert_eq!(login().await, 303, "signed in with the credential's password");
    assert_eq!(login().await, 401, "once only");
    assert!(!gw.log_lines().join("\n").contains("Open sesame"), "never logged");
}
