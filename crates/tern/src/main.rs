//! `tern`: the binary. It parses the command line, loads the configuration and wires the
//! stages together (queue actor, ingress session actors, HTTP endpoint); the stages themselves
//! live in their own crates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::Addr;
use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tern::config::{self, Config};
use tern::tls;
use tern_ingress::{Ingress, ListenerKind, ListenerSpec, Settings};
use tern_queue::{GetStats, QueueActor, QueueConfig, SledOptions, SledStorage, Storage};
use tracing::info;

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
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}

fn serve(config_file: Option<&Path>) -> Result<()> {
    let config = config::load(config_file)?;
    init_tracing();
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let tls = tls::server_config(&config.tls, data_dir, &config.server.hostname)?;
    let storage = SledStorage::open(
        &spool_dir(data_dir),
        SledOptions {
            cache_bytes: config.queue.cache_size,
            min_free_bytes: config.queue.min_free_space,
            ..SledOptions::default()
        },
    )
    .with_context(|| format!("cannot open the spool in {}", data_dir.display()))?;
    let settings = ingress_settings(&config, tls);
    let http_listen = config.http.listen;

    let system = actix::System::new();
    system.block_on(async move {
        let queue = tern_queue::spawn_queue(Arc::new(storage), QueueConfig::default())
            .context("cannot recover the spool")?;
        let ingress = Ingress::start(settings, queue.clone().recipient())?;
        let http = HttpServer::new({
            let queue = queue.clone();
            move || {
                App::new()
                    .app_data(web::Data::new(queue.clone()))
                    .route("/health", web::get().to(health))
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
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn health(queue: web::Data<Addr<QueueActor>>) -> HttpResponse {
    match queue.send(GetStats).await {
        Ok(stats) => HttpResponse::Ok().json(serde_json::json!({
            "status": "ok",
            "queued": stats.messages,
            "bytes": stats.bytes,
            "recovered": stats.recovered,
            "scheduled": stats.scheduled,
            "corrupt": stats.corrupt,
            "committed": stats.committed,
            "syncs": stats.syncs,
            "failed": stats.failed,
        })),
        Err(e) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "unavailable", "error": e.to_string()})),
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
        listeners,
        tls: Some(tls),
        relay_networks: config.relay.networks.clone(),
        relay_domains: config
            .relay
            .domains
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .collect(),
        max_connections: smtp.max_connections,
        max_connections_per_ip: smtp.max_connections_per_ip,
        message_size: limits.message_size as usize,
        recipients: limits.recipients,
        command_line: limits.command_line,
        data_line: limits.data_line,
        errors: limits.errors,
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
