//! The delivery stage: a dispatcher actor that routes [`DeliveryJob`]s to one destination
//! actor per destination, each with its own pool of outbound connections.
//!
//! A destination is a smarthost when a `[[routes]]` entry with `relay` matches (every domain
//! routed there shares its connections), otherwise a "site": the set of MX hosts of the
//! recipient domain, so that domains served by the same hosts (every domain a large provider
//! hosts) share one queue and one pool of connections, as in KumoMTA. Jobs stay per domain, so
//! transactions do too. A domain whose lookup fails is a destination of its own. A destination
//! actor keeps a queue of jobs and at most `max_connections` workers; a worker is a task that
//! owns one [`SmtpConnection`], takes job after job from its actor (RSET between them, QUIT
//! after `max_messages_per_connection` or after `idle_timeout` without work) and reports every
//! job's per-recipient results to the queue.
//!
//! When a worker cannot reach any host of the destination, every job waiting for that
//! destination gets the same answer at once (Postfix's "dead destination"): trying each of
//! them against the same dead hosts would only multiply the timeouts.
//!
//! A job with more than `max_recipients_per_transaction` recipients is sent in several
//! transactions, one after the other on the same connection (a new one if it breaks), each
//! reported on its own so the queue logs the host that really answered.
//!
//! Every recipient of a job is answered exactly once, by one of the job's
//! [`DeliveryReport`]s: the queue keeps a recipient in flight until then.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tern_dns::{DnsError, MxResolver, MxTarget};
use tern_message::{now_ms, AttemptResult, DeliveryJob, DeliveryReport, Rate, RemoteHost};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::client::{ClientConfig, RecipientOutcome, SmtpConnection, TlsPolicy};
use crate::DeliveryError;

/// Per-destination limits (`[delivery]` defaults, overridden per `[[routes]]` entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestinationLimits {
    pub max_connections: usize,
    pub max_messages_per_connection: usize,
    /// Spread evenly: one message every `per / count`.
    pub max_message_rate: Option<Rate>,
    /// A job with more recipients is sent in several transactions (Postfix's
    /// `default_destination_recipient_limit`, 50): many servers take at most 100 per
    /// transaction and answer the rest with 452.
    pub max_recipients_per_transaction: usize,
}

impl Default for DestinationLimits {
    fn default() -> Self {
        Self {
            max_connections: 10,
            max_messages_per_connection: 100,
            max_message_rate: None,
            max_recipients_per_transaction: 50,
        }
    }
}

/// Where mail for the matching domains goes and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `"example.net"`, `"*.example.net"` (subdomains only) or `"*"`; see [`domain_matches`].
    pub domain: String,
    /// A smarthost (host, port) instead of the MX lookup.
    pub relay: Option<(String, u16)>,
    pub tls: TlsPolicy,
    pub limits: DestinationLimits,
}

/// Whether `domain` matches a route pattern: `*` matches all, `*.example.net` every subdomain
/// of example.net (not example.net itself), anything else the domain exactly. Case and a
/// trailing dot are ignored.
pub fn domain_matches(pattern: &str, domain: &str) -> bool {
    let pattern = pattern.trim_end_matches('.');
    let domain = domain.trim_end_matches('.');
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(parent) => {
            domain.len() > parent.len() + 1
                && domain.as_bytes()[domain.len() - parent.len() - 1] == b'.'
                && domain[domain.len() - parent.len()..].eq_ignore_ascii_case(parent)
        }
        None => pattern.eq_ignore_ascii_case(domain),
    }
}

/// Everything the delivery stage is configured with.
#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// HELO name, timeouts; its `tls` is replaced per destination.
    pub client: ClientConfig,
    /// Remote port for MX deliveries (25).
    pub port: u16,
    /// TLS policy for destinations no route matches.
    pub tls: TlsPolicy,
    pub limits: DestinationLimits,
    /// Checked in order, first match wins.
    pub routes: Vec<Route>,
    /// How long a connection waits for more mail before QUIT.
    pub idle_timeout: Duration,
    /// At most this many addresses are tried per connection attempt (Postfix
    /// `smtp_mx_address_limit` is 5).
    pub max_addresses: usize,
    /// A job's MX answer is used to connect for it until it is this old; after a longer wait
    /// in its destination's queue the worker looks the domain up again (answered from the
    /// resolver's cache while the records' TTLs last), so hosts or addresses that changed
    /// meanwhile are not tried and their failure taken as the whole site's. An age of its own
    /// because `MxTarget` carries no TTL.
    pub mx_max_age: Duration,
}

