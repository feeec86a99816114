//! End-to-end test support for Tern: the [`TernServer`] fixture runs the real `tern` binary on
//! private loopback ports with its own data directory, and [`SmtpClient`] is a deliberately
//! small raw-socket SMTP client for the protocol edge cases real mail clients never produce
//! (smuggling, injection, oversized lines, PROXY headers). [`sink::Sink`] is the other side:
//! a scripted receiving SMTP server for testing Tern's delivery.
//!
//! Every test starts its own server, so tests run in parallel. Ports are picked outside the
//! kernel's ephemeral range (where thousands of client sockets come and go during the
//! concurrency tests) and a start that loses a port race is retried with fresh ports.

pub mod sink;
pub mod smtp;
pub mod tls;

pub use smtp::{AsyncSmtpClient, Reply, SmtpClient};

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server gets to answer `/health` after spawning. A debug build starts in well under
/// a second; the margin is for a 2-core machine running the whole suite in parallel.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The hostname every fixture server is configured with, so tests can look for it in replies.
pub const HOSTNAME: &str = "tern.test";

/// Path of the `tern` binary under test: `$TERN_BIN`, else `tern` in the same cargo profile
/// directory as the running test executable (`target/debug/deps/x-123` → `target/debug/tern`).
pub fn tern_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TERN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("tern");
        if candidate.is_file() {
            return candidate;
        }
        // Stop at the profile directory (the one holding `deps/`).
        if d.join("deps").is_dir() {
            break;
        }
        dir = d.parent();
    }
    panic!(
        "tern binary not found next to {} (set TERN_BIN or run `cargo build -p tern` first)",
        exe.display()
    );
}

/// Run `tern` with arguments and return its output (for the offline subcommands).
pub fn tern_cmd(args: &[&str]) -> Output {
    Command::new(tern_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running tern {args:?}: {e}"))
}

/// `tern auth hash PASSWORD`: the argon2id PHC string the server expects in `[auth] users`.
pub fn hash_password(password: &str) -> String {
    let out = tern_cmd(&["auth", "hash", password]);
    assert!(
        out.status.success(),
        "tern auth hash failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout).expect("utf-8 hash");
    let hash = hash.trim().to_string();
    assert!(
        hash.starts_with("$argon2id$"),
        "not an argon2id PHC hash: {hash:?}"
    );
    hash
}

/// Raise this process's open-file soft limit to the hard limit (children inherit it). The
/// concurrency tests need a few thousand descriptors on each side.
pub fn raise_nofile_limit() -> u64 {
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        lim.rlim_cur
    }
}

static PORT_SEQ: AtomicU64 = AtomicU64::new(0);

/// Reserve `n` distinct free TCP ports on 127.0.0.1 in 20000..32000 (below the ephemeral range
/// 32768+, so client sockets never sit on them). The listeners are returned so the caller holds
/// the ports until just before the server binds them.
fn reserve_ports(n: usize) -> Vec<TcpListener> {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ ((std::process::id() as u64) << 20)
        ^ PORT_SEQ
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut x = seed | 1;
    let mut out: Vec<TcpListener> = Vec::new();
    while out.len() < n {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 12000) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            out.push(l);
        }
    }
    out
}

/// One spooled message as `tern spool list` prints it. `raw` keeps every field, so tests can
/// use fields the contract adds later without changing this type.
#[derive(Debug, Clone)]
pub struct SpoolEntry {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: u64,
    pub raw: serde_json::Value,
}

/// Builder for a [`TernServer`]: starts from the fixture's config (private ports, a temp data
/// dir, hostname `tern.test`, all four listeners on) and lets a test set any key.
pub struct TernServerBuilder {
    config: toml::Table,
    env: Vec<(String, String)>,
    users: Vec<(String, String)>,
}

impl Default for TernServerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TernServerBuilder {
    pub fn new() -> Self {
        let mut b = TernServerBuilder {
            config: toml::Table::new(),
            env: Vec::new(),
            users: Vec::new(),
        };
        b = b.set("server.hostname", HOSTNAME);
        b
    }

