//! DKIM in the binary: the [`Signer`] built from `[[dkim]]`, and `tern dkim` (keygen, sign,
//! verify) for operators setting up and testing their keys.
//!
//! Which mail gets signed (authenticated or trusted submitters) is decided where the signer
//! is used, not here.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mail_auth::common::parse::TxtRecordParser as _;
use mail_auth::common::verify::DomainKey;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, ResolverCache, Txt};
use tern_dkim::{Algorithm, DkimKey, Signer};

use crate::config::{self, Config};

/// The signer for `config`'s `[[dkim]]` keys (empty when there are none). Every key file is
/// read here; an error names the entry (`dkim[0].private_key`) and the file.
pub fn signer(config: &Config) -> Result<Signer> {
    let keys = config
        .dkim
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            DkimKey::load(
                &entry.domain,
                &entry.selector,
                entry.algorithm,
                &entry.private_key,
            )
            .with_context(|| format!("dkim[{i}].private_key = {}", entry.private_key.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Signer::new(keys))
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    s.parse().map_err(|e: tern_dkim::DkimError| e.to_string())
}

#[derive(Subcommand)]
pub enum DkimCommand {
    /// Generate a signing key: writes the private key (mode 0600) and prints the DNS TXT
    /// record to publish and the `[[dkim]]` entry for the configuration.
    Keygen {
        domain: String,
        selector: String,
        /// rsa-sha256 or ed25519-sha256.
        #[arg(long, default_value = "rsa-sha256", value_parser = parse_algorithm)]
        algorithm: Algorithm,
        /// RSA key size (2048 to 4096; ignored for ed25519-sha256).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Where to write the private key (default: DOMAIN.SELECTOR.pem); never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign the message on standard input with the `[[dkim]]` keys of FILE and write it,
    /// signatures prepended, to standard output (fails when no key is for its From: domain).
    Sign {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Verify the DKIM signatures of the message on standard input: one line per signature;
    /// exit status 0 only when there is at least one and all pass.
    Verify {
        /// A key record, NAME=VALUE ("s1._domainkey.example.org=v=DKIM1; k=rsa; p=...");
        /// repeatable. With any --txt, DNS is not asked at all; without, the system resolver.
        #[arg(long)]
        txt: Vec<String>,
    },
}

/// Runs `tern dkim ...`.
pub fn run(command: DkimCommand) -> Result<()> {
    match command {
        DkimCommand::Keygen {
            domain,
            selector,
            algorithm,
            bits,
            out,
        } => keygen(&domain, &selector, algorithm, bits, out),
        DkimCommand::Sign { config } => sign(&config),
        DkimCommand::Verify { txt } => verify(&txt),
    }
}

fn keygen(
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
    bits: usize,
    out: Option<PathBuf>,
) -> Result<()> {
    let key = tern_dkim::generate(domain, selector, algorithm, bits)?;
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{domain}.{selector}.pem")));
    write_private(&path, key.private_key_pem.as_bytes())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "# private key written to {}", path.display())?;
    writeln!(stdout, "# publish this DNS record:")?;
    writeln!(stdout, "{}", key.dns_txt)?;
    writeln!(stdout)?;
    writeln!(stdout, "# and add this to the configuration:")?;
    writeln!(stdout, "[[dkim]]")?;
    writeln!(stdout, "domain = {:?}", tern_dkim::check_domain(domain)?)?;
    writeln!(stdout, "selector = {selector:?}")?;
    let absolute = std::path::absolute(&path).unwrap_or(path);
    writeln!(stdout, "private_key = {:?}", absolute.display().to_string())?;
    writeln!(stdout, "algorithm = {:?}", algorithm.as_str())?;
    Ok(())
}

/// Creates `path` with mode 0600, refusing to replace an existing file.
fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| {
        format!(
            "cannot create {} (an existing key is never overwritten)",
            path.display()
        )
    })?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Standard input as a message with CRLF line ends (what SMTP carries and what gets signed):
/// a file saved with bare LF line ends is converted.
fn read_message() -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    std::io::stdin()
        .read_to_end(&mut raw)
        .context("cannot read the message from standard input")?;
    let mut message = Vec::with_capacity(raw.len() + raw.len() / 32);
    let mut previous = 0u8;
    for &b in &raw {
        if b == b'\n' && previous != b'\r' {
            message.push(b'\r');
        }
        message.push(b);
        previous = b;
    }
    Ok(message)
}