impl DeliverySettings {
    pub fn new(client: ClientConfig) -> Self {
        Self {
            client,
            port: 25,
            tls: TlsPolicy::Opportunistic,
            limits: DestinationLimits::default(),
            routes: Vec::new(),
            idle_timeout: Duration::from_secs(5),
            max_addresses: 5,
            mx_max_age: Duration::from_secs(60),
        }
    }

    /// The first route matching `domain`, by position (part of a site's key).
    fn route_index(&self, domain: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| domain_matches(&r.domain, domain))
    }
}

struct Shared {
    settings: DeliverySettings,
    resolver: Arc<MxResolver>,
    report_to: Recipient<DeliveryReport>,
}

/// What one destination actor delivers to.
#[derive(Clone, Debug)]
struct Target {
    /// `None`: MX lookup of the job's domain.
    relay: Option<(String, u16)>,
    tls: TlsPolicy,
    limits: DestinationLimits,
}

/// Routes jobs to destination actors, creating them on demand and retiring them when idle.
pub struct Dispatcher {
    shared: Arc<Shared>,
    destinations: HashMap<String, Addr<Destination>>,
}

impl Dispatcher {
    pub fn new(
        settings: DeliverySettings,
        resolver: Arc<MxResolver>,
        report_to: Recipient<DeliveryReport>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                resolver,
                report_to,
            }),
            destinations: HashMap::new(),
        }
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<DeliveryJob> for Dispatcher {
    type Result = ();

    fn handle(&mut self, job: DeliveryJob, ctx: &mut Self::Context) {
        let settings = &self.shared.settings;
        let route_index = settings.route_index(&job.domain);
        let route = route_index.map(|i| &settings.routes[i]);
        let target = Target {
            relay: route.and_then(|r| r.relay.clone()),
            tls: route.map_or(settings.tls, |r| r.tls),
            limits: route.map_or(settings.limits, |r| r.limits),
        };
        // Every domain sent to one smarthost shares its connections.
        if let Some((host, port)) = &target.relay {
            let key = format!("[{host}]:{port}");
            let routed = Routed {
                job,
                mx: None,
                since_ms: now_ms(),
            };
            self.send_to(key, target, routed, ctx);
            return;
        }
        // Every domain with the same MX hosts (a "site") shares its connections too. The
        // lookup's answer travels with the job, so a worker that connects for it does not ask
        // again; the job waits for it outside the dispatcher's mailbox, so other jobs are not
        // held up.
        let resolver = self.shared.resolver.clone();
        let domain = job.domain.clone();
        let started = now_ms();
        let lookup = async move { resolver.resolve(&domain).await };
        ctx.spawn(lookup.into_actor(self).map(move |targets, act, ctx| {
            match targets {
                Ok(targets) => {
                    let key = site_key(&targets, route_index);
                    let routed = Routed {
                        job,
                        mx: Some((targets, Instant::now())),
                        since_ms: started,
                    };
                    act.send_to(key, target, routed, ctx);
                }
                // The domain's own answer: nothing to connect to, so no destination either.
                Err(e) => {
                    let result = dns_failure(&e, &job.domain).result();
                    info!(domain = %job.domain, reply = result.reply(), "no connection");
                    let report = DeliveryReport::for_every_recipient(&job, result, started);
                    send_report(&act.shared, report);
                }
            }
        }));
    }
}

/// A job with the MX lookup made for it, and when it was made: `None` for a smarthost route
/// (the worker looks the relay host up when it connects).
#[derive(Message)]
#[rtype(result = "()")]
struct Routed {
    job: DeliveryJob,
    mx: Option<(Vec<MxTarget>, Instant)>,
    /// When the dispatcher took the job: its attempt's start for a report made without a
    /// connection of its own (the destination found unreachable while it waited).
    since_ms: u64,
}

