"""Settings of cerana-node-tick: precedence flags > env > file > defaults, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cerana_nodetick.cli import main
from cerana_nodetick.config import ConfigError, Settings, parse_duration

FILE = """\
data_dir = "/srv/file"
interval = "10s"
history_interval = 120
labels = { consul_role = "server", zone = "a" }
interfaces = ["eth0", "mgmt0"]
[consul]
address = "http://file:8500"
timeout = "3s"
prefix = "fileprefix"
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "node-tick.toml"
    path.write_text(FILE)
    return path


def load(flags=None, env=None, path=None):
    return Settings.load(flags or {}, env or {}, path)


def test_defaults():
    s = load()
    assert s.data_dir == Path("/var/lib/cerana")
    assert s.run_dir == Path("/run/cerana")
    assert s.machine_id_file == Path("/etc/machine-id")
    assert s.interval == 5.0 and s.history_interval == 60.0
    assert s.consul.address == "http://127.0.0.1:8500" and s.consul.prefix == "cerana"


def test_file_values(config_file):
    s = load(path=config_file)
    assert s.data_dir == Path("/srv/file")
    assert s.interval == 10.0 and s.history_interval == 120.0
    assert s.labels == {"consul_role": "server", "zone": "a"}
    assert s.interfaces == ("eth0", "mgmt0")
    assert (s.consul.address, s.consul.timeout, s.consul.prefix) == ("http://file:8500", 3.0, "fileprefix")


def test_precedence_flags_over_env_over_file(config_file):
    env = {
        "CERANA_NODE_TICK_DATA_DIR": "/srv/env",
        "CERANA_NODE_TICK_INTERVAL": "2s",
        "CERANA_NODE_TICK_LABELS": "zone=b",
        "CONSUL_HTTP_ADDR": "env:8500",
        "CONSUL_HTTP_TOKEN": "secret",
        "CERANA_KV_PREFIX": "envprefix",
    }
    s = load(env=env, path=config_file)
    assert s.data_dir == Path("/srv/env") and s.interval == 2.0 and s.labels == {"zone": "b"}
    assert s.history_interval == 120.0  # only in the file
    assert (s.consul.address, s.consul.token, s.consul.prefix) == ("http://env:8500", "secret", "envprefix")
    assert s.consul.timeout == 3.0
    s = load(
        {"data_dir": "/srv/flag", "interval": "500ms", "consul_address": "flag:8500", "kv_prefix": "f"},
        env,
        config_file,
    )
    assert s.data_dir == Path("/srv/flag") and s.interval == 0.5
    assert (s.consul.address, s.consul.prefix) == ("flag:8500", "f")
    assert "secret" not in repr(s.redacted())


def test_config_file_from_the_environment(config_file):
    assert load(env={"CERANA_NODE_TICK_CONFIG": str(config_file)}).data_dir == Path("/srv/file")


@pytest.mark.parametrize(
    ("flags", "env", "key", "source"),
    [
        ({"interval": "soon"}, {}, "interval", "flag --interval"),
        ({}, {"CERANA_NODE_TICK_INTERVAL": "0"}, "interval", "CERANA_NODE_TICK_INTERVAL"),
        ({}, {"CERANA_NODE_TICK_DATA_DIR": "relative/dir"}, "data_dir", "CERANA_NODE_TICK_DATA_DIR"),
        ({}, {"CERANA_NODE_TICK_LABELS": "novalue"}, "labels", "CERANA_NODE_TICK_LABELS"),
        ({}, {"CERANA_NODE_TICK_CHECK_WORKERS": "0"}, "check_workers", "CERANA_NODE_TICK_CHECK_WORKERS"),
        ({}, {"CERANA_NODE_TICK_LOG_LEVEL": "loud"}, "log_level", "CERANA_NODE_TICK_LOG_LEVEL"),
        ({}, {"CERANA_NODE_TICK_INTERVLA": "5"}, "CERANA_NODE_TICK_INTERVLA", "environment"),
        ({}, {"CONSUL_HTTP_SSL_VERIFY": "maybe"}, "consul.validate_certs", "CONSUL_HTTP_SSL_VERIFY"),
        ({"consul_address": "unix:///x.sock"}, {}, "consul.address", "flag --consul-address"),
        ({"retry_initial": "60"}, {}, "retry_initial", "flag --retry-initial"),
    ],
)
def test_bad_values_name_the_key_and_source(flags, env, key, source):
    with pytest.raises(ConfigError) as err:
        load(flags, env)
    assert err.value.key == key
    assert source in err.value.source
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('interval = "fast"\n', "interval"),
        ('datadir = "/x"\n', "datadir"),
        ('[consul]\nadress = "x"\n', "consul.adress"),
        ("labels = 5\n", "labels"),
        ("this is not toml", "config"),
    ],
)
def test_bad_file_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(path=path)
    assert err.value.key == key
    assert str(path) in err.value.source


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(path=tmp_path / "missing.toml")


@pytest.mark.parametrize(("value", "seconds"), [(5, 5.0), ("5", 5.0), ("5s", 5.0), ("250ms", 0.25), ("2m", 120.0)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


def test_main_exits_2_with_one_line_and_no_traceback(tmp_path, capsys):
    assert main(["--interval", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "cerana-node-tick: invalid setting interval (flag --interval): "
        "must be a duration such as 5, 5s or 500ms, got 'soon'"
    )
    assert main(["--machine-id-file", str(tmp_path / "nope")]) == 2
    assert "machine_id_file" in capsys.readouterr().err


def test_module_entry_point_bad_config_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("retry_max = -1\n")
    r = subprocess.run(
        [sys.executable, "-m", "cerana_nodetick", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "invalid setting retry_max" in r.stderr and "Traceback" not in r.stderr
