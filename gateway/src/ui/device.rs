//! "Chrome on Linux" from a User-Agent string, for people reading the admin
//! pages: the browser family and the system, nothing more. An agent that
//! names neither is shown as it came (escaped by the templates).

/// (browser, system) when the agent names them.
pub fn describe(user_agent: &str) -> Option<(&'static str, &'static str)> {
    let has = |needle: &str| user_agent.contains(needle);
    // Order matters: Edge and Opera say "Chrome", Chrome says "Safari".
    let browser = if has("Edg/") || has("EdgA/") || has("EdgiOS/") {
        "Edge"
    } else if has("OPR/") {
        "Opera"
    } else if has("Firefox/") || has("FxiOS/") {
        "Firefox"
    } else if has("Chrome/") || has("CriOS/") || has("Chromium/") {
        "Chrome"
    } else if has("Safari/") && has("Version/") {
        "Safari"
    } else {
        return None;
    };
    // Android and iOS agents also name Linux and Mac OS X.
    let system = if has("Android") {
        "Android"
    } else if has("iPhone") {
        "iPhone"
    } else if has("iPad") {
        "iPad"
    } else if has("Windows") {
        "Windows"
    } else if has("CrOS") {
        "ChromeOS"
    } else if has("Mac OS X") || has("Macintosh") {
        "macOS"
    } else if has("Linux") {
        "Linux"
    } else {
        return None;
    };
    Some((browser, system))
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn common_agents() {
        for (agent, want) in [
            ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36", Some(("Chrome", "Linux"))),
            ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0", Some(("Edge", "Windows"))),
            ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1", Some(("Safari", "iPhone"))),
            ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14.7; rv:133.0) Gecko/20100101 Firefox/133.0", Some(("Firefox", "macOS"))),
            ("Mozilla/5.0 (Linux; Android 15; Pixel 9) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36", Some(("Chrome", "Android"))),
            ("curl/8.5.0", None),
            ("<script>alert(1)</script>", None),
        ] {
            assert_eq!(describe(agent), want, "{agent}");
        }
    }
}
