"""Worker.from_config: the core's one configuration parser (switchyard.toml
plus SWITCHYARD_* variables) gives a Python host its store and [host]
settings, and refuses unknown keys and wrong types naming key and file."""

import os

import pytest

import switchyard


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SWITCHYARD_") and (k in ("SWITCHYARD_STORE", "SWITCHYARD_CONFIG") or "__" in k):
            monkeypatch.delenv(k)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_from_config_uses_the_configured_store_and_host(tmp_path):
    db = tmp_path / "configured.db"
    cfg = write(
        tmp_path,
        "switchyard.toml",
        f'[store]\nurl = "sqlite:{db}"\n\n[host]\nconcurrency = 3\nlease = "5s"\nheartbeat = "1s"\nshutdown_grace = "1500ms"\n',
    )
    w = switchyard.Worker.from_config(cfg)
    assert w.store == f"sqlite:{db}"
    assert w._native.concurrency == 3
    assert w._native.shutdown_grace == 1.5
    assert w._threads_n == 3

    @w.step("double")
    def double(inp, ctx):
        return inp * 2

    with w:
        client = switchyard.Client(f"sqlite:{db}")
        assert client.result(client.spawn("double", 21), timeout=10) == 42
    assert db.exists()


def test_from_config_reads_switchyard_config_and_environment_overrides(tmp_path, monkeypatch):
    db = tmp_path / "env.db"
    cfg = write(tmp_path, "c.toml", f'[store]\nurl = "sqlite:{db}"\n[host]\nconcurrency = 3\n')
    monkeypatch.setenv("SWITCHYARD_CONFIG", str(cfg))
    w = switchyard.Worker.from_config()
    assert w._native.concurrency == 3
    assert w.store == f"sqlite:{db}"
    monkeypatch.setenv("SWITCHYARD_HOST__CONCURRENCY", "5")
    monkeypatch.setenv("SWITCHYARD_STORE", "memory")
    w = switchyard.Worker.from_config(threads=2)
    assert w._native.concurrency == 5
    assert w._threads_n == 2
    assert w.store == "memory"


def test_from_config_refuses_unknown_keys_and_wrong_types(tmp_path, monkeypatch):
    cfg = write(tmp_path, "bad.toml", "[host]\nconcurency = 3\n")
    with pytest.raises(switchyard.ConfigError) as e:
        switchyard.Worker.from_config(str(cfg))
    assert "host.concurency" in str(e.value) and "bad.toml" in str(e.value)

    cfg = write(tmp_path, "type.toml", '[host]\nlease = "whenever"\n')
    with pytest.raises(switchyard.ConfigError) as e:
        switchyard.Worker.from_config(cfg)
    assert "host.lease" in str(e.value) and "type.toml" in str(e.value)

    monkeypatch.setenv("SWITCHYARD_HOST__CONCURRENCY", "0")
    with pytest.raises(switchyard.ConfigError) as e:
        switchyard.Worker.from_config()
    assert "SWITCHYARD_HOST__CONCURRENCY" in str(e.value)


def test_from_config_errors_never_show_the_store_password(tmp_path):
    cfg = write(tmp_path, "pg.toml", '[store]\nurl = "postgres://alice:s3cr3tpw@127.0.0.1:1/nope"\n')
    w = switchyard.Worker.from_config(cfg)

    @w.step("x")
    def x(inp, ctx):
        return inp

    with pytest.raises(switchyard.Error) as e:
        w.start()
    assert "s3cr3tpw" not in str(e.value)
    assert "alice" in str(e.value)


def test_from_config_applies_log_level_to_the_forwarded_core_records(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="switchyard")

    def host_records(level):
        cfg = write(
            tmp_path,
            f"log-{level}.toml",
            f'[store]\nurl = "sqlite:{tmp_path}/log-{level}.db"\n\n[log]\nlevel = "{level}"\n',
        )
        w = switchyard.Worker.from_config(cfg)

        @w.step("quiet")
        def quiet(inp, ctx):
            return inp

        w.start()
        w.stop()
        return [r.getMessage() for r in caplog.records if r.name == "switchyard.core" and w.host_id in r.getMessage()]

    try:
        # log.level = "warn": the host's INFO records are filtered out in Rust.
        assert host_records("warn") == []
        assert any("host started" in m for m in host_records("info"))
    finally:
        # The subscriber is the process's: back to the default level.
        host_records("info")

    cfg = write(tmp_path, "loud.toml", '[log]\nlevel = "loud"\n')
    with pytest.raises(switchyard.ConfigError) as e:
        switchyard.Worker.from_config(cfg)
    assert "log.level" in str(e.value) and "loud.toml" in str(e.value)
