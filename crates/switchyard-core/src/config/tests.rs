//! Tests of [`Config::load`] and the redaction of secrets. Each runs in a
//! figment `Jail`: a temporary working directory and an environment that
//! is restored afterwards, one jail at a time.

// figment's `Jail` closures return its (large) error type.
#![allow(clippy::result_large_err)]

use super::*;
use figment::Jail;

const FULL: &str = r#"
[store]
url = "postgres://alice:s3cr3tpw@db.internal:5432/jobs"
wakeup = "poll"
poll_interval = "500ms"

[host]
name = "orders-1"
concurrency = 8
lease = "2m"
heartbeat = 10
shutdown_grace = "1.5"
health_listen = "127.0.0.1:9464"

[serve]
listen = "127.0.0.1:8080"
grpc_listen = "[::1]:50051"
max_body_bytes = 4096
insecure = false

[[serve.tokens]]
name = "ci"
secret = "tok-SECRET-1"
scope = "read"

[[serve.tokens]]
name = "deployer"
secret = "tok-SECRET-2"
scope = "write"

[log]
level = "warn,switchyard_core=debug"
"#;

fn jail(f: impl FnOnce(&mut Jail) -> figment::error::Result<()>) {
    Jail::expect_with(|j| {
        j.clear_env();
        f(j)
    });
}

