//! One conformance suite for every store backend: embedded, one Redis, and a
//! three-master Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use pbxgate::store::{
    now_ms, HistoryEvent, OneTime, PasskeyRecord, RedisOptions, RedisTls, Revocation, Secret, Store,
    StoreError, UserFlags,
};
use pbxgate_e2e::redis::{RedisCluster, RedisSentinel, RedisServer, TlsRedis, SENTINEL_USER};
use pbxgate_e2e::TempDir;

/// A store and whatever keeps it alive.
pub struct Backend {
    pub store: Store,
    pub redis: Option<RedisServer>,
    pub dir: TempDir,
}

impl Backend {
    pub async fn embedded() -> Self {
        let dir = TempDir::new("embedded");
        let store = Store::open("embedded://store.db", "pbxgate:", dir.path()).await.expect("open embedded");
        Self { store, redis: None, dir }
    }

    pub async fn redis() -> Self {
        let redis = RedisServer::start();
        let store =
            Store::open(&redis.url(), "pbxgate:", std::path::Path::new(".")).await.expect("open redis");
        Self { store, redis: Some(redis), dir: TempDir::new("unused") }
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn sleep(n: u64) {
    tokio::time::sleep(ms(n)).await;
}

fn passkey(cred: &str, name: &str) -> PasskeyRecord {
    PasskeyRecord {
        v: 1,
        cred_id: cred.to_string(),
        name: name.to_string(),
        created_ms: now_ms(),
        last_used_ms: None,
        passkey: serde_json::json!({"cred": {"cred_id": cred, "counter": 0}}),
    }
}

// ---- the scenarios ---------------------------------------------------------

pub async fn sessions_slide_and_hit_the_cap(s: &Store) {
    let (secret, session) =
        s.create_session("100", "192.0.2.1", "link", ms(400), ms(1200), now_ms()).await.unwrap();
    let hash = secret.hash();
    assert_eq!(session.ip, "192.0.2.1");
    // Touching every 250 ms keeps it alive past its idle timeout...
    for _ in 0..3 {
        sleep(250).await;
        assert!(s.touch_session(&hash, now_ms()).await.unwrap().is_some(), "alive while used");
    }
    // ... but not past the absolute cap.
    sleep(500).await;
    assert!(s.touch_session(&hash, now_ms()).await.unwrap().is_none(), "ended at the cap");

    let (idle, _) =
        s.create_session("100", "192.0.2.1", "link", ms(200), ms(10_000), now_ms()).await.unwrap();
    sleep(350).await;
    assert!(s.session(&idle.hash(), now_ms()).await.unwrap().is_none(), "ended when idle");
}

pub async fn sessions_list_step_up_and_revoke(s: &Store) {
    let now = now_ms();
    let (a, _) =
        s.create_session("alice", "10.0.0.1", "passkey", ms(60_000), ms(600_000), now).await.unwrap();
    let (b, _) = s.create_session("alice", "10.0.0.2", "link", ms(60_000), ms(600_000), now).await.unwrap();
    let (c, _) = s.create_session("bob", "10.0.0.3", "link", ms(60_000), ms(600_000), now).await.unwrap();
    assert_ne!(a.hash(), b.hash(), "a fresh id every time");
    assert_eq!(s.sessions_of("alice", now_ms()).await.unwrap().len(), 2);

    let until = now_ms() / 1000 + 300;
    assert!(s.unlock(&a.hash(), "/admin/", until, now_ms()).await.unwrap());
    let open = vec![("/admin/".to_string(), until)];
    assert_eq!(s.session(&a.hash(), now_ms()).await.unwrap().unwrap().unlocked, open);
    assert!(s.lock(&a.hash(), now_ms()).await.unwrap(), "an unlock can end early");
    assert_eq!(s.session(&a.hash(), now_ms()).await.unwrap().unwrap().unlocked, vec![]);

    let since = now_ms();
    assert!(s.delete_session(&a.hash()).await.unwrap());
    assert!(s.session(&a.hash(), now_ms()).await.unwrap().is_none());
    assert!(!s.delete_session(&a.hash()).await.unwrap(), "already gone");
    assert_eq!(s.sessions_of("alice", now_ms()).await.unwrap().len(), 1);
    let revoked = s.revoked_since(since).await.unwrap();
    assert!(revoked.iter().any(|(r, _)| *r == Revocation::Session(a.hash())), "other instances learn of it");

    assert_eq!(s.delete_sessions_of("alice").await.unwrap(), 1);
    assert!(s.session(&b.hash(), now_ms()).await.unwrap().is_none());
    assert!(s.sessions_of("alice", now_ms()).await.unwrap().is_empty());
    assert!(s.session(&c.hash(), now_ms()).await.unwrap().is_some(), "bob keeps his");
    assert!(s
        .revoked_since(since)
        .await
        .unwrap()
        .iter()
        .any(|(r, _)| *r == Revocation::User("alice".into())));
}

pub async fn tokens_expire_from_creation_and_revoke(s: &Store) {
    let (t1, token) = s.create_token("alice", "10.0.0.1", "Firefox", ms(600), now_ms()).await.unwrap();
    let (t2, _) = s.create_token("alice", "10.0.0.2", "Chrome", ms(60_000), now_ms()).await.unwrap();
    let (t3, other) = s.create_token("bob", "10.0.0.3", "Safari", ms(60_000), now_ms()).await.unwrap();
    assert_eq!(token.user, "alice");
    let made = Secret::generate().hash();
    assert!(s.record_token_use(&t1.hash(), "10.0.0.9", "Firefox 2", &made, now_ms()).await.unwrap());
    let used = s.token(&t1.hash(), now_ms()).await.unwrap().unwrap();
    assert_eq!((used.last_ip.as_str(), used.user_agent.as_str()), ("10.0.0.9", "Firefox 2"));
    assert_eq!(used.session, Some(made.hex()), "the session it made is remembered");
    assert!(used.last_used_ms.is_some());
    assert_eq!(used.expires_ms, token.expires_ms, "use does not extend a remember token");
    assert_eq!(s.tokens_of("alice", now_ms()).await.unwrap().len(), 2);

    sleep(400).await;
    assert!(s.record_token_use(&t1.hash(), "10.0.0.9", "Firefox 2", &made, now_ms()).await.unwrap());
    sleep(400).await;
    assert!(
        s.token(&t1.hash(), now_ms()).await.unwrap().is_none(),
        "expired 600 ms after creation despite use"
    );
    assert_eq!(s.tokens_of("alice", now_ms()).await.unwrap().len(), 1);

    assert_eq!(s.revoke_token(&other.id).await.unwrap().as_deref(), Some("bob"));
    assert!(s.token(&t3.hash(), now_ms()).await.unwrap().is_none());
    assert_eq!(s.revoke_token(&other.id).await.unwrap(), None, "revoking twice finds nothing");
    assert!(
        !s.record_token_use(&t3.hash(), "10.0.0.3", "Safari", &made, now_ms()).await.unwrap(),
        "a revoked token's use is not recorded"
    );
    assert!(s.token(&t3.hash(), now_ms()).await.unwrap().is_none(), "recording a use never brings it back");
    assert_eq!(s.revoke_tokens_of("alice", now_ms()).await.unwrap(), 1);
    assert!(s.token(&t2.hash(), now_ms()).await.unwrap().is_none());
}

pub async fn one_time_values_are_taken_exactly_once(s: &Store) {
    let link = Secret::generate();
    s.put_once(OneTime::MagicLink, &link, b"alice", ms(30_000)).await.unwrap();
    // A value of one kind is not another kind's.
    assert_eq!(s.take_once(OneTime::Invite, &link).await.unwrap(), None);
    let store = Arc::new(s.clone());
    let takers: Vec<_> = (0..100)
        .map(|_| {
            let (store, link) = (store.clone(), link.clone());
            tokio::spawn(async move { store.take_once(OneTime::MagicLink, &link).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for taker in takers {
        if let Some(value) = taker.await.unwrap() {
            assert_eq!(value, b"alice");
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "100 concurrent takers, exactly one wins");

    let short = Secret::generate();
    s.put_once(OneTime::Ceremony, &short, b"state", ms(200)).await.unwrap();
    sleep(350).await;
    assert_eq!(s.take_once(OneTime::Ceremony, &short).await.unwrap(), None, "expired");
}

pub async fn passkeys_are_unique_across_users(s: &Store) {
    s.add_passkey("alice", &passkey("cred-A", "Laptop")).await.unwrap();
    s.add_passkey("alice", &passkey("cred-B", "Phone")).await.unwrap();
    let stolen = s.add_passkey("mallory", &passkey("cred-A", "Mine now")).await;
    assert_eq!(
        stolen,
        Err(pbxgate::store::AddPasskeyError::Duplicate),
        "another user's credential id is refused"
    );
    assert_eq!(
        s.add_passkey("alice", &passkey("cred-A", "Again")).await,
        Err(pbxgate::store::AddPasskeyError::Duplicate)
    );
    assert_eq!(s.passkey_count("mallory").await.unwrap(), 0);
    assert_eq!(s.passkey_count("alice").await.unwrap(), 2);
    assert_eq!(s.passkey_owner("cred-A").await.unwrap().as_deref(), Some("alice"));

    assert!(s.rename_passkey("alice", "cred-B", "  Work phone ").await.unwrap());
    assert!(!s.rename_passkey("alice", "cred-X", "nope").await.unwrap());
    let updated = serde_json::json!({"cred": {"cred_id": "cred-A", "counter": 7}});
    assert!(s.update_passkey("alice", "cred-A", Some(updated.clone()), now_ms()).await.unwrap());
    let records = s.passkeys_of("alice").await.unwrap();
    let a = records.iter().find(|r| r.cred_id == "cred-A").unwrap();
    assert_eq!(a.passkey, updated);
    assert!(a.last_used_ms.is_some());
    assert_eq!(records.iter().find(|r| r.cred_id == "cred-B").unwrap().name, "Work phone");

    assert!(s.delete_passkey("alice", "cred-A").await.unwrap());
    assert!(!s.delete_passkey("alice", "cred-A").await.unwrap());
    assert_eq!(
        s.passkey_owner("cred-A").await.unwrap(),
        None,
        "a deleted credential may be registered again"
    );
    s.add_passkey("bob", &passkey("cred-A", "Bob's key")).await.unwrap();
    assert_eq!(s.delete_passkeys_of("alice").await.unwrap(), 1);
    assert!(s.passkeys_of("alice").await.unwrap().is_empty());
    assert_eq!(s.passkey_owner("cred-B").await.unwrap(), None);
}

pub async fn user_handles_passwords_and_flags(s: &Store) {
    let handle = s.user_handle("alice").await.unwrap();
    assert_eq!(handle.len(), 36);
    assert_eq!(s.user_handle("alice").await.unwrap(), handle, "stable");
    assert_ne!(s.user_handle("bob").await.unwrap(), handle);
    assert_eq!(s.user_by_handle(&handle).await.unwrap().as_deref(), Some("alice"));
    assert_eq!(s.user_by_handle("00000000-0000-4000-8000-000000000000").await.unwrap(), None);

    assert_eq!(s.password_hash("alice").await.unwrap(), None);
    s.set_password_hash("alice", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA").await.unwrap();
    assert!(s.password_hash("alice").await.unwrap().unwrap().starts_with("$argon2id$"));
    assert!(s.clear_password("alice").await.unwrap());
    assert_eq!(s.password_hash("alice").await.unwrap(), None);

    assert_eq!(s.flags("alice").await.unwrap(), UserFlags::default());
    let flags = UserFlags { v: 1, onboarding_required: true, last_login_ms: Some(5) };
    s.set_flags("alice", &flags).await.unwrap();
    assert_eq!(s.flags("alice").await.unwrap(), flags);
}

pub async fn history_newest_first_and_trimmed(s: &Store) {
    let retention = ms(3_600_000);
    let now = now_ms();
    let event = |user: &str, ago: u64, result: &str| HistoryEvent {
        v: 1,
        id: String::new(),
        user: user.to_string(),
        time_ms: now - ago,
        method: "passkey".into(),
        result: result.into(),
        ip: "10.0.0.1".into(),
        user_agent: "Firefox".into(),
    };
    s.append_history(&event("alice", 7_200_000, "success"), retention, now).await.unwrap();
    s.append_history(&event("alice", 3_000, "success"), retention, now).await.unwrap();
    s.append_history(&event("bob", 2_000, "bad_credentials"), retention, now).await.unwrap();
    s.append_history(&event("alice", 1_000, "network"), retention, now).await.unwrap();
    s.append_history(&event("alice", 1_000, "network"), retention, now).await.unwrap();
    let all = s.history(None, retention, 100, now).await.unwrap();
    assert_eq!(all.len(), 4, "the event older than the retention is gone; identical events stay two");
    assert!(all.windows(2).all(|w| w[0].time_ms >= w[1].time_ms), "newest first");
    let alice = s.history(Some("alice"), retention, 100, now).await.unwrap();
    assert_eq!(alice.len(), 3);
    assert!(alice.iter().all(|e| e.user == "alice"));
    assert_eq!(s.history(None, retention, 2, now).await.unwrap().len(), 2);
}

pub async fn counters_count_within_a_window(s: &Store) {
    for want in 1..=3 {
        assert_eq!(s.hit("login:10.0.0.1", ms(400)).await.unwrap(), want);
    }
    assert_eq!(s.hits("login:10.0.0.1").await.unwrap(), 3);
    assert_eq!(s.hits("login:10.0.0.2").await.unwrap(), 0);
    sleep(550).await;
    assert_eq!(s.hits("login:10.0.0.1").await.unwrap(), 0, "the window ended");
    assert_eq!(s.hit("login:10.0.0.1", ms(400)).await.unwrap(), 1);
}

/// Runs every scenario; the cluster uses this (one cluster for the whole suite).
async fn whole_suite(s: &Store) {
    sessions_slide_and_hit_the_cap(s).await;
    sessions_list_step_up_and_revoke(s).await;
    tokens_expire_from_creation_and_revoke(s).await;
    one_time_values_are_taken_exactly_once(s).await;
    passkeys_are_unique_across_users(s).await;
    user_handles_passwords_and_flags(s).await;
    history_newest_first_and_trimmed(s).await;
    counters_count_within_a_window(s).await;
}

macro_rules! per_backend {
    ($backend:ident: $($scenario:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let b = super::Backend::$backend().await;
                    super::$scenario(&b.store).await;
                }
            )*
        }
    };
}

per_backend!(embedded: sessions_slide_and_hit_the_cap, sessions_list_step_up_and_revoke,
    tokens_expire_from_creation_and_revoke, one_time_values_are_taken_exactly_once,
    passkeys_are_unique_across_users, user_handles_passwords_and_flags, history_newest_first_and_trimmed,
    counters_count_within_a_window);

per_backend!(redis: sessions_slide_and_hit_the_cap, sessions_list_step_up_and_revoke,
    tokens_expire_from_creation_and_revoke, one_time_values_are_taken_exactly_once,
    passkeys_are_unique_across_users, user_handles_passwords_and_flags, history_newest_first_and_trimmed,
    counters_count_within_a_window);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_passes_the_whole_suite() {
    let cluster = RedisCluster::start();
    let store =
        Store::open(&cluster.url(), "pbxgate:", std::path::Path::new(".")).await.expect("open cluster");
    whole_suite(&store).await;
    assert_spread_over_the_masters(&cluster);
}

/// `redis+sentinel://`: the store works on the master the sentinel names,
/// and when that master dies it follows the failover to the promoted replica
/// (another port: only asking the sentinel again finds it), refusing calls
/// meanwhile and keeping what was replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_passes_the_whole_suite_and_follows_a_failover() {
    let mut sentinel = RedisSentinel::start();
    let store =
        Store::open(&sentinel.url(), "pbxgate:", std::path::Path::new(".")).await.expect("open via sentinel");
    whole_suite(&store).await;

    let (session, _) = store
        .create_session("alice", "10.0.0.1", "link", ms(600_000), ms(3_600_000), now_ms())
        .await
        .expect("a session on the master");
    let acked = sentinel.master.cli(&["WAIT", "1", "5000"]);
    assert_eq!(acked.as_deref().map(str::trim), Some("1"), "replicated before the master dies");
    sentinel.master.kill();

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    let found = loop {
        match store.session(&session.hash(), now_ms()).await {
            Ok(found) => break found,
            Err(_) => refused += 1,
        }
        assert!(std::time::Instant::now() < deadline, "the store never followed the failover");
        sleep(200).await;
    };
    assert!(refused > 0, "calls fail while there is no master");
    assert!(found.is_some(), "the session survived the failover");
    assert_eq!(sentinel.master_port(), Some(sentinel.replica.port), "the replica was promoted");
    store.set_password_hash("carol", "$argon2id$v=19$x").await.expect("writes go to the new master");
    assert_eq!(store.password_hash("carol").await.unwrap().as_deref(), Some("$argon2id$v=19$x"));
}

/// `rediss+sentinel://` with `store.ca_file`: TLS to the sentinel and to the
/// master it names, both verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_sentinel_passes_the_whole_suite_with_its_ca() {
    let sentinel = RedisSentinel::start_tls();
    let here = std::path::Path::new(".");
    let tls = RedisTls { ca_file: sentinel.ca_file.clone(), client_cert: None };
    let store =
        Store::open_with(&sentinel.url(), "pbxgate:", here, &with_tls(tls)).await.expect("open via sentinel");
    whole_suite(&store).await;
    assert!(sentinel.master.cli(&["DBSIZE"]).is_some_and(|n| n.trim() != "0"), "the data is on the master");

    assert_refused(&sentinel.url(), &RedisOptions::default(), "an unverified sentinel").await;
}

/// Sentinels with a password of their own (`store.sentinel_password`, and an
/// ACL user with `store.sentinel_username`) watching a master with another
/// (the URL's): the store works with both, and is refused (closed) without
/// either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_sentinel_with_its_own_password_is_asked_with_it() {
    let sentinel = RedisSentinel::start_with_passwords("master-pw", "sentinel-pw");
    let here = std::path::Path::new(".");
    let with = |user: Option<&str>, password: Option<&str>| RedisOptions {
        sentinel_username: user.map(String::from),
        sentinel_password: password.map(String::from),
        ..RedisOptions::default()
    };
    let store = Store::open_with(&sentinel.url(), "pbxgate:", here, &with(None, Some("sentinel-pw")))
        .await
        .expect("open via sentinel");
    whole_suite(&store).await;
    assert!(sentinel.master.cli(&["DBSIZE"]).is_some_and(|n| n.trim() != "0"), "the data is on the master");

    let acl_password = format!("sentinel-pw-{SENTINEL_USER}");
    let as_user =
        Store::open_with(&sentinel.url(), "pbxgate:", here, &with(Some(SENTINEL_USER), Some(&acl_password)))
            .await
            .expect("open as the sentinel's ACL user");
    as_user.ping().await.expect("the sentinel's ACL user is let in");

    let without_master_password = sentinel.url().replace(":master-pw@", "");
    let refused = [
        (sentinel.url(), with(None, None), "no sentinel password"),
        (sentinel.url(), with(None, Some("wrong")), "a wrong sentinel password"),
        (
            sentinel.url(),
            with(Some(SENTINEL_USER), Some("sentinel-pw")),
            "the ACL user with another's password",
        ),
        (without_master_password, with(None, Some("sentinel-pw")), "no master password"),
    ];
    for (url, options, why) in refused {
        assert_refused(&url, &options, why).await;
    }
}

fn assert_spread_over_the_masters(cluster: &RedisCluster) {
    let keys_per_node: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).and_then(|s| s.trim().parse().ok()).unwrap_or(0))
        .collect();
    assert!(
        keys_per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "keys on one node only: {keys_per_node:?}"
    );
}

/// `rediss+cluster://` with `store.ca_file`: the certificates reach every
/// node the cluster sends the client to, and a node it cannot verify is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_cluster_passes_the_whole_suite_with_its_ca() {
    let cluster = RedisCluster::start_tls();
    let here = std::path::Path::new(".");
    let tls = RedisTls { ca_file: cluster.ca_file.clone(), client_cert: None };
    let store =
        Store::open_with(&cluster.url(), "pbxgate:", here, &with_tls(tls)).await.expect("open TLS cluster");
    whole_suite(&store).await;
    assert_spread_over_the_masters(&cluster);

