//! The real `pbxgate` binary as a child process: for signals, exit codes and
//! the gateway's own memory use.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `target/<profile>/pbxgate`, next to this test binary's `deps/` directory.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("pbxgate");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build -p pbxgate` (scripts/test does this)",
        bin.display()
    );
    bin
}

/// Runs `pbxgate ARGS --config CONFIG` with `env` and `stdin`: its exit code
/// and everything it printed (stdout, then stderr).
pub fn command(config: &Path, env: &[(&str, &str)], args: &[&str], stdin: &str) -> (Option<i32>, String) {
    command_in(None, config, env, args, stdin)
}

/// As [`command`], run from the directory `cwd` (a root shell's, anywhere).
pub fn command_in(
    cwd: Option<&Path>,
    config: &Path,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: &str,
) -> (Option<i32>, String) {
    use std::io::Write;
    let mut command = Command::new(binary());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let mut child = command
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pbxgate");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("pbxgate's output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

pub struct GatewayProcess {
    pub child: Child,
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts `pbxgate serve --config <config>` with JSON logs and waits until
    /// it reports its listeners.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with_args(config, env, &[])
    }

    /// As [`GatewayProcess::start`], with more `serve` arguments.
    pub fn start_with_args(config: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        Self::start_in(None, config, env, args)
    }

    /// As [`GatewayProcess::start_with_args`], in the working directory `cwd`
    /// (as a systemd unit's `WorkingDirectory=`).
    pub fn start_in(cwd: Option<&Path>, config: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut command = Command::new(binary());
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .args(["serve", "--config"])
            .arg(config)
            .args(args)
            .env("PBXGATE_LOG__FORMAT", "json")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pbxgate");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        let mut process = Self { child, https: None, http: None, admin: None, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for line in process.log_lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if v["message"] != "listening" {
                    continue;
                }
                let addr = v["addr"].as_str().and_then(|a| a.parse().ok());
                match v["listener"].as_str() {
                    Some("https") => process.https = addr,
                    Some("http") => process.http = addr,
                    Some("admin") => process.admin = addr,
                    _ => {}
                }
            }
            if process.https.is_some() || process.http.is_some() {
                // Give the remaining listener lines a moment to arrive.
                std::thread::sleep(Duration::from_millis(100));
                return process;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("pbxgate exited early ({status}):\n{}", process.log_lines().join("\n"));
            }
            assert!(Instant::now() < deadline, "pbxgate did not start:\n{}", process.log_lines().join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits (up to 5 s) for a log line that `wanted` accepts: access lines
    /// are written in batches, at the latest half a second after the request.
    pub fn wait_for_log(&self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|l| wanted(l)) {
                return line;
            }
            assert!(Instant::now() < deadline, "no such log line in:\n{}", self.log_lines().join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    /// Peak resident memory of the gateway process, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    /// Waits for the process to exit and returns whether it exited with 0.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
