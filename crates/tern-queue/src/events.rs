//! The delivery log: one JSON object per line for every event in a message's life (received,
//! delivered, deferred, failed, expired, bounce-sent, deleted, held, released), in
//! `<data_dir>/delivery.log` and as a `tracing` event. It is the feed for webhooks and metrics
//! later, so every line is self-contained: queue id, recipient, destination, reply, attempt,
//! latency.
//!
//! The file is appended to with a buffered writer that the queue actor flushes 20 ms after the
//! first line written since the last flush (not per message: that would be a write(2) per
//! accepted message), and once more at shutdown. So lines are whole and in order and reach the
//! file within 20 ms. It is not fsync'd (a log, not the spool: a lost tail after a power cut is
//! acceptable, the spool state is authoritative).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tracing::{info, warn};

/// One line of the delivery log. Fields that do not apply are left out.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Event<'a> {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// `received`, `delivered`, `deferred`, `failed`, `expired`, `bounce-sent`, `deleted`,
    /// `held`, `released`.
    pub event: &'a str,
    pub queue_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<&'a str>,
    /// The MX or smarthost name, and the address connected to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// For delivery events: how long the attempt took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// For `deferred`: when the next attempt is due.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// For `bounce-sent`: the queue id of the notification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn_id: Option<String>,
    /// For `bounce-sent`: failed, delayed, relayed, … (several when mixed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'a str>,
    /// For `held`: why the message was put on hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

/// Appends events to the log file (when one is configured) and to tracing.
pub struct EventLog {
    path: Option<PathBuf>,
    out: Option<BufWriter<File>>,
    dirty: bool,
}

impl EventLog {
    /// Logs to tracing only.
    pub fn disabled() -> Self {
        Self {
            path: None,
            out: None,
            dirty: false,
        }
    }

    /// Appends to `path`, creating it if needed.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            out: Some(BufWriter::with_capacity(64 * 1024, file)),
            dirty: false,
        })
    }

    pub fn log(&mut self, event: &Event<'_>) {
        info!(
            target: "tern::delivery_log",
            event = event.event,
            queue_id = %event.queue_id,
            recipient = event.recipient.unwrap_or(""),
            mx = event.mx.unwrap_or(""),
            reply = event.reply.unwrap_or(""),
            attempt = event.attempt.unwrap_or(0),
        );
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let written = serde_json::to_writer(&mut *out, event)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        match written {
            Ok(()) => self.dirty = true,
            Err(e) => self.fail(e),
        }
    }

    /// Writes buffered lines out; called by the queue actor 20 ms after a change.
    pub fn flush(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.flush() {
                self.fail(e);
            }
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        // A full disk must not stop deliveries: log once via tracing and stop writing the file.
        warn!(path = ?self.path, error = %e, "delivery log write failed; file logging stops");
        self.out = None;
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.flush();
    }
}