    assert_refused(&cluster.url(), &RedisOptions::default(), "an unverified cluster").await;
}

/// A Redis store that opens (connecting is retried on use) but that `options`
/// cannot reach: every call fails.
async fn assert_refused(url: &str, options: &RedisOptions, why: &str) {
    let store = Store::open_with(url, "pbxgate:", std::path::Path::new("."), options)
        .await
        .expect("opens (connecting is retried on use)");
    assert!(store.ping().await.is_err(), "{why}: refused");
}

/// `pbxgate` commands reach an embedded store that a running gateway holds
/// through the socket it serves: every scenario, every primitive, over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_passes_the_whole_suite_through_a_gateways_socket() {
    let held = Backend::embedded().await;
    let file = held.dir.path().join("store.db");
    let socket = held.store.serve_commands().expect("embedded: a socket").expect("bound");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(socket.path()).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the owner's only");

    let locked = Store::open("embedded://store.db", "pbxgate:", held.dir.path()).await;
    assert!(matches!(locked, Err(StoreError::Locked(_))), "held by the gateway: {locked:?}");
    let remote = Store::through_gateway(&file, "pbxgate:").await.expect("through the socket");
    whole_suite(&remote).await;
    // What went through the socket is in the gateway's own store.
    remote.set_password_hash("carol", "$argon2id$v=19$c").await.unwrap();
    assert_eq!(held.store.password_hash("carol").await.unwrap().as_deref(), Some("$argon2id$v=19$c"));

    // Once the gateway lets go, the socket is gone and the file opens directly.
    let path = socket.path().to_path_buf();
    drop(socket);
    assert!(!path.exists(), "the socket is removed");
    assert!(Store::through_gateway(&file, "pbxgate:").await.is_err(), "no gateway, no answer");
    drop(held.store);
    // The socket's aborted tasks let go of the store as the runtime drops them.
    let mut direct = None;
    for _ in 0..50 {
        if let Ok(store) = Store::open("embedded://store.db", "pbxgate:", held.dir.path()).await {
            direct = Some(store);
            break;
        }
        sleep(20).await;
    }
    let direct = direct.expect("the file opens once the gateway has let go");
    assert_eq!(direct.password_hash("carol").await.unwrap().as_deref(), Some("$argon2id$v=19$c"));
}

