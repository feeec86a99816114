//! `tern queue …`: the operator's view of the running server's queue, over its loopback HTTP
//! admin API (see `admin.rs`), like Postfix's `mailq`/`postqueue`/`postsuper`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tern_queue::admin::{MessageDetail, MessageSummary, QueueSummary};

/// A client for the admin API at `addr`.
pub struct AdminClient {
    base: String,
    agent: ureq::Agent,
    addr: SocketAddr,
}

impl AdminClient {
    pub fn new(addr: SocketAddr) -> Self {
        // A wildcard listen address is reached on loopback (the API only answers loopback).
        let addr = match addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => {
                SocketAddr::from(([127, 0, 0, 1], addr.port()))
            }
            ip if ip.is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
            }
            _ => addr,
        };
        Self {
            base: format!("http://{addr}"),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout(Duration::from_secs(300))
                .build(),
            addr,
        }
    }

    fn call(&self, method: &str, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        for (k, v) in query {
            req = req.query(k, v);
        }
        self.answer(req.call())
    }

    fn answer(&self, result: Result<ureq::Response, ureq::Error>) -> Result<Value> {
        match result {
            Ok(resp) => resp
                .into_json()
                .context("unreadable answer from the server"),
            Err(ureq::Error::Status(code, resp)) => {
                let body: Value = resp.into_json().unwrap_or(Value::Null);
                let why = body["error"].as_str().unwrap_or("no details").to_string();
                Err(anyhow!("{why} (HTTP {code})"))
            }
            Err(ureq::Error::Transport(t)) => Err(anyhow!(
                "cannot reach the server's admin API at {} (is `tern serve` running? \
                 --http or http.listen in --config choose the address): {t}",
                self.addr
            )),
        }
    }

    pub fn list(&self, domain: Option<&str>, state: Option<&str>) -> Result<Vec<MessageSummary>> {
        let mut q = Vec::new();
        if let Some(d) = domain {
            q.push(("domain", d));
        }
        if let Some(s) = state {
            q.push(("state", s));
        }
        Ok(serde_json::from_value(self.call(
            "GET",
            "/api/queue/messages",
            &q,
        )?)?)
    }

    pub fn show(&self, id: &str) -> Result<MessageDetail> {
        Ok(serde_json::from_value(self.call(
            "GET",
            &format!("/api/queue/messages/{id}"),
            &[],
        )?)?)
    }

    pub fn delete(&self, id: &str, bounce: bool) -> Result<()> {
        let bounce = if bounce { "true" } else { "false" };
        self.call(
            "DELETE",
            &format!("/api/queue/messages/{id}"),
            &[("bounce", bounce)],
        )?;
        Ok(())
    }

    /// Puts a message on hold (`hold`) or releases it; answers whether that changed anything.
    pub fn hold(&self, id: &str, hold: bool) -> Result<bool> {
        if id.contains('/') {
            bail!("not a queue id: {id:?}");
        }
        let verb = if hold { "hold" } else { "release" };
        let v = self.call("POST", &format!("/api/queue/messages/{id}/{verb}"), &[])?;
        Ok(v["changed"].as_bool().unwrap_or(false))
    }

    pub fn flush(&self, domain: Option<&str>) -> Result<u64> {
        let q: Vec<(&str, &str)> = domain.map(|d| ("domain", d)).into_iter().collect();
        let v = self.call("POST", "/api/queue/flush", &q)?;
        Ok(v["rescheduled"].as_u64().unwrap_or(0))
    }

    pub fn suspend(&self, domain: &str, suspend: bool) -> Result<Vec<String>> {
        let verb = if suspend { "suspend" } else { "resume" };
        if domain.contains('/') {
            bail!("not a domain: {domain:?}");
        }
        let v = self.call("POST", &format!("/api/queue/{verb}/{domain}"), &[])?;
        Ok(serde_json::from_value(v["suspended"].clone())?)
    }

    pub fn suppression_list(&self) -> Result<Vec<tern_policy::Suppressed>> {
        Ok(serde_json::from_value(self.call(
            "GET",
            "/api/suppression",
            &[],
        )?)?)
    }

    /// Adds `(address, reason)` pairs; `source` is `manual` or `import`.
    pub fn suppression_add(&self, entries: &[(String, String)], source: &str) -> Result<u64> {
        let body: Vec<Value> = entries
            .iter()
            .map(|(a, r)| serde_json::json!({"address": a, "reason": r, "source": source}))
            .collect();
        let resp = self
            .agent
            .post(&format!("{}/api/suppression", self.base))
            .send_json(Value::Array(body));
        let v = self.answer(resp)?;
        Ok(v["added"].as_u64().unwrap_or(0))
    }

    pub fn suppression_remove(&self, address: &str) -> Result<()> {
        if address.contains('/') {
            bail!("not an address: {address:?}");
        }
        self.call("DELETE", &format!("/api/suppression/{address}"), &[])?;
        Ok(())
    }

    pub fn stats(&self) -> Result<QueueSummary> {
        Ok(serde_json::from_value(self.call(
            "GET",
            "/api/queue/stats",
            &[],
        )?)?)
    }
}

fn when(ms: u64) -> String {
    humantime_serde::re::humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_millis(ms),
    )
    .to_string()
}

/// `mailq`-like text: one block per message, one line per recipient, and a count.
pub fn format_list(list: &[MessageSummary]) -> String {
    let mut out = String::new();
    for m in list {
        out.push_str(&format_message(m));
    }
    let _ = writeln!(out, "-- {} message(s)", list.len());
    out
}

/// One message's block: id, size, arrival, sender, then its recipients.
pub fn format_message(m: &MessageSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  {:>9}  {}  <{}>",
        m.id,
        m.size,
        when(m.arrived_ms),
        m.sender
    );
    if let Some(reason) = &m.hold {
        let _ = writeln!(out, "    on hold: {reason}");
    }
    for r in &m.recipients {
        let _ = write!(out, "    {:<10} {}", r.state, r.address);
        if r.attempts > 0 {
            let _ = write!(out, "  attempts={}", r.attempts);
        }
        if let Some(next) = r.next_attempt_ms {
            let _ = write!(out, "  next={}", when(next));
        }
        out.push('\n');
        if let Some(reply) = &r.last_reply {
            let _ = writeln!(out, "               ({reply})");
        }
    }
    out
}

/// The answer to `suspend`/`resume`: the domains now suspended.
pub fn format_suspended(list: &[String]) -> String {
    if list.is_empty() {
        "suspended: none".to_string()
    } else {
        format!("suspended: {}", list.join(" "))
    }
}

pub fn format_stats(s: &QueueSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "messages: {}  bytes: {}  in flight: {}  held: {}",
        s.messages, s.bytes, s.in_flight, s.held
    );
    let states: Vec<String> = s.by_state.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "recipients: {}", states.join(" "));
    let c = &s.since_start;
    let _ = writeln!(
        out,
        "since start: delivered={} deferred={} failed={} expired={} dsn_sent={}",
        c.delivered, c.deferred, c.failed, c.expired, c.dsn_sent
    );
    if !s.suspended.is_empty() {
        let _ = writeln!(out, "suspended: {}", s.suspended.join(" "));
    }
    for (domain, states) in &s.by_domain {
        let states: Vec<String> = states.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "  {domain:<30} {}", states.join(" "));
    }
    out
}