fn sign(config_file: &Path) -> Result<()> {
    let config = config::load(Some(config_file))?;
    let signer = signer(&config)?;
    let message = read_message()?;
    let Some(headers) = signer.sign(&message)? else {
        match tern_dkim::from_domain(&message) {
            Some(domain) => bail!(
                "no [[dkim]] key in {} is for the From: domain {domain}",
                config_file.display()
            ),
            None => bail!("the message has no From: address to sign for"),
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&headers)?;
    stdout.write_all(&message)?;
    stdout.flush()?;
    Ok(())
}

/// TXT records given on the command line, as mail-auth's cache: lookups of other names miss
/// and go to the (empty) resolver, which fails them.
struct GivenRecords(HashMap<String, Txt>);

impl ResolverCache<String, Txt> for GivenRecords {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        String: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.get(name).cloned()
    }

    fn remove<Q>(&self, _name: &Q) -> Option<Txt>
    where
        String: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _key: String, _value: Txt, _valid_until: Instant) {}
}

fn given_records(txt: &[String]) -> Result<GivenRecords> {
    let mut records = HashMap::new();
    for arg in txt {
        let Some((name, value)) = arg.split_once('=') else {
            bail!("--txt {arg:?}: expected NAME=VALUE, e.g. s1._domainkey.example.org=v=DKIM1; k=rsa; p=...");
        };
        let key = DomainKey::parse(value.as_bytes())
            .map_err(|e| anyhow::anyhow!("--txt {name}: not a DKIM key record: {e}"))?;
        let mut name = name.trim().to_ascii_lowercase();
        if !name.ends_with('.') {
            name.push('.');
        }
        records.insert(name, Txt::from(key));
    }
    Ok(GivenRecords(records))
}

fn verify(txt: &[String]) -> Result<()> {
    use mail_auth::hickory_resolver::config::{
        NameServerConfigGroup, ResolverConfig, ResolverOpts,
    };
    let message = read_message()?;
    let Some(parsed) = AuthenticatedMessage::parse(&message) else {
        bail!("cannot parse the message");
    };
    let authenticator = if txt.is_empty() {
        MessageAuthenticator::new_system_conf().context("cannot set up the system resolver")?
    } else {
        // No name servers: only the given records are known.
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(1);
        opts.attempts = 0;
        MessageAuthenticator::new(
            ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::new()),
            opts,
        )
        .context("cannot set up the resolver")?
    };
    let records = given_records(txt)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outputs = runtime.block_on(async {
        if txt.is_empty() {
            authenticator.verify_dkim(&parsed).await
        } else {
            authenticator
                .verify_dkim(mail_auth::Parameters::new(&parsed).with_txt_cache(&records))
                .await
        }
    });
    if outputs.is_empty() {
        bail!("no DKIM-Signature header found");
    }
    let mut stdout = std::io::stdout().lock();
    let mut failed = 0;
    for output in &outputs {
        let who = match output.signature() {
            Some(s) => format!("d={} s={} a={}", s.d, s.s, algorithm_name(s.a)),
            None => "(unparsable signature)".to_string(),
        };
        let line = match output.result() {
            DkimResult::Pass => format!("pass {who}"),
            DkimResult::Neutral(e) => format!("neutral {who}: {e}"),
            DkimResult::Fail(e) => format!("fail {who}: {e}"),
            DkimResult::PermError(e) => format!("permerror {who}: {e}"),
            DkimResult::TempError(e) => format!("temperror {who}: {e}"),
            DkimResult::None => format!("none {who}"),
        };
        if !matches!(output.result(), DkimResult::Pass) {
            failed += 1;
        }
        writeln!(stdout, "{line}")?;
    }
    stdout.flush()?;
    if failed > 0 {
        bail!(
            "{failed} of {} DKIM signature(s) did not pass",
            outputs.len()
        );
    }
    Ok(())
}