    /// Set a config key by dotted path (`"limits.message_size"`, `"smtp.proxy_protocol"`).
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let parts: Vec<&str> = key.split('.').collect();
        let (last, tables) = parts.split_last().expect("empty key");
        let mut t = &mut self.config;
        for part in tables {
            t = t
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("config key {part} is not a table"));
        }
        t.insert(last.to_string(), value.into());
        self
    }

    /// Set a key to a list of strings (`relay.domains`, `relay.networks`, listeners).
    pub fn set_list(self, key: &str, values: &[&str]) -> Self {
        let v: Vec<toml::Value> = values.iter().map(|s| toml::Value::from(*s)).collect();
        self.set(key, toml::Value::Array(v))
    }

    pub fn relay_domains(self, domains: &[&str]) -> Self {
        self.set_list("relay.domains", domains)
    }

    pub fn relay_networks(self, networks: &[&str]) -> Self {
        self.set_list("relay.networks", networks)
    }

    pub fn proxy_protocol(self, on: bool) -> Self {
        self.set("smtp.proxy_protocol", on)
    }

    /// Append a `[[routes]]` entry (first match wins): `relay` is a smarthost `host:port`, or
    /// `None` to keep the MX lookup; `tls` is opportunistic, required or none.
    pub fn route(mut self, domain: &str, relay: Option<&str>, tls: &str) -> Self {
        let mut r = toml::Table::new();
        r.insert("domain".into(), domain.into());
        if let Some(relay) = relay {
            r.insert("relay".into(), relay.into());
        }
        r.insert("tls".into(), tls.into());
        self.config
            .entry("routes")
            .or_insert_with(|| toml::Value::Array(Vec::new()))
            .as_array_mut()
            .expect("routes is an array")
            .push(toml::Value::Table(r));
        self
    }

    /// Set `key` on the last `[[routes]]` entry added with [`TernServerBuilder::route`] (a
    /// per-route limit such as `max_recipients_per_transaction`).
    pub fn route_set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let last = self
            .config
            .get_mut("routes")
            .and_then(|r| r.as_array_mut())
            .and_then(|r| r.last_mut())
            .and_then(|r| r.as_table_mut())
            .expect("route_set after route");
        last.insert(key.to_string(), value.into());
        self
    }

    /// Turn delivery on, resolving through `nameserver` (a test DNS server), connecting to
    /// MX hosts on `port`, loopback addresses allowed, and a fast retry schedule.
    pub fn deliver(self, nameserver: SocketAddr, port: u16) -> Self {
        self.set("delivery.enabled", true)
            .set("delivery.allow_private_addresses", true)
            .set("delivery.port", port as i64)
            .set("delivery.connect_timeout", "2s")
            .set("delivery.idle_timeout", "1s")
            .set_list("dns.nameservers", &[&nameserver.to_string()])
            .set("dns.timeout", "1s")
            .set_list("queue.retry_schedule", &["1s"])
    }

    /// Add a submission user; the password is hashed with `tern auth hash`.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.to_string(), password.to_string()));
        self
    }

    /// An environment variable for the server process (`TERN_SMTP__LISTEN=…` overrides).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn start(self) -> TernServer {
        TernServer::start_from(self)
    }
}

/// A running `tern serve` on private loopback ports. Dropping it SIGKILLs the server; if the
/// test is failing at that moment the server's stderr is printed to help diagnose it.
pub struct TernServer {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    data_dir: PathBuf,
    stderr_path: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// An empty loopback DNS server for tests that name none: sender authentication looks
    /// names up for every stranger's message, and tests must never reach the system resolver
    /// (off loopback).
    _dns: Option<tern_dns::testing::TestDns>,
    pub smtp: SocketAddr,
    pub submission: SocketAddr,
    pub submissions: SocketAddr,
    pub http: SocketAddr,
}

impl TernServer {
    pub fn builder() -> TernServerBuilder {
        TernServerBuilder::new()
    }

    /// A server with the default fixture config.
    pub fn start() -> TernServer {
        TernServerBuilder::new().start()
    }

