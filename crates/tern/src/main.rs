//! `tern`: the binary. It parses the command line, loads the configuration and wires the
//! stages together (queue actor, ingress session actors, HTTP endpoint); the stages themselves
//! live in their own crates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tern::config::{self, Config};
use tern::queue_cli::{self, AdminClient};
use tern::tls;
use tern_delivery::{ClientConfig, DeliverySettings, DestinationLimits};
use tern_ingress::{Ingress, ListenerKind, ListenerSpec, Settings};
use tern_queue::schedule::RetryPolicy;
use tern_queue::{AttachDelivery, QueueConfig, SledOptions, SledStorage, Storage};
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "tern", version, about = "Tern mail transfer agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded defaults when no --config is given).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Inspect the spool directly (the server must be stopped: sled locks its directory).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// SASL user tools.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// The running server's suppression list (over its loopback HTTP admin API).
    Suppress {
        /// The server's configuration file, to find `http.listen`.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// The admin API address (default: http.listen from --config, else 127.0.0.1:8025).
        #[arg(long, global = true)]
        http: Option<SocketAddr>,
        #[command(subcommand)]
        command: SuppressCommand,
    },
    /// The running server's queue (over its loopback HTTP admin API).
    Queue {
        /// The server's configuration file, to find `http.listen`.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// The admin API address (default: http.listen from --config, else 127.0.0.1:8025).
        #[arg(long, global = true)]
        http: Option<SocketAddr>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// DKIM keys: generate one, sign or verify a message.
    Dkim {
        #[command(subcommand)]
        command: tern::dkim::DkimCommand,
    },
}

#[derive(Subcommand)]
enum SuppressCommand {
    /// Put ADDRESS on the suppression list.
    Add {
        address: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take ADDRESS off the list.
    Remove { address: String },
    /// The suppressed addresses.
    List,
    /// Add every address in FILE: one per line, optionally followed by a comma or whitespace
    /// and a reason; blank lines and lines starting with # are skipped.
    Import { file: PathBuf },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Queued messages and their recipients' states (like mailq).
    List {
        #[arg(long)]
        domain: Option<String>,
        /// pending, held, in-flight, deferred, delivered or failed.
        #[arg(long)]
        state: Option<String>,
    },
    /// One message: envelope, recipient states, client and headers.
    Show { id: String },
    /// Retry deferred mail now (all, or one domain's).
    Flush {
        #[arg(long)]
        domain: Option<String>,
    },
    /// Remove a message from the queue; --bounce tells the sender.
    Delete {
        id: String,
        #[arg(long)]
        bounce: bool,
    },
    /// Put a message on hold: nothing of it is delivered (and it does not expire) until
    /// `release`.
    Hold { id: String },
    /// Take a message off hold; its recipients are due at once.
    Release { id: String },
    /// Hold delivery to DOMAIN (mail for it stays queued).
    Suspend { domain: String },
    /// Resume delivery to DOMAIN and retry its mail now.
    Resume { domain: String },
    /// Counts by domain and state.
    Stats,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE and print the effective configuration (defaults, file and TERN_* env).
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// One JSON line per spooled message.
    List {
        #[arg(long, default_value = "tern-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Print an argon2id hash of PASSWORD for `auth.users[].password_hash`.
    Hash { password: String },
}

/// How long sessions get, after SIGTERM, to finish what they are doing (a message in the middle
/// of being spooled) before the process exits; idle sessions are told 421 at once.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` is the cause chain on one line, never a backtrace (anyhow's `Debug` report
            // adds one whenever RUST_BACKTRACE is set): an operator needs the causes.
            eprintln!("tern: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let config = config::load(Some(&file))?;
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Spool {
            command: SpoolCommand::List { data_dir },
        } => spool_list(&data_dir),
        Command::Auth {
            command: AuthCommand::Hash { password },
        } => {
            println!("{}", config::hash_password(&password)?);
            Ok(())
        }
        Command::Queue {
            config,
            http,
            json,
            command,
        } => queue_command(config.as_deref(), http, json, command),
        Command::Suppress {
            config,
            http,
            command,
        } => suppress_command(config.as_deref(), http, command),
        Command::Dkim { command } => tern::dkim::run(command),
    }
}

fn admin_client(config_file: Option<&Path>, http: Option<SocketAddr>) -> Result<AdminClient> {
    let addr = match http {
        Some(addr) => addr,
        None => config::load(config_file)?.http.listen,
    };
    Ok(AdminClient::new(addr))
}

fn suppress_command(
    config_file: Option<&Path>,
    http: Option<SocketAddr>,
    command: SuppressCommand,
) -> Result<()> {
    let client = admin_client(config_file, http)?;
    match command {
        SuppressCommand::Add { address, reason } => {
            client.suppression_add(&[(address.clone(), reason)], "manual")?;
            println!("{address} suppressed");
        }
        SuppressCommand::Remove { address } => {
            client.suppression_remove(&address)?;
            println!("{address} removed from the suppression list");
        }
        SuppressCommand::List => {
            for e in client.suppression_list()? {
                println!("{}\t{}\t{}", e.address, e.source, e.reason);
            }
        }
        SuppressCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let entries =
                parse_suppression_file(&text).with_context(|| format!("in {}", file.display()))?;
            let n = client.suppression_add(&entries, "import")?;
            println!("{n} address(es) imported from {}", file.display());
        }
    }
    Ok(())
}