/// The destination key of domains whose MX hosts are `targets`: the host names, sorted, so
/// that the order and the preferences do not matter (KumoMTA's "site"), and the route when
/// one matched, so that domains with different routes (limits, TLS) never share.
fn site_key(targets: &[MxTarget], route_index: Option<usize>) -> String {
    let mut hosts: Vec<String> = targets
        .iter()
        .map(|t| t.host.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    hosts.sort();
    hosts.dedup();
    let mut key = format!("mx:{}", hosts.join(","));
    if let Some(i) = route_index {
        key.push_str(&format!(" route:{i}"));
    }
    key
}

impl Dispatcher {
    /// Hands `job` to the destination `key`, creating it if needed.
    fn send_to(&mut self, key: String, target: Target, job: Routed, ctx: &mut Context<Self>) {
        let addr = match self.destinations.get(&key) {
            Some(addr) if addr.connected() => addr.clone(),
            _ => {
                let dest = Destination {
                    key: key.clone(),
                    target,
                    shared: self.shared.clone(),
                    dispatcher: ctx.address(),
                    queue: VecDeque::new(),
                    idle: VecDeque::new(),
                    workers: 0,
                    next_slot: None,
                    stopping: false,
                };
                let addr = dest.start();
                self.destinations.insert(key, addr.clone());
                addr
            }
        };
        addr.do_send(job);
    }
}

/// Destination → dispatcher: nothing queued and no connection open.
#[derive(Message)]
#[rtype(result = "()")]
struct Idle {
    key: String,
    addr: Addr<Destination>,
}

impl Handler<Idle> for Dispatcher {
    type Result = ();

    fn handle(&mut self, idle: Idle, _ctx: &mut Self::Context) {
        // Only the dispatcher sends jobs to a destination, and it stops doing so here, before
        // telling it to stop: any job sent earlier is ahead of `Stop` in its mailbox.
        if self.destinations.get(&idle.key) == Some(&idle.addr) {
            self.destinations.remove(&idle.key);
            idle.addr.do_send(Stop);
            // Operators (and the tests) see the map shrink back: a destination costs memory
            // only while it has work or connections.
            info!(dest = %idle.key, "idle destination retired");
        }
    }
}

/// Number of destinations with an actor (for health/metrics).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ActiveDestinations;

impl Handler<ActiveDestinations> for Dispatcher {
    type Result = usize;

    fn handle(&mut self, _: ActiveDestinations, _ctx: &mut Self::Context) -> usize {
        self.destinations.len()
    }
}

/// Starts the delivery stage on an arbiter (thread) of its own. Must be called from within a
/// running actix `System`.
pub fn spawn_delivery(
    settings: DeliverySettings,
    resolver: Arc<MxResolver>,
    report_to: Recipient<DeliveryReport>,
) -> Addr<Dispatcher> {
    let arbiter = Arbiter::new();
    Dispatcher::start_in_arbiter(&arbiter.handle(), move |_| {
        Dispatcher::new(settings, resolver, report_to)
    })
}

/// One destination's queue of jobs and its connection workers.
pub struct Destination {
    key: String,
    target: Target,
    shared: Arc<Shared>,
    dispatcher: Addr<Dispatcher>,
    queue: VecDeque<Routed>,
    /// Workers waiting for a job, each with the channel to hand it over.
    idle: VecDeque<oneshot::Sender<Assigned>>,
    workers: usize,
    /// Rate limiting: the earliest start of the next message.
    next_slot: Option<Instant>,
    /// The dispatcher retired this actor; it stops once its work is done.
    stopping: bool,
}

/// A job handed to a worker, with the time it may start (rate limit).
type Assigned = (Routed, Option<Instant>);

impl Destination {
    /// The start time for the next message under `max_message_rate`.
    fn slot(&mut self) -> Option<Instant> {
        let rate = self.target.limits.max_message_rate?;
        let gap = rate.per / rate.count.max(1);
        let now = Instant::now();
        let at = self.next_slot.map_or(now, |t| t.max(now));
        self.next_slot = Some(at + gap);
        (at > now).then_some(at)
    }

    fn assign(&mut self, ctx: &mut Context<Self>) {
        while !self.queue.is_empty() {
            if let Some(waiter) = self.idle.pop_front() {
                let job = self.queue.pop_front().expect("queue is not empty");
                let slot = self.slot();
                if let Err((job, _)) = waiter.send((job, slot)) {
                    // That worker timed out meanwhile (it is exiting): keep the job.
                    self.queue.push_front(job);
                }
                continue;
            }
            if self.workers >= self.target.limits.max_connections.max(1) {
                break;
            }
            let job = self.queue.pop_front().expect("queue is not empty");
            let slot = self.slot();
            self.workers += 1;
            let worker = Worker {
                dest: ctx.address(),
                shared: self.shared.clone(),
                target: self.target.clone(),
                key: self.key.clone(),
            };
            let span = info_span!("destination", dest = %self.key);
            ctx.spawn(worker.run((job, slot)).instrument(span).into_actor(self));
        }
        if self.queue.is_empty() && self.workers == 0 {
            if self.stopping {
                ctx.stop();
            } else {
                self.dispatcher.do_send(Idle {
                    key: self.key.clone(),
                    addr: ctx.address(),
                });
            }
        }
    }
}

impl Actor for Destination {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<Routed> for Destination {
    type Result = ();

    fn handle(&mut self, job: Routed, ctx: &mut Self::Context) {
        self.queue.push_back(job);
        self.assign(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Stop;

impl Handler<Stop> for Destination {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        self.stopping = true;
        // Idle workers exit rather than wait for jobs that will no longer come.
        self.idle.clear();
        if self.queue.is_empty() && self.workers == 0 {
            ctx.stop();
        }
    }
}

/// Worker → destination: the next job, or a channel to wait on for one.
#[derive(Message)]
#[rtype(result = "NextJob")]
struct TakeJob;

enum NextJob {
    Job(Box<Assigned>),
    Wait(oneshot::Receiver<Assigned>),
    Exit,
}

impl<A, M> actix::dev::MessageResponse<A, M> for NextJob
where
    A: Actor,
    M: actix::Message<Result = NextJob>,
{
    fn handle(self, _ctx: &mut A::Context, tx: Option<actix::dev::OneshotSender<M::Result>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

impl Handler<TakeJob> for Destination {
    type Result = NextJob;

    fn handle(&mut self, _: TakeJob, _ctx: &mut Self::Context) -> NextJob {
        if let Some(job) = self.queue.pop_front() {
            let slot = self.slot();
            return NextJob::Job(Box::new((job, slot)));
        }
        if self.stopping {
            return NextJob::Exit;
        }
        let (tx, rx) = oneshot::channel();
        self.idle.push_back(tx);
        NextJob::Wait(rx)
    }
}

/// Worker → destination: this worker has ended (its connection is closed).
#[derive(Message)]
#[rtype(result = "()")]
struct WorkerExit;

impl Handler<WorkerExit> for Destination {
    type Result = ();

    fn handle(&mut self, _: WorkerExit, ctx: &mut Self::Context) {
        self.workers -= 1;
        self.assign(ctx);
    }
}

/// Worker → destination: no host could be reached; everything queued gets this result.
#[derive(Message)]
#[rtype(result = "()")]
struct Unreachable {
    result: AttemptResult,
}

impl Handler<Unreachable> for Destination {
    type Result = ();

    fn handle(&mut self, msg: Unreachable, _ctx: &mut Self::Context) {
        if !self.queue.is_empty() {
            info!(dest = %self.key, jobs = self.queue.len(), reply = msg.result.reply(),
                "destination unreachable: answering its queued jobs at once");
        }
        for routed in self.queue.drain(..) {
            let report = DeliveryReport::for_every_recipient(
                &routed.job,
                msg.result.clone(),
                routed.since_ms,
            );
            send_report(&self.shared, report);
        }
    }
}

/// Tells the queue how some of `job`'s recipients fared: `results` pairs a recipient's index
/// in the message's list with its result; the attempt ends now.
fn report(
    shared: &Shared,
    job: &DeliveryJob,
    results: Vec<(usize, AttemptResult)>,
    remote: Option<RemoteHost>,
    started_ms: u64,
) {
    let report = DeliveryReport {
        id: job.id,
        domain: job.domain.clone(),
        results,
        remote,
        started_ms,
        finished_ms: now_ms(),
    };
    send_report(shared, report);
}

fn send_report(shared: &Shared, report: DeliveryReport) {
    if let Err(e) = shared.report_to.try_send(report) {
        // Only when the queue is gone (shutting down): the recipients are still in the spool
        // in their earlier state and are retried after the restart.
        warn!(error = %e, "cannot report a delivery result to the queue");
    }
}

/// An open connection and what it has carried.
struct Open {
    smtp: SmtpConnection,
    host: String,
    sent: usize,
}

impl Open {
    fn remote(&self) -> RemoteHost {
        RemoteHost {
            host: self.host.clone(),
            addr: self.smtp.peer(),
            tls: self.smtp.tls(),
            dsn: self.smtp.capabilities().has("DSN"),
        }
    }
}

/// Why no connection could be opened.
struct NoConnection {
    permanent: bool,
    reply: String,
}

impl NoConnection {
    fn result(self) -> AttemptResult {
        if self.permanent {
            AttemptResult::Permanent { reply: self.reply }
        } else {
            AttemptResult::Temporary { reply: self.reply }
        }
    }
}

struct Worker {
    dest: Addr<Destination>,
    shared: Arc<Shared>,
    target: Target,
    key: String,
}

impl Worker {
    async fn run(self, first: Assigned) {
        let mut next = Some(first);
        let mut conn: Option<Open> = None;
        loop {
            let (routed, slot) = match next.take() {
                Some(assigned) => assigned,
                None => match self.dest.send(TakeJob).await {
                    Ok(NextJob::Job(assigned)) => *assigned,
                    Ok(NextJob::Wait(rx)) => {
                        match tokio::time::timeout(self.shared.settings.idle_timeout, rx).await {
                            Ok(Ok(assigned)) => assigned,
                            _ => break,
                        }
                    }
                    Ok(NextJob::Exit) | Err(_) => break,
                },
            };
            if let Some(at) = slot {
                tokio::time::sleep_until(at).await;
            }
            let job = &routed.job;
            let span = info_span!("deliver", queue_id = %job.id, domain = %job.domain,
                rcpts = job.rcpt_index.len(), attempt = job.attempt);
            let keep = self.deliver(&routed, &mut conn).instrument(span).await;
            if !keep {
                break;
            }
        }
        if let Some(open) = conn {
            open.smtp.quit().await;
        }
        self.dest.do_send(WorkerExit);
    }

    /// Delivers one job, reusing `conn` when it is open, in transactions of at most
    /// `max_recipients_per_transaction` recipients, each reported as soon as it ends. Returns
    /// false when the worker should stop (no host reachable).
    async fn deliver(&self, routed: &Routed, conn: &mut Option<Open>) -> bool {
        let job = &routed.job;
        let per = self.target.limits.max_recipients_per_transaction.max(1);
        // Positions in the job's recipient list still to send, in order.
        let mut todo: std::collections::VecDeque<usize> = (0..job.rcpt_index.len()).collect();
        while !todo.is_empty() {
            let take = todo.len().min(per);
            let batch: Vec<usize> = todo.drain(..take).collect();
            let started = now_ms();
            if let Some(open) = conn.as_mut() {
                if let Err(e) = open.smtp.reset().await {
                    debug!(error = %e, "RSET failed; opening a new connection");
                    *conn = None;
                }
            }
            if conn.is_none() {
                let connected = match &routed.mx {
                    Some((targets, at)) if at.elapsed() < self.shared.settings.mx_max_age => {
                        self.connect(&job.domain, Some(targets)).await
                    }
                    // A smarthost, or an answer grown old in the queue: look up now.
                    _ => self.connect(&job.domain, None).await,
                };
                match connected {
                    Ok(open) => *conn = Some(open),
                    Err((failure, everyone)) => {
                        let result = failure.result();
                        info!(reply = result.reply(), "no connection");
                        // Every recipient not yet tried shares the answer, so the job is
                        // answered in full.
                        let results = batch
                            .iter()
                            .chain(todo.iter())
                            .map(|&p| (job.rcpt_index[p], result.clone()))
                            .collect();
                        report(&self.shared, job, results, None, started);
                        if everyone {
                            self.dest.do_send(Unreachable { result });
                            return false;
                        }
                        return true;
                    }
                }
            }
            let open = conn.as_mut().expect("connection is open");
            let Some(again) = self.transaction(job, &batch, open, started).await else {
                // The reused connection had gone stale: nothing was settled, so the same
                // recipients go again, on a new connection (a fresh one cannot be stale).
                debug!("reused connection failed at RSET; reconnecting");
                *conn = None;
                for p in batch.into_iter().rev() {
                    todo.push_front(p);
                }
                continue;
            };
            // Recipients the server had no room for in this transaction go first in the next,
            // on the same connection.
            for p in again.into_iter().rev() {
                todo.push_front(p);
            }
            if open.sent >= self.target.limits.max_messages_per_connection.max(1) {
                if let Some(open) = conn.take() {
                    open.smtp.quit().await;
                }
            }
        }
        true
    }

    /// One MAIL/RCPT/DATA for the job's recipients at `positions`, reported to the queue, except
    /// the recipients answered "452 too many recipients" while others in the transaction were
    /// not: RFC 5321 §4.5.3.1.10 asks for those to be sent in a later transaction, so they are
    /// returned to be sent again at once. `None`, with nothing reported, when the reused
    /// connection failed at its RSET before the transaction began.
    async fn transaction(
        &self,
        job: &DeliveryJob,
        positions: &[usize],
        open: &mut Open,
        started: u64,
    ) -> Option<Vec<usize>> {
        let indices: Vec<usize> = positions.iter().map(|&p| job.rcpt_index[p]).collect();
        let indices = &indices[..];
        // The common case (one transaction for the whole job) sends the job's own envelope.
        let envelope = if positions.len() == job.envelope.recipients.len() {
            Cow::Borrowed(&job.envelope)
        } else {
            Cow::Owned(
                job.envelope.with_recipients(
                    positions
                        .iter()
                        .map(|&p| job.envelope.recipients[p].clone())
                        .collect(),
                ),
            )
        };
        let remote = open.remote();
        let mut again = Vec::new();
        let mut results: Vec<(usize, AttemptResult)> =
            match open.smtp.send(&envelope, &job.body).await {
                Ok(outcomes) => {
                    let progress = outcomes.iter().any(|o| !too_many_recipients(o));
                    let mut results = Vec::with_capacity(outcomes.len());
                    for ((&i, &p), outcome) in indices.iter().zip(positions).zip(outcomes) {
                        if progress && too_many_recipients(&outcome) {
                            again.push(p);
                        } else {
                            results.push((i, attempt_result(outcome)));
                        }
                    }
                    results
                }
                Err(DeliveryError::StaleConnection(why)) if open.sent > 0 => {
                    debug!(%why, "stale connection");
                    return None;
                }
                Err(e) => {
                    // The outcome is unknown (RFC 5321 §6.1 allows the duplicate a retry may
                    // cause, never a loss).
                    let reply = format!("4.4.2 {}[{}]: {e}", remote.host, remote.addr.ip());
                    indices
                        .iter()
                        .map(|&i| {
                            (
                                i,
                                AttemptResult::Temporary {
                                    reply: reply.clone(),
                                },
                            )
                        })
                        .collect()
                }
            };
        open.sent += 1;
        if results.len() + again.len() != indices.len() {
            // The queue waits for every recipient of the job: never leave one unanswered.
            warn!("client returned fewer outcomes than recipients");
            let reply = format!(
                "4.4.2 {}[{}]: no outcome for this recipient",
                remote.host,
                remote.addr.ip()
            );
            for &i in &indices[results.len() + again.len()..] {
                results.push((
                    i,
                    AttemptResult::Temporary {
                        reply: reply.clone(),
                    },
                ));
            }
        }
        report(&self.shared, job, results, Some(remote), started);
        Some(again)
    }

    /// Opens a connection to the first of `mx` (the job's MX hosts, already looked up; looked up
    /// now when `None`), or of the route's relay host, that answers. On failure, also whether
    /// the failure is the whole destination's (its hosts do not answer), not only this job's.
    async fn connect(
        &self,
        domain: &str,
        mx: Option<&[MxTarget]>,
    ) -> Result<Open, (NoConnection, bool)> {
        let settings = &self.shared.settings;
        let relay;
        let fresh;
        let (targets, port): (&[MxTarget], u16) = match (&self.target.relay, mx) {
            (Some((host, port)), _) => {
                relay = self
                    .shared
                    .resolver
                    .resolve_host(host)
                    .await
                    .map_err(|e| (dns_failure(&e, host), true))?;
                (std::slice::from_ref(&relay), *port)
            }
            (None, Some(mx)) => (mx, settings.port),
            (None, None) => {
                fresh = self
                    .shared
                    .resolver
                    .resolve(domain)
                    .await
                    .map_err(|e| (dns_failure(&e, domain), false))?;
                (&fresh[..], settings.port)
            }
        };
        let mut cfg = settings.client.clone();
        cfg.tls = self.target.tls;
        let mut errors: Vec<(bool, String)> = Vec::new();
        let candidates = targets
            .iter()
            .flat_map(|t| t.addrs.iter().map(move |ip| (t, *ip)))
            .take(settings.max_addresses.max(1));
        for (target, ip) in candidates {
            let addr = SocketAddr::new(ip, port);
            match SmtpConnection::connect(addr, &target.host, &cfg).await {
                Ok(smtp) => {
                    return Ok(Open {
                        smtp,
                        host: target.host.clone(),
                        sent: 0,
                    })
                }
                Err(e) => {
                    debug!(dest = %self.key, %addr, error = %e, "connection failed");
                    errors.push((e.is_permanent(), connect_failure(&e, &target.host, addr)));
                }
            }
        }
        // Permanent only if every host refused permanently (RFC 5321 §5.1: the next MX may
        // still take it). The last error is the one reported.
        let permanent = !errors.is_empty() && errors.iter().all(|(p, _)| *p);
        let reply = errors
            .pop()
            .map(|(_, r)| r)
            .unwrap_or_else(|| format!("4.4.4 no address to connect to for {domain}"));
        Err((NoConnection { permanent, reply }, true))
    }
}

/// A reply text for a DNS failure: the enhanced code first (so the DSN `Status` is right), then
/// what happened.
fn dns_failure(e: &DnsError, domain: &str) -> NoConnection {
    NoConnection {
        permanent: e.is_permanent(),
        reply: format!("{} {domain}: {e}", e.enhanced_code()),
    }
}

fn connect_failure(e: &DeliveryError, host: &str, addr: SocketAddr) -> String {
    match e {
        // The server's own words, for the DSN's Diagnostic-Code.
        DeliveryError::Greeting(reply) | DeliveryError::Refused { reply, .. } => {
            format!("{reply} (from {host}[{}])", addr.ip())
        }
        // RFC 3463 X.7.4: security features not supported.
        DeliveryError::TlsRequired => format!(
            "4.7.4 TLS is required, but {host}[{}] does not offer STARTTLS",
            addr.ip()
        ),
        DeliveryError::Tls(_) => format!("4.7.5 {host}[{}]: {e}", addr.ip()),
        // X.4.1: no answer from host; X.4.2: bad connection.
        DeliveryError::Connect(_) | DeliveryError::Timeout(_) => {
            format!("4.4.1 connect to {host}[{addr}]: {e}")
        }
        _ => format!("4.4.2 {host}[{addr}]: {e}"),
    }
}

/// "452 too many recipients" (RFC 5321 §4.5.3.1.10; enhanced 4.5.3, RFC 3463), as opposed to
/// the other 452s (insufficient storage, 4.3.1) that mean "later".
fn too_many_recipients(outcome: &RecipientOutcome) -> bool {
    match outcome {
        RecipientOutcome::Deferred(r) if r.code == 452 => match r.enhanced {
            Some(e) => (e.class, e.subject, e.detail) == (4, 5, 3),
            None => r
                .text()
                .to_ascii_lowercase()
                .contains("too many recipients"),
        },
        _ => false,
    }
}

fn attempt_result(outcome: RecipientOutcome) -> AttemptResult {
    match outcome {
        RecipientOutcome::Delivered(r) => AttemptResult::Delivered {
            reply: r.to_string(),
        },
        RecipientOutcome::Deferred(r) => AttemptResult::Temporary {
            reply: r.to_string(),
        },
        RecipientOutcome::Failed(r) => AttemptResult::Permanent {
            reply: r.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(host: &str, preference: u16) -> MxTarget {
        MxTarget {
            host: host.into(),
            preference,
            addrs: vec!["127.0.0.1".parse().unwrap()],
        }
    }

    #[test]
    fn site_key_ignores_order_preference_and_case() {
        let a = [mx("mx1.site.test", 10), mx("mx2.site.test", 20)];
        let b = [mx("MX2.site.test.", 5), mx("mx1.site.test", 50)];
        assert_eq!(site_key(&a, None), "mx:mx1.site.test,mx2.site.test");
        assert_eq!(site_key(&a, None), site_key(&b, None));
        // Another route (other limits or TLS) is another destination.
        assert_ne!(site_key(&a, None), site_key(&a, Some(0)));
        assert_ne!(
            site_key(&a, None),
            site_key(&[mx("mx1.site.test", 10)], None)
        );
    }

    #[test]
    fn route_patterns() {
        assert!(domain_matches("*", "example.org"));
        assert!(domain_matches("Example.ORG", "example.org."));
        assert!(!domain_matches("example.org", "mail.example.org"));
        assert!(domain_matches("*.example.org", "mail.example.org"));
        assert!(domain_matches("*.example.org", "a.b.EXAMPLE.org"));
        assert!(!domain_matches("*.example.org", "example.org"));
        assert!(!domain_matches("*.example.org", "badexample.org"));
    }
}