    fn start_from(b: TernServerBuilder) -> TernServer {
        let dir = tempfile::Builder::new()
            .prefix("tern-test-")
            .tempdir()
            .expect("tempdir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("tern.toml");
        let stderr_path = dir.path().join("stderr.log");
        let mut config = b.config;
        if !b.users.is_empty() {
            let users: Vec<toml::Value> = b
                .users
                .iter()
                .map(|(name, pw)| {
                    let mut u = toml::Table::new();
                    u.insert("name".into(), name.as_str().into());
                    u.insert("password_hash".into(), hash_password(pw).into());
                    toml::Value::Table(u)
                })
                .collect();
            config
                .entry("auth")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("auth table")
                .insert("users".into(), toml::Value::Array(users));
        }
        let has_nameservers = config
            .get("dns")
            .and_then(|d| d.get("nameservers"))
            .is_some();
        let dns = (!has_nameservers)
            .then(|| tern_dns::testing::TestDns::start(tern_dns::testing::TestZone::new()));
        if let Some(dns) = &dns {
            let d = config
                .entry("dns")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("dns table");
            d.insert(
                "nameservers".into(),
                toml::Value::Array(vec![dns.addr().to_string().into()]),
            );
        }
        let mut server = TernServer {
            dir,
            config_path,
            data_dir,
            stderr_path,
            env: b.env,
            child: None,
            _dns: dns,
            smtp: "127.0.0.1:0".parse().unwrap(),
            submission: "127.0.0.1:0".parse().unwrap(),
            submissions: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
        };
        // A port taken between reservation and the server's bind is retried with fresh ports.
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let ports = reserve_ports(4);
            let addrs: Vec<SocketAddr> = ports.iter().map(|l| l.local_addr().unwrap()).collect();
            let mut cfg = config.clone();
            let set_default = |cfg: &mut toml::Table, table: &str, key: &str, v: toml::Value| {
                let t = cfg
                    .entry(table)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .expect("table");
                t.entry(key).or_insert(v);
            };
            let list = |a: SocketAddr| toml::Value::Array(vec![a.to_string().into()]);
            set_default(
                &mut cfg,
                "server",
                "data_dir",
                server.data_dir.display().to_string().into(),
            );
            set_default(&mut cfg, "smtp", "listen", list(addrs[0]));
            set_default(&mut cfg, "smtp", "submission_listen", list(addrs[1]));
            set_default(&mut cfg, "smtp", "submissions_listen", list(addrs[2]));
            set_default(&mut cfg, "http", "listen", addrs[3].to_string().into());
            // Tests of the accept path inspect the spool: nothing may leave it unless a test
            // turns delivery on (and points it at its own DNS server or route).
            set_default(&mut cfg, "delivery", "enabled", false.into());
            let text = toml::to_string(&cfg).expect("serialize config");
            fs::write(&server.config_path, text).expect("write config");
            server.smtp = first_addr(&cfg, "smtp", "listen").unwrap_or(addrs[0]);
            server.submission = first_addr(&cfg, "smtp", "submission_listen").unwrap_or(addrs[1]);
            server.submissions = first_addr(&cfg, "smtp", "submissions_listen").unwrap_or(addrs[2]);
            server.http = cfg
                .get("http")
                .and_then(|t| t.get("listen"))
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(addrs[3]);
            drop(ports);
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) if e.contains("in use") => last_err = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("tern did not start after 5 port picks: {last_err}");
    }