/// `address[,| ]reason` per line; `#` comments and blank lines skipped. A bad address names
/// its line.
fn parse_suppression_file(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (address, reason) = match line.find([',', ' ', '\t']) {
            Some(i) => (&line[..i], line[i + 1..].trim()),
            None => (line, ""),
        };
        tern_policy::suppression::normalize(address).with_context(|| format!("line {}", n + 1))?;
        out.push((address.to_string(), reason.to_string()));
    }
    Ok(out)
}

fn queue_command(
    config_file: Option<&Path>,
    http: Option<SocketAddr>,
    json: bool,
    command: QueueCommand,
) -> Result<()> {
    let client = admin_client(config_file, http)?;
    match command {
        QueueCommand::List { domain, state } => {
            let list = client.list(domain.as_deref(), state.as_deref())?;
            if json {
                print_json(&list)?;
            } else {
                print!("{}", queue_cli::format_list(&list));
            }
        }
        QueueCommand::Show { id } => {
            let detail = client.show(&id)?;
            if json {
                print_json(&detail)?;
            } else {
                print!("{}", queue_cli::format_message(&detail.summary));
                println!(
                    "client: {} helo={} tls={} auth={}",
                    detail.client.addr,
                    detail.client.helo,
                    detail.client.tls.as_deref().unwrap_or("none"),
                    detail.client.auth_user.as_deref().unwrap_or("none")
                );
                print!("{}", detail.headers);
            }
        }
        QueueCommand::Flush { domain } => {
            let n = client.flush(domain.as_deref())?;
            println!("{n} message(s) scheduled for immediate delivery");
        }
        QueueCommand::Delete { id, bounce } => {
            client.delete(&id, bounce)?;
            println!(
                "{id} deleted{}",
                if bounce { " (sender notified)" } else { "" }
            );
        }
        QueueCommand::Hold { id } => {
            let changed = client.hold(&id, true)?;
            println!("{id} {}", if changed { "held" } else { "was already held" });
        }
        QueueCommand::Release { id } => {
            let changed = client.hold(&id, false)?;
            println!(
                "{id} {}",
                if changed {
                    "released, due now"
                } else {
                    "was not held"
                }
            );
        }
        QueueCommand::Suspend { domain } => {
            let list = client.suspend(&domain, true)?;
            println!("{}", queue_cli::format_suspended(&list));
        }
        QueueCommand::Resume { domain } => {
            let list = client.suspend(&domain, false)?;
            println!("{}", queue_cli::format_suspended(&list));
        }
        QueueCommand::Stats => {
            let stats = client.stats()?;
            if json {
                print_json(&stats)?;
            } else {
                print!("{}", queue_cli::format_stats(&stats));
            }
        }
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Logs to stderr; batched (see `tern::logging`) unless stderr is a terminal. The guard flushes
/// the batches when dropped.
fn init_tracing() -> Option<tern::logging::FlushGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal);
    let batched = if terminal {
        None
    } else {
        tern::logging::BatchedStderr::start().ok()
    };
    match batched {
        Some((writer, guard)) => {
            let hook_writer = writer.clone();
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                hook_writer.flush_now();
                previous(info);
            }));
            builder.with_writer(writer).init();
            Some(guard)
        }
        None => {
            builder.with_writer(std::io::stderr).init();
            None
        }
    }
}

fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}

