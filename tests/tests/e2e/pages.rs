//! The pages in the person's language and the operator's brand, in a real browser.

use pbxgate_e2e::browser::Browser;
use pbxgate_e2e::client::https_get;

use crate::login::Rig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_gets_its_language_and_can_pick_another() {
    let rig = Rig::start("").await;
    let origin = rig.origin();
    let browser = Browser::start().await;
    browser.accept_language("de-CH, de;q=0.9, en;q=0.5").await;

    browser.goto(&format!("{origin}/calls?view=list")).await;
    browser.wait_for_path("/.pbxgate/login").await;
    assert_eq!(browser.eval("document.documentElement.lang").await, "de");
    assert_eq!(browser.eval("document.documentElement.dir").await, "ltr");
    let text = browser.text().await;
    assert!(text.contains("Anmeldelink per E-Mail senden"), "{text}");
    assert!(text.contains("Nebenstelle oder E-Mail-Adresse"), "{text}");
    assert!(!text.contains("Email me a sign-in link"), "no English left: {text}");

    // The picker: French, keeping where the person was going, and remembered.
    browser.click("#languages a[data-lang='fr']").await;
    browser.wait_until("document.documentElement.lang === 'fr'", "the French page").await;
    assert_eq!(browser.eval("document.getElementById('rd').value").await, "/calls?view=list");
    let text = browser.text().await;
    assert!(text.contains("Recevoir un lien de connexion par e-mail"), "{text}");
    browser.goto(&format!("{origin}/.pbxgate/login")).await;
    browser.wait_until("document.readyState === 'complete'", "page loaded").await;
    assert_eq!(browser.eval("document.documentElement.lang").await, "fr", "the choice is remembered");

    // Asking for a link: the answer in French, the same for any name.
    browser.fill("#login", "nobody@example.com").await;
    browser.click("#link-button").await;
    browser.wait_for_path("/.pbxgate/login/link").await;
    let text = browser.text().await;
    assert!(text.contains("Si un compte correspond") && text.contains("15 minutes"), "{text}");

    // An error page too.
    browser.goto(&format!("{origin}/.pbxgate/no-such-page")).await;
    browser.wait_until("document.body.dataset.page === 'error'", "the error page").await;
    assert!(browser.text().await.contains("Cette page n’existe pas."), "{}", browser.text().await);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_errors_and_emails_speak_the_persons_language() {
    let policy = format!(
        "{}\n[[user]]\nname = \"103\"\nemail = \"dora@example.com\"\nrole = \"user\"\nlanguage = \"de-AT\"\n",
        crate::login::LOGIN_POLICY
    );
    let rig = Rig::start_with(&policy, "").await;
    let addr = rig.gw.https();

    // The email is in the person's own language, whatever the browser asked for.
    let seen = rig.smtp.count();
    let reply = rig
        .post("/.pbxgate/login/link", "login=dora%40example.com&rd=%2F", &[("accept-language", "fr")])
        .await;
    assert!(reply.text().contains("Si un compte correspond"), "the page in the browser's: {}", reply.text());
    let email = rig.smtp.wait_for("dora@example.com", seen);
    assert_eq!(email.subject, "Bei PBX anmelden", "{email:?}");
    assert!(email.text.contains("15 Minuten gültig") && email.text.contains("Konto: 103"), "{}", email.text);
    assert!(email.html.contains("<html lang=\"de\""), "{}", email.html);

    let reply = https_get(addr, "/.pbxgate/api/me", &[("accept-language", "nl")]).await;
    assert_eq!(reply.status, 401);
    let body = reply.json();
    assert_eq!(body["error"], "login_required", "the code stays the same: {body}");
    assert_eq!(body["message"], "Log in om verder te gaan.", "{body}");
    let reply = https_get(addr, "/.pbxgate/api/me", &[("host", "localhost")]).await;
    assert_eq!(reply.json()["message"], "Please sign in.");
}

/// An error page never leaves a person stuck: it offers the start page,
/// their account and another sign-in, in their language.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_pages_offer_a_way_on() {
    let rig = Rig::start("").await;
    let headers = [("accept", "text/html"), ("accept-language", "de")];
    let reply = https_get(rig.gw.https(), "/.pbxgate/nothing-here", &headers).await;
    assert_eq!(reply.status, 404);
    let page = reply.text();
    for (id, href, words) in [
        ("way-home", "/", "Zur Startseite"),
        ("way-account", "/.pbxgate/account", "Ihr Konto"),
        ("way-switch", "/.pbxgate/logout", "Mit einem anderen Konto anmelden"),
    ] {
        let link = format!("<a href=\"{href}\" id=\"{id}\">{words}</a>");
        assert!(page.contains(&link), "{link} in {page}");
    }
}

/// A security key that cannot be a passkey here (no resident key, no user
/// verification) is named as a possible cause, not only as a cancelled request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_cannot_be_a_passkey_says_so() {
    let rig = Rig::start("").await;
    let origin = rig.origin();
    let browser = Browser::start_with_key(false, false).await;
    browser.goto(&format!("{origin}/.pbxgate/login?rd=/welcome")).await;
    browser.wait_for_path("/.pbxgate/login").await;
    browser.fill("#login", "100").await;
    browser.click("#link-button").await;
    let link = rig.smtp.wait_for("alice@example.com", 0).link();
    browser.goto(&link).await;
    browser.wait_for_path("/.pbxgate/passkey-offer").await;
    browser.click("#register-button").await;
    browser.wait_until("!document.getElementById('status').hidden", "a message about the key").await;
    let said = browser.eval("document.getElementById('status').textContent").await;
    assert_eq!(
        said,
        "The passkey request was cancelled or timed out. If you did not cancel it, this key cannot be used \
         here: it must be a passkey that asks for your PIN, fingerprint or face.",
        "{said}"
    );
    assert!(browser.credentials().await.is_empty());
    browser.close().await;
}