fn algorithm_name(a: mail_auth::common::crypto::Algorithm) -> &'static str {
    match a {
        mail_auth::common::crypto::Algorithm::RsaSha1 => "rsa-sha1",
        mail_auth::common::crypto::Algorithm::RsaSha256 => "rsa-sha256",
        mail_auth::common::crypto::Algorithm::Ed25519Sha256 => "ed25519-sha256",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(dir: &Path, entries: &str) -> Config {
        let file = dir.join("tern.toml");
        std::fs::write(&file, entries).unwrap();
        config::load_from_env_and(Some(&file), Vec::new()).unwrap()
    }

    #[test]
    fn signer_loads_every_key_and_names_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, _) = tern_dkim::keygen("example.org", "e1", Algorithm::Ed25519Sha256, 0).unwrap();
        let key = dir.path().join("e1.pem");
        std::fs::write(&key, pem).unwrap();
        let c = config_with(
            dir.path(),
            &format!(
                "[[dkim]]\ndomain = \"example.org\"\nselector = \"e1\"\nprivate_key = {:?}\n\
                 algorithm = \"ed25519-sha256\"\n",
                key.display().to_string()
            ),
        );
        let loaded = signer(&c).unwrap();
        assert_eq!(loaded.keys().len(), 1);
        assert_eq!(loaded.keys()[0].algorithm(), Algorithm::Ed25519Sha256);

        let missing = dir.path().join("missing.pem");
        let c = config_with(
            dir.path(),
            &format!(
                "[[dkim]]\ndomain = \"example.org\"\nselector = \"e1\"\nprivate_key = {:?}\n\
                 algorithm = \"ed25519-sha256\"\n\
                 [[dkim]]\ndomain = \"example.org\"\nselector = \"r1\"\nprivate_key = {:?}\n",
                key.display().to_string(),
                missing.display().to_string()
            ),
        );
        let err = format!("{:#}", signer(&c).unwrap_err());
        assert!(
            err.starts_with("dkim[1].private_key = ") && err.contains("missing.pem"),
            "{err}"
        );
        // The Ed25519 key is not an RSA key (algorithm defaults to rsa-sha256).
        let c = config_with(
            dir.path(),
            &format!(
                "[[dkim]]\ndomain = \"example.org\"\nselector = \"e1\"\nprivate_key = {:?}\n",
                key.display().to_string()
            ),
        );
        let err = format!("{:#}", signer(&c).unwrap_err());
        assert!(err.starts_with("dkim[0].private_key = "), "{err}");
    }

    #[test]
    fn keygen_refuses_to_overwrite_and_writes_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("k.pem");
        keygen(
            "example.org",
            "e1",
            Algorithm::Ed25519Sha256,
            2048,
            Some(out.clone()),
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&out).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let before = std::fs::read(&out).unwrap();
        let err = keygen(
            "example.org",
            "e1",
            Algorithm::Ed25519Sha256,
            2048,
            Some(out.clone()),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("never overwritten"), "{err:#}");
        assert_eq!(std::fs::read(&out).unwrap(), before);
    }

    #[test]
    fn given_records_are_keyed_by_lowercase_fqdn() {
        let records =
            given_records(&["S1._domainkey.Example.org=v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".into()])
                .unwrap();
        assert!(records.0.contains_key("s1._domainkey.example.org."));
        assert!(given_records(&["no-equals-sign".into()]).is_err());
    }
}