fn serve(config_file: Option<&Path>) -> Result<()> {
    let config = config::load(config_file)?;
    let _log = init_tracing();
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let tls = tls::server_config(&config.tls, data_dir, &config.server.hostname)?;
    // The [[dkim]] keys are read at start so a bad key file stops the server here.
    let dkim = tern::dkim::signer(&config)?;
    let storage = SledStorage::open(
        &spool_dir(data_dir),
        SledOptions {
            cache_bytes: config.queue.cache_size,
            min_free_bytes: config.queue.min_free_space,
            ..SledOptions::default()
        },
    )
    .with_context(|| format!("cannot open the spool in {}", data_dir.display()))?;
    let mut settings = ingress_settings(&config, tls);
    settings.dkim = (!dkim.is_empty()).then(|| Arc::new(dkim));
    let http_listen = config.http.listen;

    let queue_config = queue_config(&config);
    let delivery = match config.delivery.enabled {
        true => Some(delivery_settings(&config)?),
        false => None,
    };
    let policy_config = config.policy.clone();
    let full_config = config.clone();
    let policy_settings = policy_settings(&config);
    // One resolver (and one answer cache) for MX lookups, blocklist and reverse-DNS queries.
    let resolver = if delivery.is_some() || policy_needs_dns(&policy_settings) {
        let nameservers =
            (!config.dns.nameservers.is_empty()).then(|| config.dns.nameservers.clone());
        let resolver = tern_dns::MxResolver::with_timeout(
            nameservers,
            config.delivery.allow_private_addresses,
            config.dns.timeout,
            tern_dns::DEFAULT_ATTEMPTS,
        )
        .context("cannot set up the DNS resolver (dns.nameservers)")?;
        Some(Arc::new(resolver))
    } else {
        None
    };

    let system = actix::System::new();
    system.block_on(async move {
        // The queue actor shares the first session thread. On a thread of its own, every group
        // commit woke that thread to index a handful of messages: a context switch per commit
        // on a machine whose cores are busy with sessions (docs/benchmarks.md, session 6).
        let first_sessions = actix::Arbiter::new();
        let (queue, queue_client) = tern_queue::spawn_queue_with_client_on(
            Arc::new(storage),
            queue_config,
            &first_sessions.handle(),
        )
        .context("cannot recover the spool")?;
        if let (Some(settings), Some(resolver)) = (delivery, resolver.clone()) {
            let dispatcher =
                tern_delivery::spawn_delivery(settings, resolver, queue.clone().recipient());
            queue.do_send(AttachDelivery(dispatcher.recipient()));
        } else {
            info!("delivery.enabled = false: mail is accepted and kept in the queue");
        }
        let mut settings = settings;
        let (policy, policy_client) = start_policy(&full_config, policy_settings, resolver)?;
        settings.policy = policy_config.enabled.then_some(policy_client);
        if policy_config.suppression {
            queue.do_send(tern_queue::AttachSuppression(policy.clone().recipient()));
        }
        let ingress = Ingress::start_with(settings, queue_client, Some(first_sessions))?;
        let http = HttpServer::new({
            let queue = queue.clone();
            let policy = policy.clone();
            move || {
                App::new()
                    .app_data(web::Data::new(queue.clone()))
                    .app_data(web::Data::new(policy.clone()))
                    .configure(tern::admin::routes)
            }
        })
        .workers(1)
        .disable_signals()
        .bind(http_listen)
        .with_context(|| format!("cannot listen on http.listen = {http_listen}"))?
        .run();
        let http_handle = http.handle();
        actix_rt::spawn(http);
        info!(
            smtp = ?ingress.local_addrs.iter().map(|(_, a)| a).collect::<Vec<_>>(),
            http = %http_listen,
            "tern ready"
        );
        shutdown_signal().await;
        info!("shutting down");
        ingress.shutdown(SHUTDOWN_GRACE).await;
        http_handle.stop(true).await;
        // The queue's arbiter is not stopped before the process exits: write out now what
        // changed in the last 20 ms (log lines, delivery state).
        if let Err(e) = queue.send(tern_queue::WriteOutNow).await {
            warn!(error = %e, "queue gone before the final write-out");
        }
        anyhow::Ok(())
    })
}

fn policy_settings(config: &Config) -> tern_policy::PolicySettings {
    let p = &config.policy;
    tern_policy::PolicySettings {
        hostname: config.server.hostname.clone(),
        connect_rate: p.connect_rate,
        dnsbl_zones: p.dnsbl_zones.clone(),
        helo: tern_policy::HeloPolicy {
            require_fqdn: p.helo_require_fqdn,
            reject_own_hostname: p.helo_reject_own_hostname,
        },
        sender_rate: p.sender_rate,
        user_rate: p.user_rate,
        rcpt_rate: p.rcpt_rate,
        dnsbl_timeout: p.dnsbl_timeout,
        suppression_action: p.suppression_action,
        spf: p.spf,
        dkim_verify: p.dkim_verify,
        arc_verify: p.arc_verify,
        dmarc: p.dmarc,
        greylist: tern_policy::GreylistSettings {
            enabled: p.greylisting,
            delay: p.greylist_delay,
            retry_window: p.greylist_retry_window,
            expiry: p.greylist_expiry,
        },
        reverse_dns: p.reverse_dns,
        reverse_dns_timeout: p.reverse_dns_timeout,
    }
}

