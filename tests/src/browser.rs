//! Headless Chromium (Debian's package) driven over CDP, with a virtual
//! WebAuthn authenticator: see shared/recipes/browser-passkeys.md.

use std::time::{Duration, Instant};

use chromiumoxide::browser::{Browser as Chrome, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::web_authn::{
    AddVirtualAuthenticatorParams, AuthenticatorId, AuthenticatorProtocol, AuthenticatorTransport,
    EnableParams, GetCredentialsParams, VirtualAuthenticatorOptions,
};
use chromiumoxide::Page;
use futures_util::StreamExt;

use crate::TempDir;

pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    chrome: Chrome,
    handler: tokio::task::JoinHandle<()>,
    pub page: Page,
    pub authenticator: AuthenticatorId,
    _profile: TempDir,
}

impl Browser {
    /// Starts Chromium with a fresh profile and a page that has a virtual
    /// platform authenticator (resident keys, user verification).
    pub async fn start() -> Self {
        Self::start_with_key(true, true).await
    }

    /// As [`Browser::start`], with an authenticator that can or cannot keep
    /// resident keys and verify its user (a U2F-style security key can do
    /// neither).
    pub async fn start_with_key(resident_key: bool, user_verification: bool) -> Self {
        assert!(
            std::path::Path::new(CHROMIUM).is_file(),
            "{CHROMIUM} is missing: install it with `apt-get install -y chromium` (scripts/test does this)"
        );
        let profile = TempDir::new("chromium");
        let config = BrowserConfig::builder()
            .chrome_executable(CHROMIUM)
            .no_sandbox()
            .user_data_dir(profile.path())
            .args([
                "disable-gpu",
                "disable-quic",
                "no-first-run",
                "disable-background-networking",
                "disable-component-update",
                "disable-sync",
                "ignore-certificate-errors",
            ])
            .launch_timeout(Duration::from_secs(60))
            .build()
            .expect("browser config");
        let (chrome, mut handler) = Chrome::launch(config).await.expect("launch chromium");
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        let page = chrome.new_page("about:blank").await.expect("new page");
        page.execute(EnableParams::builder().enable_ui(false).build()).await.expect("WebAuthn.enable");
        let options = VirtualAuthenticatorOptions::builder()
            .protocol(AuthenticatorProtocol::Ctap2)
            .transport(AuthenticatorTransport::Internal)
            .has_resident_key(resident_key)
            .has_user_verification(user_verification)
            .is_user_verified(user_verification)
            .automatic_presence_simulation(true)
            .build()
            .expect("authenticator options");
        let authenticator = page
            .execute(AddVirtualAuthenticatorParams::new(options))
            .await
            .expect("add virtual authenticator")
            .result
            .authenticator_id;
        Self { chrome, handler, page, authenticator, _profile: profile }
    }

    pub async fn goto(&self, url: &str) {
        self.page.goto(url).await.unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// Sends `Accept-Language: value` with every request from now on, as a
    /// browser set to that language does.
    /// Lays pages out as a screen `width` CSS pixels wide (390: a phone).
    pub async fn width(&self, width: i64) {
        use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
        self.page
            .execute(SetDeviceMetricsOverrideParams::new(width, 844, 1.0, width < 600))
            .await
            .expect("Emulation.setDeviceMetricsOverride");
    }

    /// Whether the page is laid out wider than `width` CSS pixels (something
    /// spills off a screen that wide; a phone's browser would zoom out).
    pub async fn overflows(&self, width: i64) -> bool {
        self.eval(&format!("document.documentElement.scrollWidth > {width}")).await == true
    }

    pub async fn accept_language(&self, value: &str) {
        use chromiumoxide::cdp::browser_protocol::network::{
            EnableParams, Headers, SetExtraHttpHeadersParams,
        };
        self.page.execute(EnableParams::default()).await.expect("Network.enable");
        let headers = Headers::new(serde_json::json!({ "Accept-Language": value }));
        self.page
            .execute(SetExtraHttpHeadersParams::new(headers))
            .await
            .expect("Network.setExtraHTTPHeaders");
    }

    pub async fn url(&self) -> String {
        self.page.url().await.ok().flatten().unwrap_or_default()
    }

    /// Evaluates JavaScript and returns its (JSON) value.
    pub async fn eval(&self, js: &str) -> serde_json::Value {
        match self.page.evaluate(js).await {
            Ok(result) => result.into_value().unwrap_or(serde_json::Value::Null),
            Err(e) => panic!("evaluate {js}: {e}"),
        }
    }

    /// Waits until `js` evaluates to true (the page may be navigating meanwhile).
    pub async fn wait_until(&self, js: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(result) = self.page.evaluate(js).await {
                if result.into_value::<bool>().unwrap_or(false) {
                    return;
                }
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body ? document.body.innerText : ''").await;
                panic!("timed out waiting for {what}; at {} showing {body}", self.url().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_for_path(&self, path_prefix: &str) {
        self.wait_until(
            &format!("location.pathname.startsWith({path_prefix:?})"),
            &format!("path {path_prefix}"),
        )
        .await;
        self.wait_until("document.readyState === 'complete'", "page loaded").await;
    }

    pub async fn click(&self, selector: &str) {
        self.eval(&format!("document.querySelector({selector:?}).click(), true")).await;
    }

    pub async fn fill(&self, selector: &str, value: &str) {
        self.eval(&format!("document.querySelector({selector:?}).value = {value:?}, true")).await;
    }

    pub async fn text(&self) -> String {
        self.eval("document.body.innerText").await.as_str().unwrap_or_default().to_string()
    }

    /// The passkeys the virtual authenticator holds.
    pub async fn credentials(&self) -> Vec<chromiumoxide::cdp::browser_protocol::web_authn::Credential> {
        self.page
            .execute(GetCredentialsParams::new(self.authenticator.clone()))
            .await
            .expect("WebAuthn.getCredentials")
            .result
            .credentials
    }

    pub async fn close(mut self) {
        let _ = self.chrome.close().await;
        let _ = self.chrome.wait().await;
        self.handler.abort();
    }
}