fn load_err(path: Option<&Path>) -> String {
    match Config::load(path) {
        Err(Error::Config(m)) => m,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn no_file_gives_the_defaults() {
    jail(|_| {
        let c = Config::load(None).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.store.url, DEFAULT_STORE_URL);
        assert_eq!(c.host.concurrency, 64);
        assert_eq!(c.host.lease, Duration::from_secs(30));
        assert_eq!(c.serve.max_body_bytes, 1 << 20);
        assert_eq!(c.log.level, "info");
        Ok(())
    });
}

#[test]
fn a_full_file_is_read() {
    jail(|j| {
        j.create_file("sy.toml", FULL)?;
        let c = Config::load(Some(Path::new("sy.toml"))).unwrap();
        assert_eq!(
            c.store.url,
            "postgres://alice:s3cr3tpw@db.internal:5432/jobs"
        );
        assert_eq!(c.store.wakeup, Some(Wakeup::Poll));
        assert_eq!(c.store.poll_interval, Some(Duration::from_millis(500)));
        assert_eq!(c.host.name.as_deref(), Some("orders-1"));
        assert_eq!(c.host.concurrency, 8);
        assert_eq!(c.host.lease, Duration::from_secs(120));
        assert_eq!(c.host.heartbeat, Some(Duration::from_secs(10)));
        assert_eq!(c.host.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(
            c.host.health_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(c.serve.listen, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.serve.grpc_listen, Some("[::1]:50051".parse().unwrap()));
        assert_eq!(c.serve.max_body_bytes, 4096);
        assert_eq!(c.serve.tokens.len(), 2);
        assert_eq!(c.serve.tokens[0].name, "ci");
        assert_eq!(c.serve.tokens[0].secret.expose(), "tok-SECRET-1");
        assert_eq!(c.serve.tokens[0].scope, Scope::Read);
        assert_eq!(c.serve.tokens[1].scope, Scope::Write);
        assert_eq!(c.log.level, "warn,switchyard_core=debug");
        assert_eq!(
            c.store.open_url().unwrap(),
            "postgres://alice:s3cr3tpw@db.internal:5432/jobs?wakeup=polling&poll_ms=500"
        );
        Ok(())
    });
}

#[test]
fn the_file_comes_from_switchyard_config_when_no_path_is_given() {
    jail(|j| {
        j.create_file("from-env.toml", "[host]\nconcurrency = 3\n")?;
        j.set_env("SWITCHYARD_CONFIG", "from-env.toml");
        assert_eq!(Config::load(None).unwrap().host.concurrency, 3);
        // An explicit path wins over the variable.
        j.create_file("explicit.toml", "[host]\nconcurrency = 5\n")?;
        assert_eq!(
            Config::load(Some(Path::new("explicit.toml")))
                .unwrap()
                .host
                .concurrency,
            5
        );
        Ok(())
    });
}

#[test]
fn environment_variables_override_the_file() {
    jail(|j| {
        j.create_file("sy.toml", FULL)?;
        j.set_env("SWITCHYARD_HOST__CONCURRENCY", 12);
        j.set_env("SWITCHYARD_HOST__LEASE", "45s");
        j.set_env("SWITCHYARD_SERVE__LISTEN", "127.0.0.1:9999");
        j.set_env("SWITCHYARD_LOG__LEVEL", "debug");
        // Other SWITCHYARD_* variables (no `__`) are not configuration keys.
        j.set_env("SWITCHYARD_LOG", "trace");
        j.set_env("SWITCHYARD_PG_BIN", "/usr/lib/postgresql/bin");
        let c = Config::load(Some(Path::new("sy.toml"))).unwrap();
        assert_eq!(c.host.concurrency, 12);
        assert_eq!(c.host.lease, Duration::from_secs(45));
        assert_eq!(c.serve.listen, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(c.log.level, "debug");
        // Untouched keys keep the file's values.
        assert_eq!(c.host.name.as_deref(), Some("orders-1"));
        Ok(())
    });
}

#[test]
fn switchyard_store_is_a_shorthand_for_store_url_and_the_full_name_wins() {
    jail(|j| {
        j.create_file("sy.toml", "[store]\nurl = \"sqlite:file.db\"\n")?;
        let p = Path::new("sy.toml");
        assert_eq!(Config::load(Some(p)).unwrap().store.url, "sqlite:file.db");
        j.set_env("SWITCHYARD_STORE", "sqlite:short.db");
        assert_eq!(Config::load(Some(p)).unwrap().store.url, "sqlite:short.db");
        j.set_env("SWITCHYARD_STORE__URL", "memory");
        assert_eq!(Config::load(Some(p)).unwrap().store.url, "memory");
        // An empty shorthand is ignored, as before.
        j.set_env("SWITCHYARD_STORE__URL", "");
        j.set_env("SWITCHYARD_STORE", " ");
        Ok(())
    });
    jail(|j| {
        j.set_env("SWITCHYARD_STORE", "");
        assert_eq!(Config::load(None).unwrap().store.url, DEFAULT_STORE_URL);
        Ok(())
    });
}

#[test]
fn numeric_looking_environment_values_are_still_strings_where_strings_are_wanted() {
    jail(|j| {
        j.set_env("SWITCHYARD_HOST__NAME", "1234");
        j.set_env("SWITCHYARD_HOST__SHUTDOWN_GRACE", "0.25");
        let c = Config::load(None).unwrap();
        assert_eq!(c.host.name.as_deref(), Some("1234"));
        assert_eq!(c.host.shutdown_grace, Duration::from_millis(250));
        Ok(())
    });
}

#[test]
fn unknown_keys_are_refused_naming_the_key_and_the_file() {
    jail(|j| {
        j.create_file("sy.toml", "[host]\nconcurency = 8\n")?;
        let e = load_err(Some(Path::new("sy.toml")));
        assert!(e.contains("`host.concurency`"), "{e}");
        assert!(e.contains("sy.toml"), "{e}");
        assert!(e.contains("unknown key"), "{e}");
        assert!(
            e.contains("concurrency"),
            "the expected keys are listed: {e}"
        );

        j.create_file("top.toml", "[stroe]\nurl = \"memory\"\n")?;
        let e = load_err(Some(Path::new("top.toml")));
        assert!(e.contains("`stroe`") && e.contains("top.toml"), "{e}");

        j.create_file(
            "tok.toml",
            "[[serve.tokens]]\nname = \"a\"\nsecret = \"x\"\nscope = \"read\"\nsecrte = \"oops\"\n",
        )?;
        let e = load_err(Some(Path::new("tok.toml")));
        assert!(e.contains("secrte") && e.contains("tok.toml"), "{e}");
        assert!(!e.contains("oops"), "{e}");
        Ok(())
    });
}

#[test]
fn unknown_keys_in_the_environment_name_the_variable() {
    jail(|j| {
        j.create_file("sy.toml", "[host]\nconcurrency = 8\n")?;
        j.set_env("SWITCHYARD_HOST__CONCURENCY", 8);
        let e = load_err(Some(Path::new("sy.toml")));
        assert!(e.contains("`host.concurency`"), "{e}");
        assert!(
            e.contains("environment variable `SWITCHYARD_HOST__CONCURENCY`"),
            "{e}"
        );
        assert!(!e.contains("sy.toml"), "the file is not to blame: {e}");
        Ok(())
    });
}

#[test]
fn wrong_types_are_refused_naming_the_key_and_where_it_came_from() {
    jail(|j| {
        j.create_file("sy.toml", "[host]\nconcurrency = \"lots\"\n")?;
        let e = load_err(Some(Path::new("sy.toml")));
        assert!(
            e.contains("`host.concurrency`") && e.contains("sy.toml"),
            "{e}"
        );
        assert!(e.contains("lots"), "{e}");

        j.create_file("d.toml", "[host]\nlease = \"soon\"\n")?;
        let e = load_err(Some(Path::new("d.toml")));
        assert!(
            e.contains("`host.lease`") && e.contains("is not a duration"),
            "{e}"
        );

        j.create_file("a.toml", "[serve]\nlisten = \"localhost\"\n")?;
        let e = load_err(Some(Path::new("a.toml")));
        assert!(
            e.contains("`serve.listen`") && e.contains("must be an address like"),
            "{e}"
        );

        j.create_file(
            "s.toml",
            "[[serve.tokens]]\nname = \"a\"\nsecret = \"x\"\nscope = \"admin\"\n",
        )?;
        let e = load_err(Some(Path::new("s.toml")));
        assert!(e.contains("serve.tokens") && e.contains("admin"), "{e}");

        j.create_file("w.toml", "[store]\nwakeup = \"sometimes\"\n")?;
        let e = load_err(Some(Path::new("w.toml")));
        assert!(
            e.contains("`store.wakeup`") && e.contains("sometimes"),
            "{e}"
        );

        j.set_env("SWITCHYARD_HOST__CONCURRENCY", "many");
        let e = load_err(None);
        assert!(
            e.contains("`host.concurrency`")
                && e.contains("environment variable `SWITCHYARD_HOST__CONCURRENCY`"),
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn bad_values_are_refused_naming_their_source() {
    let cases: [(&str, &str, &str); 9] = [
        ("[host]\nconcurrency = 0\n", "host.concurrency", "at least 1"),
        ("[host]\nlease = \"10ms\"\n", "host.lease", "at least 50ms"),
        ("[host]\nlease = \"10s\"\nheartbeat = \"10s\"\n", "host.heartbeat", "shorter than host.lease"),
        ("[host]\nlease = -3\n", "host.lease", "non-negative"),
        ("[store]\nurl = \"\"\n", "store.url", "must not be empty"),
        ("[store]\npoll_interval = \"2h\"\n", "store.poll_interval", "between 1ms and 1h"),
        ("[serve]\nlisten = \"0.0.0.0:8080\"\n", "serve.listen", "not a loopback address"),
        ("[[serve.tokens]]\nname = \"a\"\nsecret = \"x\"\nscope = \"read\"\n[[serve.tokens]]\nname = \"a\"\nsecret = \"y\"\nscope = \"read\"\n", "serve.tokens.1.name", "used twice"),
        ("[log]\nlevel = \"loud\"\n", "log.level", "not a log level"),
    ];
    jail(|j| {
        for (text, key, why) in cases {
            j.create_file("bad.toml", text)?;
            let e = load_err(Some(Path::new("bad.toml")));
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
            assert!(e.contains(why), "{text}: {e}");
            if key != "host.lease" || !text.contains("-3") {
                assert!(e.contains("bad.toml"), "{text}: {e}");
            }
        }
        // The same check names an environment variable when the value came from one.
        j.create_file("ok.toml", "[host]\nconcurrency = 4\n")?;
        j.set_env("SWITCHYARD_HOST__CONCURRENCY", 0);
        let e = load_err(Some(Path::new("ok.toml")));
        assert!(
            e.contains("SWITCHYARD_HOST__CONCURRENCY") && e.contains("at least 1"),
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn a_public_listen_address_is_allowed_with_tokens_or_insecure() {
    jail(|j| {
        j.create_file("t.toml", "[serve]\nlisten = \"0.0.0.0:8080\"\n[[serve.tokens]]\nname = \"a\"\nsecret = \"x\"\nscope = \"write\"\n")?;
        assert!(Config::load(Some(Path::new("t.toml"))).is_ok());
        j.create_file(
            "i.toml",
            "[serve]\nlisten = \"0.0.0.0:8080\"\ninsecure = true\n",
        )?;
        assert!(
            Config::load(Some(Path::new("i.toml")))
                .unwrap()
                .serve
                .insecure
        );
        Ok(())
    });
}

#[test]
fn a_missing_or_malformed_file_is_an_error_that_keeps_secrets_out() {
    jail(|j| {
        let e = load_err(Some(Path::new("nope.toml")));
        assert!(e.contains("nope.toml"), "{e}");
        j.set_env("SWITCHYARD_CONFIG", "also-missing.toml");
        let e = load_err(None);
        assert!(e.contains("also-missing.toml"), "{e}");

        j.create_file(
            "broken.toml",
            "[store]\nurl = \"postgres://alice:s3cr3tpw@h/db\" trailing\n",
        )?;
        let e = load_err(Some(Path::new("broken.toml")));
        assert!(e.contains("broken.toml") && e.contains("line 2"), "{e}");
        assert!(!e.contains("s3cr3tpw"), "{e}");
        Ok(())
    });
}

#[test]
fn redacted_output_never_shows_secrets() {
    jail(|j| {
        j.create_file("sy.toml", FULL)?;
        let c = Config::load(Some(Path::new("sy.toml"))).unwrap();
        let toml_text = c.to_toml_redacted();
        let json_text = c.redacted().to_string();
        let debug_text = format!("{c:?}");
        for text in [&toml_text, &json_text, &debug_text] {
            for secret in ["s3cr3tpw", "tok-SECRET-1", "tok-SECRET-2"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains("alice:***@db.internal"), "{text}");
        }
        assert!(toml_text.contains("secret = \"***\""), "{toml_text}");
        assert!(toml_text.contains("lease = \"120s\""), "{toml_text}");
        assert!(
            toml_text.contains("poll_interval = \"500ms\""),
            "{toml_text}"
        );
        assert_eq!(c.redacted()["serve"]["tokens"][0]["name"], "ci");
        assert_eq!(c.serve.tokens[0].secret.to_string(), "***");
        // The redacted TOML reads back (secrets as `***`).
        let back: Config = toml::from_str(&toml_text).unwrap();
        assert_eq!(back.host, c.host);
        assert_eq!(back.serve.tokens[1].secret.expose(), "***");
        Ok(())
    });
}

#[test]
fn redact_url_hides_passwords_in_every_form() {
    let cases = [
        (
            "postgres://alice:s3cr3tpw@127.0.0.1:1/nope",
            "postgres://alice:***@127.0.0.1:1/nope",
        ),
        (
            "postgresql://u:p%40ss@h/db?x=1",
            "postgresql://u:***@h/db?x=1",
        ),
        ("postgres://alice@h/db", "postgres://alice@h/db"),
        (
            "postgres://h/db?password=pw&sslmode=disable",
            "postgres://h/db?password=***&sslmode=disable",
        ),
        (
            "postgres://h/db?sslpassword=pw",
            "postgres://h/db?sslpassword=***",
        ),
        (
            "host=h user=u password=pw dbname=d",
            "host=h user=u password=*** dbname=d",
        ),
        (
            "host=h password = 'p w\\'x' dbname=d",
            "host=h password = *** dbname=d",
        ),
        ("PASSWORD=pw", "PASSWORD=***"),
        ("sqlite:switchyard.db", "sqlite:switchyard.db"),
        ("memory", "memory"),
        (
            "cannot open store `postgres://a:b@h/d`: cannot connect to `postgres://a@h/d`",
            "cannot open store `postgres://a:***@h/d`: cannot connect to `postgres://a@h/d`",
        ),
        ("mypassword=x", "mypassword=***"),
        ("nopasswordhere", "nopasswordhere"),
    ];
    for (input, want) in cases {
        assert_eq!(redact_url(input), want, "{input}");
    }
}

#[test]
fn durations_parse_and_print() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
    for bad in ["", "s", "-1s", "1d", "1.s", ".5s", "1e3", "999999999999h"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
    assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    assert_eq!(format_duration(Duration::from_secs(30)), "30s");
}

#[test]
fn store_settings_map_onto_postgres_urls_only() {
    let mut s = StoreConfig {
        url: "postgres://h/db".into(),
        wakeup: Some(Wakeup::Notify),
        poll_interval: Some(Duration::from_secs(2)),
    };
    assert_eq!(
        s.open_url().unwrap(),
        "postgres://h/db?wakeup=hybrid&poll_ms=2000"
    );
    s.url = "postgres://h/db?sslmode=disable".into();
    assert_eq!(
        s.open_url().unwrap(),
        "postgres://h/db?sslmode=disable&wakeup=hybrid&poll_ms=2000"
    );
    s.url = "postgres://h/db?wakeup=polling".into();
    assert!(matches!(s.open_url(), Err(Error::Config(m)) if m.contains("store.wakeup")));
    s.url = "sqlite:x.db".into();
    assert_eq!(s.open_url().unwrap(), "sqlite:x.db");
    assert_eq!(
        StoreConfig::default().open_url().unwrap(),
        DEFAULT_STORE_URL
    );
}

#[test]
fn scopes_write_implies_read() {
    assert!(Scope::Write.allows(Scope::Read));
    assert!(Scope::Write.allows(Scope::Write));
    assert!(Scope::Read.allows(Scope::Read));
    assert!(!Scope::Read.allows(Scope::Write));
}