/// Whether the policy stage makes DNS queries (blocklists, reverse DNS).
fn policy_needs_dns(settings: &tern_policy::PolicySettings) -> bool {
    !settings.dnsbl_zones.is_empty() || settings.reverse_dns != tern_policy::ReverseDns::Off
}

/// Starts the validation actor (with the suppression list in `<data_dir>/suppression` and the
/// greylist in `<data_dir>/greylist` when enabled) and returns its address and what sessions
/// use to consult it.
fn start_policy(
    full: &Config,
    settings: tern_policy::PolicySettings,
    resolver: Option<Arc<tern_dns::MxResolver>>,
) -> Result<(
    actix::Addr<tern_policy::PolicyActor>,
    tern_policy::PolicyClient,
)> {
    let config = &full.policy;
    let data_dir = full.server.data_dir.as_path();
    let resolver = resolver.filter(|_| policy_needs_dns(&settings));
    let authenticate = config.enabled
        && (settings.spf != tern_policy::SpfAction::Off
            || settings.dkim_verify
            || settings.arc_verify
            || settings.dmarc != tern_policy::DmarcAction::Off);
    let greylist = settings.greylist;
    let mut actor = tern_policy::PolicyActor::new(settings, resolver);
    if authenticate {
        let dns = &full.dns;
        let nameservers = (!dns.nameservers.is_empty()).then_some(dns.nameservers.as_slice());
        let authenticator =
            tern_policy::Authenticator::new(&full.server.hostname, nameservers, dns.timeout)
                .map_err(|e| anyhow::anyhow!(e))
                .context("cannot set up the resolver for SPF/DKIM/DMARC (dns.nameservers)")?;
        actor = actor.with_authenticator(authenticator);
    }
    if config.enabled && config.content_rules {
        let rules = if config.rules_file.as_os_str().is_empty() {
            tern_policy::Rules::builtin()
        } else {
            tern_policy::Rules::load(&config.rules_file)
                .with_context(|| format!("policy.rules_file = {}", config.rules_file.display()))?
        };
        actor = actor.with_content(tern_policy::ContentSettings {
            rules,
            reject_score: config.reject_score,
            quarantine_score: config.quarantine_score,
        });
    }
    if greylist.enabled {
        let dir = data_dir.join("greylist");
        let list = tern_policy::Greylist::open(&dir, greylist)
            .with_context(|| format!("cannot open the greylist in {}", dir.display()))?;
        actor = actor.with_greylist(list);
    }
    if !config.recipients_file.as_os_str().is_empty() {
        let path = &config.recipients_file;
        let map =
            tern_policy::recipients::RecipientMap::load(path).context("policy.recipients_file")?;
        info!(file = %path.display(), entries = map.len(), "recipients file loaded");
        actor = actor.with_recipients(map);
    }
    if config.suppression {
        let dir = data_dir.join("suppression");
        let list = tern_policy::SuppressionList::open(&dir)
            .with_context(|| format!("cannot open the suppression list in {}", dir.display()))?;
        actor = actor.with_suppression(list);
    }
    let steps = actor.steps();
    let addr = tern_policy::spawn(actor);
    let client = tern_policy::PolicyClient::new(&addr, steps, config.suppression, config.timeout);
    Ok((addr, client))
}

fn queue_config(config: &Config) -> QueueConfig {
    let q = &config.queue;
    QueueConfig {
        retry: RetryPolicy {
            intervals: q.retry_schedule.clone(),
            max_lifetime: q.max_lifetime,
            delay_warning: q.delay_warning,
        },
        hostname: config.server.hostname.clone(),
        data_dir: Some(config.server.data_dir.clone()),
        ..QueueConfig::default()
    }
}

/// The authorities trusted for `tls = "required"` routes. A missing default bundle is only a
/// warning (no route may need it); a bundle the operator named must load.
fn tls_roots(d: &config::Delivery) -> Result<rustls::RootCertStore> {
    let path = &d.tls_ca_file;
    if path.as_os_str() == config::SYSTEM_CA_FILE && !path.exists() {
        warn!(path = %path.display(), "no CA bundle: routes with tls = \"required\" will fail closed");
        return Ok(rustls::RootCertStore::empty());
    }
    tls::load_roots(path).with_context(|| format!("delivery.tls_ca_file = {}", path.display()))
}

