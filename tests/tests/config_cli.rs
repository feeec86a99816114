//! The command line around the server: `tern config check`, TERN_* environment overrides,
//! `tern auth hash`, `tern spool list`, `/health`, and startup errors for bad key files.

use std::fs;

use tern_tests::{config_check, free_port, hash_password, SmtpClient, TernServer};

#[test]
fn config_check_prints_the_effective_config_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tern.toml");
    fs::write(
        &file,
        "[limits]\nmessage_size = 12345\n\n[relay]\ndomains = [\"example.test\"]\n",
    )
    .unwrap();
    let out = config_check(&file, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let cfg: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));
    assert_eq!(cfg["limits"]["message_size"].as_integer(), Some(12345));
    assert_eq!(
        cfg["limits"]["recipients"].as_integer(),
        Some(1000),
        "default filled in"
    );
    assert_eq!(cfg["limits"]["errors"].as_integer(), Some(10));
    assert_eq!(cfg["smtp"]["proxy_protocol"].as_bool(), Some(false));
    assert_eq!(cfg["smtp"]["bare_line_endings"].as_str(), Some("reject"));
    assert_eq!(
        cfg["relay"]["domains"].as_array().unwrap()[0].as_str(),
        Some("example.test")
    );
    assert_eq!(cfg["http"]["listen"].as_str(), Some("127.0.0.1:8025"));
}

#[test]
fn config_check_rejects_a_bad_value_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    fs::write(&file, "[limits]\nmessage_size = \"lots\"\n").unwrap();
    let out = config_check(&file, &[]);
    assert!(
        !out.status.success(),
        "a string message_size must be rejected"
    );
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        msg.contains("message_size"),
        "error should name the key: {msg}"
    );
    assert!(
        msg.contains("broken.toml"),
        "error should name the file: {msg}"
    );
}

#[test]
fn config_check_prints_routes_and_rejects_a_bad_route_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    fs::write(
        &file,
        "[[routes]]\ndomain = \"Example.NET\"\nmax_message_rate = \"6000/m\"\n\n\
         [[routes]]\ndomain = \"*\"\nrelay = \"127.0.0.1:2526\"\ntls = \"none\"\n\n\
         [delivery]\nport = 2525\n",
    )
    .unwrap();
    let out = config_check(&file, &[("TERN_QUEUE__RETRY_SCHEDULE", "1s,2s")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let cfg: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));
    let routes = cfg["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2, "{text}");
    assert_eq!(routes[0]["domain"].as_str(), Some("example.net"));
    assert_eq!(routes[0]["max_message_rate"].as_str(), Some("6000/m"));
    assert_eq!(routes[0]["tls"].as_str(), Some("opportunistic"));
    assert!(routes[0].get("relay").is_none(), "{text}");
    assert_eq!(routes[1]["domain"].as_str(), Some("*"));
    assert_eq!(routes[1]["relay"].as_str(), Some("127.0.0.1:2526"));
    assert_eq!(routes[1]["tls"].as_str(), Some("none"));
    assert_eq!(cfg["delivery"]["port"].as_integer(), Some(2525));
    assert_eq!(cfg["delivery"]["max_connections"].as_integer(), Some(10));
    assert_eq!(cfg["dns"]["timeout"].as_str(), Some("5s"));
    let schedule: Vec<&str> = cfg["queue"]["retry_schedule"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(schedule, ["1s", "2s"]);
    // What it printed is a configuration it accepts.
    let printed = dir.path().join("printed.toml");
    fs::write(&printed, &text).unwrap();
    let again = config_check(&printed, &[]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let bad = dir.path().join("bad-route.toml");
    fs::write(
        &bad,
        "[[routes]]\ndomain = \"example.net\"\n\n[[routes]]\ndomain = \"*\"\nrelay = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = config_check(&bad, &[]);
    assert!(!out.status.success(), "port 0 relay must be rejected");
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("routes[1].relay"), "{msg}");
    assert!(msg.contains("bad-route.toml"), "{msg}");
}

#[test]
fn config_check_rejects_an_unparseable_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("garbage.toml");
    fs::write(&file, "[smtp\nlisten = \n").unwrap();
    let out = config_check(&file, &[]);
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("garbage.toml"), "{msg}");
}

#[test]
fn config_check_rejects_bad_enum_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("enum.toml");
    fs::write(&file, "[smtp]\nbare_line_endings = \"sometimes\"\n").unwrap();
    let out = config_check(&file, &[]);
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("bare_line_endings"), "{msg}");
}