// ---- persistence, outages, secrets at rest --------------------------------

/// A session signed out while another request was changing it (between
/// that change's read and its write) stays signed out: the write does not
/// bring it back.
async fn a_signed_out_session_stays_out_under_a_concurrent_change(s: &Store) {
    let (secret, _) =
        s.create_session("alice", "10.0.0.1", "link", ms(60_000), ms(600_000), now_ms()).await.unwrap();
    let hash = secret.hash();
    let changed = s
        .update_session(&hash, now_ms(), |session| {
            // Signed out right here, after the change read the session.
            let deleted = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(s.delete_session(&hash))
            });
            assert!(deleted.unwrap(), "signed out");
            session.unlocked = vec![("/admin/".into(), now_ms() / 1000 + 60)];
        })
        .await
        .unwrap();
    assert!(!changed, "the change finds the session gone");
    assert!(s.session(&hash, now_ms()).await.unwrap().is_none(), "still signed out");
    assert!(s.current_session(&hash, now_ms()).await.unwrap().is_none());
}

/// Two changes to one session that overlap (the second written between the
/// first one's read and its write): the first is made again on what the
/// store then holds, so neither is lost.
async fn overlapping_changes_to_a_session_both_land(s: &Store) {
    let (secret, _) =
        s.create_session("alice", "10.0.0.1", "link", ms(60_000), ms(600_000), now_ms()).await.unwrap();
    let hash = secret.hash();
    let until = now_ms() / 1000 + 60;
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let changed = s
        .update_session(&hash, now_ms(), |session| {
            if attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                // Another request changes the session right here.
                let other = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current()
                        .block_on(s.update_session(&hash, now_ms(), |s| s.must_register_passkey = true))
                });
                assert!(other.unwrap());
            }
            session.unlocked = vec![("/admin/".into(), until)];
        })
        .await
        .unwrap();
    assert!(changed);
    assert_eq!(attempts.into_inner(), 2, "made again after the other change");
    let stored = s.session(&hash, now_ms()).await.unwrap().expect("live");
    assert!(stored.must_register_passkey, "the other change kept");
    assert_eq!(stored.unlocked, vec![("/admin/".to_string(), until)], "this change made");
    let cached = s.current_session(&hash, now_ms()).await.unwrap().expect("live");
    assert!(cached.must_register_passkey && cached.unlocked == vec![("/admin/".to_string(), until)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_overlapping_changes_to_a_session_both_land() {
    let b = Backend::embedded().await;
    overlapping_changes_to_a_session_both_land(&b.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_overlapping_changes_to_a_session_both_land() {
    let b = Backend::redis().await;
    overlapping_changes_to_a_session_both_land(&b.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_signed_out_session_stays_out_under_a_concurrent_change() {
    let b = Backend::embedded().await;
    a_signed_out_session_stays_out_under_a_concurrent_change(&b.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_signed_out_session_stays_out_under_a_concurrent_change() {
    let b = Backend::redis().await;
    a_signed_out_session_stays_out_under_a_concurrent_change(&b.store).await;
}

#[tokio::test]
async fn embedded_store_keeps_credentials_across_reopen() {
    let b = Backend::embedded().await;
    b.store.add_passkey("alice", &passkey("cred-P", "Laptop")).await.unwrap();
    b.store.set_password_hash("alice", "$argon2id$v=19$x").await.unwrap();
    let (session, _) =
        b.store.create_session("alice", "10.0.0.1", "link", ms(60_000), ms(600_000), now_ms()).await.unwrap();
    s_touch(&b.store, &session).await;
    let dir = b.dir;
    drop(b.store);
    let reopened = Store::open("embedded://store.db", "pbxgate:", dir.path()).await.expect("reopen");
    assert_eq!(reopened.passkeys_of("alice").await.unwrap().len(), 1);
    assert_eq!(reopened.password_hash("alice").await.unwrap().as_deref(), Some("$argon2id$v=19$x"));
    assert!(
        reopened.session(&session.hash(), now_ms()).await.unwrap().is_some(),
        "lazy touches were flushed on close"
    );
}

async fn s_touch(store: &Store, session: &Secret) {
    assert!(store.touch_session(&session.hash(), now_ms()).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_data_keeps_credentials() {
    let mut b = Backend::redis().await;
    b.store.add_passkey("alice", &passkey("cred-R", "Laptop")).await.unwrap();
    let (token, _) =
        b.store.create_token("alice", "10.0.0.1", "Firefox", ms(600_000), now_ms()).await.unwrap();
    b.redis.as_mut().unwrap().restart();
    // The same store (no gateway restart) reconnects and finds everything.
    let mut found = None;
    for _ in 0..50 {
        if let Ok(records) = b.store.passkeys_of("alice").await {
            found = Some(records);
            break;
        }
        sleep(100).await;
    }
    assert_eq!(found.expect("store works again after the restart").len(), 1);
    assert!(b.store.token(&token.hash(), now_ms()).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_gives_errors_then_recovers() {
    let mut b = Backend::redis().await;
    b.store.set_password_hash("alice", "$argon2id$before").await.unwrap();
    b.redis.as_mut().unwrap().kill();
    let started = std::time::Instant::now();
    let result = b.store.password_hash("alice").await;
    assert!(result.is_err(), "a dead Redis is an error, not an empty answer: {result:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "no hang past the deadline: {:?}", started.elapsed());
    assert!(b.store.ping().await.is_err());
    b.redis.as_mut().unwrap().start_again();
    let mut recovered = false;
    for _ in 0..100 {
        if b.store.password_hash("alice").await.is_ok_and(|p| p.as_deref() == Some("$argon2id$before")) {
            recovered = true;
            break;
        }
        sleep(100).await;
    }
    assert!(recovered, "works again once redis-server is back, same process");
}

/// What a thief with a dump of the store would find: no live secret in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dump_holds_no_secret_in_clear() {
    for backend in ["embedded", "redis"] {
        let b = if backend == "embedded" { Backend::embedded().await } else { Backend::redis().await };
        let s = &b.store;
        let (session, _) =
            s.create_session("alice", "10.0.0.1", "link", ms(60_000), ms(600_000), now_ms()).await.unwrap();
        let (token, _) = s.create_token("alice", "10.0.0.1", "Firefox", ms(600_000), now_ms()).await.unwrap();
        let link = Secret::generate();
        s.put_once(OneTime::MagicLink, &link, b"alice", ms(60_000)).await.unwrap();
        let otp = Secret::generate();
        s.put_once(OneTime::AdminPassword, &otp, b"100", ms(60_000)).await.unwrap();
        let dump = match &b.redis {
            None => std::fs::read(b.dir.path().join("store.db")).expect("read embedded file"),
            Some(redis) => {
                let keys = redis.cli(&["--scan"]).expect("scan");
                let mut dump = keys.clone().into_bytes();
                for key in keys.lines().filter(|k| !k.is_empty()) {
                    let kind = redis.cli(&["TYPE", key]).unwrap_or_default();
                    let value = match kind.trim() {
                        "string" => redis.cli(&["GET", key]),
                        "hash" => redis.cli(&["HGETALL", key]),
                        "set" => redis.cli(&["SMEMBERS", key]),
                        "zset" => redis.cli(&["ZRANGE", key, "0", "-1"]),
                        _ => None,
                    };
                    dump.extend(value.unwrap_or_default().into_bytes());
                }
                assert!(dump.len() > 200, "the dump has content");
                dump
            }
        };
        let haystack = String::from_utf8_lossy(&dump);
        assert!(haystack.contains(&session.hash().hex()), "{backend}: the dump does hold the hashes");
        for (what, secret) in
            [("session", &session), ("token", &token), ("link", &link), ("one-time password", &otp)]
        {
            assert!(!haystack.contains(secret.expose()), "{backend}: {what} in clear in the store");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_while_the_store_is_unreachable() {
    use pbxgate_e2e::client::{http_get, https_get};
    let upstream = pbxgate_e2e::Upstream::start().await;
    let mut redis = RedisServer::start();
    let overrides = format!("[store]\nurl = \"{}\"\n", redis.url());
    let gw = pbxgate_e2e::TestGateway::start(&upstream.url(), pbxgate_e2e::TEST_POLICY, &overrides).await;
    let admin = gw.addrs.admin.expect("admin listener");
    assert_eq!(https_get(gw.https(), "/.pbxgate/readyz", &[]).await.status, 200);
    assert_eq!(http_get(admin, "/readyz", &[]).await.status, 200);

    redis.kill();
    let reply = https_get(gw.https(), "/.pbxgate/readyz", &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json(), serde_json::json!({"status": "unavailable"}));
    assert_eq!(http_get(admin, "/readyz", &[]).await.status, 503);
    assert_eq!(http_get(admin, "/healthz", &[]).await.status, 200, "alive, just not ready");
    let metrics = http_get(admin, "/metrics", &[]).await.text();
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pbxgate_store_errors_total{backend=\"redis\"} ")?.parse().ok())
        .expect("store error metric");
    assert!(errors >= 1, "store errors are counted: {metrics}");
    assert!(metrics.contains("pbxgate_store_duration_seconds_count"));

    redis.start_again();
    let mut ready = false;
    for _ in 0..50 {
        if https_get(gw.https(), "/.pbxgate/readyz", &[]).await.status == 200 {
            ready = true;
            break;
        }
        sleep(100).await;
    }
    assert!(ready, "ready again once Redis is back");
}

// ---- Redis over TLS (rediss://) --------------------------------------------

fn with_tls(tls: RedisTls) -> RedisOptions {
    RedisOptions { tls, ..RedisOptions::default() }
}

async fn open_tls(redis: &TlsRedis, tls: RedisTls) -> Store {
    Store::open_with(&redis.url(), "pbxgate:", std::path::Path::new("."), &with_tls(tls))
        .await
        .expect("opens (connecting is retried on use)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_is_used_with_its_ca_and_refused_without_it() {
    let redis = TlsRedis::start(None);
    let trusted =
        open_tls(&redis, RedisTls { ca_file: Some(redis.ca_file.clone()), client_cert: None }).await;
    let (session, _) = trusted
        .create_session("alice", "10.0.0.1", "link", ms(60_000), ms(600_000), now_ms())
        .await
        .expect("works over TLS with the configured CA");
    assert!(trusted.session(&session.hash(), now_ms()).await.unwrap().is_some());

    // The system's roots do not know this certificate: no connection, and
    // every call fails (the gateway refuses, fail closed).
    let system_roots = open_tls(&redis, RedisTls::default()).await;
    let refused = system_roots.session(&session.hash(), now_ms()).await;
    assert!(refused.is_err(), "unverified server refused: {refused:?}");

    // Nor does a CA that did not sign it.
    let elsewhere = TempDir::new("other-ca");
    let other_ca = elsewhere.write("other.pem", pbxgate_e2e::certificate(&["127.0.0.1"]).0);
    let wrong_ca = open_tls(&redis, RedisTls { ca_file: Some(other_ca), client_cert: None }).await;
    assert!(wrong_ca.ping().await.is_err(), "a certificate from another CA is refused");

    // A CA file with no certificate in it is a configuration error at once.
    let not_pem = elsewhere.write("not.pem", "not a certificate");
    let tls = RedisTls { ca_file: Some(not_pem), client_cert: None };
    let opened = Store::open_with(&redis.url(), "pbxgate:", std::path::Path::new("."), &with_tls(tls)).await;
    assert!(
        matches!(opened, Err(StoreError::Config(ref e)) if e.contains("no PEM certificate")),
        "{opened:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_asking_for_a_client_certificate_gets_the_configured_one() {
    let dir = TempDir::new("redis-client");
    let (cert, key, _) = pbxgate_e2e::certificate(&["pbxgate"]);
    let (cert, key) = (dir.write("client.pem", cert), dir.write("client.key", key));
    let redis = TlsRedis::start(Some(&cert));
    let ca_file = Some(redis.ca_file.clone());

    let with = open_tls(&redis, RedisTls { ca_file: ca_file.clone(), client_cert: Some((cert, key)) }).await;
    with.set_password_hash("bob", "$argon2id$v=19$x").await.expect("works with the client certificate");
    assert_eq!(with.password_hash("bob").await.unwrap().as_deref(), Some("$argon2id$v=19$x"));

    let without = open_tls(&redis, RedisTls { ca_file, client_cert: None }).await;
    assert!(without.password_hash("bob").await.is_err(), "Redis refuses a client without one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_a_tls_redis_from_its_configuration() {
    use pbxgate_e2e::client::https_get;
    let upstream = pbxgate_e2e::Upstream::start().await;
    let redis = TlsRedis::start(None);
    let overrides = format!(
        "[store]\nurl = \"{}\"\nca_file = {:?}\n",
        redis.url().replace("127.0.0.1", "localhost"),
        redis.ca_file
    );
    let gw = pbxgate_e2e::TestGateway::start(&upstream.url(), pbxgate_e2e::TEST_POLICY, &overrides).await;
    assert_eq!(https_get(gw.https(), "/.pbxgate/readyz", &[]).await.status, 200, "the store answers");
}