fn delivery_settings(config: &Config) -> Result<DeliverySettings> {
    let d = &config.delivery;
    let helo = if d.helo_name.is_empty() {
        config.server.hostname.clone()
    } else {
        d.helo_name.clone()
    };
    let mut client = ClientConfig::new(helo);
    client.tls_roots = Arc::new(tls_roots(d)?);
    client.connect_timeout = d.connect_timeout;
    client.command_timeout = d.command_timeout;
    client.data_timeout = d.data_timeout;
    let limits = DestinationLimits {
        max_connections: d.max_connections,
        max_messages_per_connection: d.max_messages_per_connection,
        max_message_rate: d.max_message_rate,
        max_recipients_per_transaction: d.max_recipients_per_transaction,
    };
    let mut settings = DeliverySettings::new(client);
    settings.port = d.port;
    settings.limits = limits;
    settings.idle_timeout = d.idle_timeout;
    settings.mx_max_age = d.mx_max_age;
    settings.routes = config
        .routes
        .iter()
        .map(|r| tern_delivery::Route {
            domain: r.domain.clone(),
            relay: r
                .relay
                .as_ref()
                .map(|h| (h.host.clone(), h.port.unwrap_or(d.port))),
            tls: r.tls,
            limits: DestinationLimits {
                max_connections: r.max_connections.unwrap_or(limits.max_connections),
                max_messages_per_connection: r
                    .max_messages_per_connection
                    .unwrap_or(limits.max_messages_per_connection),
                max_message_rate: r.max_message_rate.or(limits.max_message_rate),
                max_recipients_per_transaction: r
                    .max_recipients_per_transaction
                    .unwrap_or(limits.max_recipients_per_transaction),
            },
        })
        .collect();
    Ok(settings)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn ingress_settings(config: &Config, tls: Arc<rustls::ServerConfig>) -> Settings {
    let smtp = &config.smtp;
    let listeners = [
        (&smtp.listen, ListenerKind::Smtp),
        (&smtp.submission_listen, ListenerKind::Submission),
        (&smtp.submissions_listen, ListenerKind::Submissions),
    ]
    .into_iter()
    .flat_map(|(addrs, kind)| {
        addrs.iter().map(move |addr| ListenerSpec {
            addr: *addr,
            kind,
            proxy_protocol: smtp.proxy_protocol,
        })
    })
    .collect();
    let limits = &config.limits;
    Settings {
        hostname: config.server.hostname.clone(),
        postmaster: Some(config.server.postmaster.clone()).filter(|p| !p.is_empty()),
        listeners,
        tls: Some(tls),
        relay: tern_policy::relay::RelayRules::new(
            config.relay.networks.clone(),
            &config.relay.domains,
        ),
        max_connections: smtp.max_connections,
        max_connections_per_ip: smtp.max_connections_per_ip,
        message_size: limits.message_size as usize,
        recipients: limits.recipients,
        command_line: limits.command_line,
        data_line: limits.data_line,
        errors: limits.errors,
        max_hops: limits.max_hops,
        command_timeout: limits.command_timeout,
        data_timeout: limits.data_timeout,
        bare_line_endings: smtp.bare_line_endings,
        vrfy: smtp.vrfy,
        users: config
            .auth
            .users
            .iter()
            .map(|u| (u.name.clone(), u.password_hash.clone()))
            .collect::<HashMap<_, _>>(),
        workers: smtp.workers,
        policy: None,
        dkim: None,
    }
}

fn spool_list(data_dir: &Path) -> Result<()> {
    let dir = spool_dir(data_dir);
    if !dir.exists() {
        anyhow::bail!("no spool at {}", dir.display());
    }
    let storage = SledStorage::open(
        &dir,
        SledOptions {
            min_free_bytes: 0,
            ..SledOptions::default()
        },
    )
    .with_context(|| {
        format!(
            "cannot open the spool in {} (is the server running?)",
            dir.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    for meta in storage.scan() {
        let meta = meta.context("damaged spool record")?;
        let line = serde_json::json!({
            "id": meta.id.to_string(),
            "sender": meta.envelope.sender,
            "recipients": meta.envelope.recipients.iter().map(|r| &r.address).collect::<Vec<_>>(),
            "size": meta.body_len,
            "arrived_ms": meta.arrived_ms,
        });
        use std::io::Write;
        writeln!(out, "{line}")?;
    }
    Ok(())
}