#[test]
fn env_overrides_the_file_in_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tern.toml");
    fs::write(
        &file,
        "[smtp]\nlisten = [\"127.0.0.1:2525\"]\n[limits]\nrecipients = 5\n",
    )
    .unwrap();
    let out = config_check(
        &file,
        &[
            ("TERN_SMTP__LISTEN", "127.0.0.1:2600"),
            ("TERN_LIMITS__RECIPIENTS", "7"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let listen = &cfg["smtp"]["listen"];
    let listen: Vec<&str> = match listen {
        toml::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect(),
        toml::Value::String(s) => vec![s.as_str()],
        other => panic!("smtp.listen: {other:?}"),
    };
    assert_eq!(listen, vec!["127.0.0.1:2600"]);
    assert_eq!(cfg["limits"]["recipients"].as_integer(), Some(7));
}

#[test]
fn env_override_moves_the_running_listener() {
    let port = free_port();
    let server = TernServer::builder()
        .env("TERN_SMTP__LISTEN", &format!("127.0.0.1:{port}"))
        .start();
    let mut c = SmtpClient::connect(format!("127.0.0.1:{port}").parse().unwrap());
    c.read_reply().expect_code(220);
    // The port from the file is not used.
    assert!(
        std::net::TcpStream::connect(server.smtp).is_err(),
        "file's smtp.listen still bound"
    );
}

#[test]
fn auth_hash_is_salted_argon2id() {
    let a = hash_password("correct horse");
    let b = hash_password("correct horse");
    assert_ne!(a, b, "two hashes of one password must differ (random salt)");
}

#[test]
fn health_reports_ok_and_queued_count() {
    let server = TernServer::start();
    let h = server.health();
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["queued"], 0, "{h}");
    let mut c = server.session();
    tern_tests::queued_id(&c.send_mail(
        "a@client.test",
        &["b@elsewhere.test"],
        "Subject: x\r\n\r\nx\r\n",
    ));
    assert_eq!(server.queued(), 1);
}

#[test]
fn spool_list_of_an_empty_spool_prints_nothing() {
    let mut server = TernServer::start();
    server.stop();
    assert!(server.spool_list().is_empty());
}

/// Runs `tern serve --config FILE` expecting it to refuse to start; returns its stderr.
fn serve_must_fail(config: &std::path::Path) -> String {
    let out = std::process::Command::new(tern_tests::tern_bin())
        .args(["serve", "--config"])
        .arg(config)
        // Even with backtraces requested, an operator gets one clear line, not a stack dump.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run tern serve");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "tern serve should have failed: {stderr}"
    );
    assert!(!stderr.contains("Stack backtrace"), "{stderr}");
    stderr
}

#[test]
fn a_second_server_on_the_same_data_dir_or_port_refuses_to_start_with_a_clear_error() {
    let server = TernServer::start();
    // Same config: same data_dir (and ports) → the spool lock is the first thing it meets.
    let stderr = serve_must_fail(server.config_path());
    assert!(
        stderr.contains("in use by another process") && stderr.contains("data_dir"),
        "{stderr}"
    );
    // Another data_dir, same SMTP port → the listener names the address.
    let text = fs::read_to_string(server.config_path()).unwrap();
    let mut config: toml::Table = text.parse().unwrap();
    let other = server.dir().join("other-data");
    config["server"]
        .as_table_mut()
        .unwrap()
        .insert("data_dir".into(), other.display().to_string().into());
    let path = server.dir().join("second.toml");
    fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let stderr = serve_must_fail(&path);
    assert!(
        stderr.contains(&format!("cannot listen on {}", server.smtp)),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_delivery_ca_bundle_is_a_startup_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tern.toml");
    let data = dir.path().join("data");
    fs::write(
        &config,
        format!(
            "[server]\ndata_dir = {:?}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission_listen = []\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[delivery]\ntls_ca_file = \"/nonexistent/ca.pem\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let stderr = serve_must_fail(&config);
    assert!(
        stderr.contains("delivery.tls_ca_file") && stderr.contains("/nonexistent/ca.pem"),
        "{stderr}"
    );
}

#[test]
fn a_missing_or_unusable_dkim_key_is_a_startup_error_naming_the_entry_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let write_config = |key: &std::path::Path| {
        let config = dir.path().join("tern.toml");
        fs::write(
            &config,
            format!(
                "[server]\ndata_dir = {:?}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission_listen = []\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n\
                 [[dkim]]\ndomain = \"example.org\"\nselector = \"s1\"\nprivate_key = {:?}\n",
                data.display().to_string(),
                key.display().to_string()
            ),
        )
        .unwrap();
        config
    };
    let missing = dir.path().join("missing.pem");
    let stderr = serve_must_fail(&write_config(&missing));
    assert!(
        stderr.contains("dkim[0].private_key") && stderr.contains("missing.pem"),
        "{stderr}"
    );
    let junk = dir.path().join("junk.pem");
    fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let stderr = serve_must_fail(&write_config(&junk));
    assert!(
        stderr.contains("dkim[0].private_key") && stderr.contains("junk.pem"),
        "{stderr}"
    );
}