    /// Start the process with the current config file and wait for `/health`.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("stderr log");
        let stdout = stderr.try_clone().expect("dup stderr log");
        let mut cmd = Command::new(tern_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", tern_bin().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                let log = self.stderr();
                let in_use = log.contains("in use") || log.contains("AddrInUse");
                return Err(format!(
                    "tern serve exited with {status} before becoming healthy{}\n--- config ---\n{}\n--- stderr ---\n{log}",
                    if in_use { " (address in use)" } else { "" },
                    fs::read_to_string(&self.config_path).unwrap_or_default(),
                ));
            }
            if let Ok((200, _)) = http_get(self.http, "/health") {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "tern serve not healthy on http://{}/health after {READY_TIMEOUT:?}\n--- config ---\n{}\n--- stderr ---\n{}",
                    self.http,
                    fs::read_to_string(&self.config_path).unwrap_or_default(),
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Everything the server wrote to stderr/stdout so far (across restarts).
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits (up to 5 s) for a log line that `wanted` accepts and returns the whole log. The
    /// server writes its log in batches a few milliseconds after the fact (tern::logging).
    pub fn wait_for_log(&self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.stderr();
            if log.lines().any(&wanted) {
                return log;
            }
            assert!(Instant::now() < deadline, "no such line in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the server and reap it: no graceful shutdown, as after a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM the server and wait (up to 30 s, then SIGKILL) for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Start again (after [`kill`](Self::kill) or [`stop`](Self::stop)) with the same config,
    /// ports and data directory; kills a running instance first.
    pub fn restart(&mut self) {
        self.kill();
        // The old listening sockets are gone with the process; a fresh bind can still race a
        // lingering socket for a moment, so retry briefly.
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if e.contains("in use") => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("restart failed: {last}");
    }

    /// `GET /health` → the parsed JSON (panics unless 200 with JSON).
    pub fn health(&self) -> serde_json::Value {
        let (status, body) = http_get(self.http, "/health")
            .unwrap_or_else(|e| panic!("GET /health: {e}\n{}", self.stderr()));
        assert_eq!(status, 200, "GET /health → {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health body {body:?}: {e}"))
    }

    /// The delivery log (`<data_dir>/delivery.log`), one JSON object per line.
    pub fn delivery_log(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(self.data_dir.join("delivery.log")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
            .collect()
    }

    /// The delivery log once `ready` holds for it (lines reach the file within 20 ms of the
    /// event, so a test that just saw its effect elsewhere waits for them here).
    #[track_caller]
    pub fn delivery_log_when(
        &self,
        what: &str,
        ready: impl Fn(&[serde_json::Value]) -> bool,
        within: Duration,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let log = self.delivery_log();
            if ready(&log) {
                return log;
            }
            if Instant::now() > deadline {
                panic!("delivery log never had {what} within {within:?}: {log:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the first delivery-log `event` about `recipient` and returns it.
    #[track_caller]
    pub fn wait_event(&self, event: &str, recipient: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self
                .delivery_log()
                .into_iter()
                .find(|e| e["event"] == event && e["recipient"] == recipient)
            {
                return e;
            }
            if Instant::now() > deadline {
                panic!(
                    "no {event} event for {recipient} within {within:?}; log:\n{}\n{}",
                    fs::read_to_string(self.data_dir.join("delivery.log")).unwrap_or_default(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `/health` says `n` messages are queued.
    #[track_caller]
    pub fn wait_queued(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let h = self.health();
            if h["queued"].as_u64() == Some(n) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "queue never held {n} message(s) within {within:?}: {h}\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `queued` count from `/health`.
    pub fn queued(&self) -> u64 {
        let h = self.health();
        h["queued"]
            .as_u64()
            .unwrap_or_else(|| panic!("/health has no numeric queued: {h}"))
    }

    /// `tern spool list --data-dir DIR`. The contract says it runs offline, so this panics if
    /// the server is still running (call [`kill`](Self::kill) or [`stop`](Self::stop) first).
    pub fn spool_list(&self) -> Vec<SpoolEntry> {
        assert!(self.child.is_none(), "spool_list needs the server stopped");
        let data_dir = self.data_dir.display().to_string();
        let out = tern_cmd(&["spool", "list", "--data-dir", &data_dir]);
        assert!(
            out.status.success(),
            "tern spool list failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8 spool list")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("spool list line {l:?} is not JSON: {e}"));
                SpoolEntry {
                    id: v["id"].as_str().expect("id").to_string(),
                    sender: v["sender"].as_str().expect("sender").to_string(),
                    recipients: v["recipients"]
                        .as_array()
                        .expect("recipients")
                        .iter()
                        .map(|r| r.as_str().expect("recipient").to_string())
                        .collect(),
                    size: v["size"].as_u64().expect("size"),
                    raw: v,
                }
            })
            .collect()
    }

    /// A whole spooled message — envelope, client info, and the stored content (Received header
    /// prepended, dot-unstuffed) — read with the queue's own reader from `<data_dir>/spool`, as
    /// `tern spool list` does. The server must be stopped (sled locks the spool).
    pub fn spooled_message(&self, id: &str) -> tern_message::InboundMessage {
        use tern_queue::Storage;
        assert!(
            self.child.is_none(),
            "spooled_message needs the server stopped"
        );
        let storage = tern_queue::SledStorage::open(
            &self.data_dir.join("spool"),
            tern_queue::SledOptions {
                min_free_bytes: 0,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("open spool in {}: {e}", self.data_dir.display()));
        let qid: tern_message::QueueId = id.parse().unwrap_or_else(|e| panic!("{e}"));
        storage
            .get(qid)
            .unwrap_or_else(|e| panic!("read {id}: {e}"))
            .unwrap_or_else(|| panic!("{id} is not in the spool"))
    }

    /// The stored content of a spooled message as text (lossy UTF-8), for header checks.
    pub fn spooled_text(&self, id: &str) -> String {
        String::from_utf8_lossy(&self.spooled_message(id).body).into_owned()
    }

    /// A raw client connected to the plain SMTP listener (greeting not yet read).
    pub fn connect(&self) -> SmtpClient {
        SmtpClient::connect(self.smtp)
    }

    /// A raw client on the SMTP listener with the greeting read and EHLO done.
    pub fn session(&self) -> SmtpClient {
        let mut c = self.connect();
        c.read_reply().expect_code(220);
        c.ehlo("client.test").expect_code(250);
        c
    }
}

impl Drop for TernServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.stderr();
            let tail: String = {
                let lines: Vec<&str> = log.lines().collect();
                let start = lines.len().saturating_sub(60);
                lines[start..].join("\n")
            };
            eprintln!(
                "--- tern stderr (last 60 lines, {}) ---\n{tail}\n--- end tern stderr ---",
                self.stderr_path.display()
            );
        }
    }
}

fn first_addr(cfg: &toml::Table, table: &str, key: &str) -> Option<SocketAddr> {
    cfg.get(table)?
        .get(key)?
        .as_array()?
        .first()?
        .as_str()?
        .parse()
        .ok()
}

/// A minimal HTTP/1.1 GET (the fixture needs nothing more): returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Parse the queue id out of `250 2.0.0 Ok: queued as <ID>`; panics if the reply is not that.
#[track_caller]
pub fn queued_id(reply: &Reply) -> String {
    reply.expect("250", "2.0.0");
    let text = reply.last_line();
    let pos = text
        .find("queued as ")
        .unwrap_or_else(|| panic!("DATA reply lacks 'queued as <ID>': {reply}"));
    let id = text[pos + "queued as ".len()..].trim();
    let id = id.split_whitespace().next().unwrap_or("");
    assert!(!id.is_empty(), "empty queue id in {reply}");
    id.to_string()
}

/// A minimal well-formed message body (headers + body, CRLF, no final dot).
pub fn simple_message(from: &str, to: &str, subject: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{}@client.test>\r\n\r\nHello from the Tern test suite.\r\n",
        unique_token()
    )
}

/// A process-unique token for message ids and subjects.
pub fn unique_token() -> String {
    format!(
        "{}.{}.{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        PORT_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Sender domain used by test clients.
pub const CLIENT_DOMAIN: &str = "client.test";
/// A domain the tests configure in `relay.domains` when they need one.
pub const LOCAL_DOMAIN: &str = "example.test";
/// A domain that is never in `relay.domains`: mail to it is relaying.
pub const FOREIGN_DOMAIN: &str = "elsewhere.test";

/// `tern config check FILE` with extra environment variables.
pub fn config_check(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(tern_bin());
    cmd.args(["config", "check"]).arg(file).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tern config check")
}

/// One free loopback port (for tests that configure a listener themselves).
pub fn free_port() -> u16 {
    reserve_ports(1)[0].local_addr().unwrap().port()
}

/// Split stored content into (the leading `Received:` header with its folded lines, the rest).
/// Panics if the content does not start with a Received header.
#[track_caller]
pub fn split_received(content: &str) -> (String, String) {
    assert!(
        content.starts_with("Received: "),
        "stored message must start with a Received header: {:?}",
        &content[..content.len().min(200)]
    );
    let mut end = 0;
    for (i, line) in content.split_inclusive("\r\n").enumerate() {
        if i > 0 && !line.starts_with([' ', '\t']) {
            break;
        }
        end += line.len();
    }
    (content[..end].to_string(), content[end..].to_string())
}
