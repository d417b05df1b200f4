//! A real SMTP server for tests: aiosmtpd (Debian's python3-aiosmtpd)
//! delivering into a Maildir that the test reads.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::free_port;
use crate::TempDir;

/// Debian's Python, where python3-aiosmtpd installs (not a pyenv one on PATH).
const PYTHON: &str = "/usr/bin/python3";

pub struct SmtpServer {
    pub port: u16,
    child: Child,
    dir: TempDir,
}

impl SmtpServer {
    pub fn start() -> Self {
        let found = Command::new(PYTHON).args(["-c", "import aiosmtpd"]).status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "aiosmtpd is missing: install it with `apt-get install -y python3-aiosmtpd` (scripts/test does this)"
        );
        let dir = TempDir::new("smtp");
        let maildir = dir.path().join("mail");
        let port = free_port(false);
        let child = Command::new(PYTHON)
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(&maildir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start aiosmtpd");
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { port, child, dir }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    fn new_messages(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("mail").join("new"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        // Maildir names are "<secs>.M<usec>P<pid>Q<n>.<host>" with unpadded
        // microseconds: by name, two messages in one second can sort out of
        // order. Q<n> counts the server's deliveries: arrival order.
        files.sort_by_key(|f| (delivery_number(f), f.clone()));
        files
    }

    /// Waits for a message to `to` and returns (headers, decoded text part,
    /// decoded html part), parsed by Python's email package.
    pub fn wait_for(&self, to: &str, seen: usize) -> Email {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let files = self.new_messages();
            for file in files.iter().skip(seen) {
                let email = parse(file);
                if email.to.contains(to) {
                    return email;
                }
            }
            assert!(Instant::now() < deadline, "no email to {to} arrived");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn count(&self) -> usize {
        self.new_messages().len()
    }
}

/// The `Q<n>` delivery counter in a Maildir file name.
fn delivery_number(file: &std::path::Path) -> u64 {
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.split_once('Q').and_then(|(_, rest)| rest.split('.').next()?.parse().ok()).unwrap_or(u64::MAX)
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Email {
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl Email {
    /// The sign-in link in the text part.
    pub fn link(&self) -> String {
        let start = self.text.find("http").expect("a link in the email");
        self.text[start..].split_whitespace().next().expect("link").to_string()
    }
}

fn parse(file: &std::path::Path) -> Email {
    let script = r#"
import email, json, sys
from email import policy
m = email.message_from_binary_file(open(sys.argv[1], 'rb'), policy=policy.default)
text = m.get_body(preferencelist=('plain',))
html = m.get_body(preferencelist=('html',))
print(json.dumps({"to": str(m['To']), "subject": str(m['Subject']),
  "text": text.get_content() if text else "", "html": html.get_content() if html else ""}))
"#;
    let out = Command::new(PYTHON).args(["-c", script]).arg(file).output().expect("python3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("parsed email");
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Email { to: s("to"), subject: s("subject"), text: s("text"), html: s("html") }
}
