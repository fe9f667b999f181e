"""The pure parts of module_utils/_store.py: settings from the consul CLI's environment
variables, address and key checks, error messages, and the watch loop's index rules."""

from __future__ import annotations

import threading

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _store as s


@pytest.mark.parametrize(
    ("env", "address"),
    [
        ({}, "http://127.0.0.1:8500"),
        ({"CONSUL_HTTP_ADDR": "10.0.0.5:8500"}, "http://10.0.0.5:8500"),
        ({"CONSUL_HTTP_ADDR": "http://10.0.0.5:8500"}, "http://10.0.0.5:8500"),
        ({"CONSUL_HTTP_ADDR": "https://consul.example:8501"}, "https://consul.example:8501"),
        ({"CONSUL_HTTP_ADDR": "10.0.0.5:8501", "CONSUL_HTTP_SSL": "true"}, "https://10.0.0.5:8501"),
        ({"CONSUL_HTTP_ADDR": "10.0.0.5:8501", "CONSUL_HTTP_SSL": "1"}, "https://10.0.0.5:8501"),
        ({"CONSUL_HTTP_ADDR": "10.0.0.5:8500", "CONSUL_HTTP_SSL": "false"}, "http://10.0.0.5:8500"),
        # an explicit scheme wins over CONSUL_HTTP_SSL
        ({"CONSUL_HTTP_ADDR": "http://10.0.0.5:8500", "CONSUL_HTTP_SSL": "true"}, "http://10.0.0.5:8500"),
        # CONSUL_HTTP_SSL applies to the default address too, as in the consul CLI
        ({"CONSUL_HTTP_SSL": "true"}, "https://127.0.0.1:8500"),
        ({"CONSUL_HTTP_ADDR": ""}, "http://127.0.0.1:8500"),
    ],
)
def test_from_env_address(env, address):
    settings = s.ConnectionSettings.from_env(env)
    assert settings.address == address
    assert s.Store(settings).address == address


def test_from_env_full():
    env = {
        "CONSUL_HTTP_ADDR": "consul.example:8501",
        "CONSUL_HTTP_SSL": "true",
        "CONSUL_HTTP_SSL_VERIFY": "false",
        "CONSUL_HTTP_TOKEN": "secret-token",
        "CONSUL_CACERT": "/etc/consul/ca.pem",
        "CONSUL_CLIENT_CERT": "/etc/consul/client.pem",
        "CONSUL_CLIENT_KEY": "/etc/consul/client-key.pem",
        "CERANA_KV_PREFIX": "staging",
    }
    settings = s.ConnectionSettings.from_env(env)
    assert settings == s.ConnectionSettings(
        address="https://consul.example:8501",
        token="secret-token",
        validate_certs=False,
        ca_path="/etc/consul/ca.pem",
        client_cert="/etc/consul/client.pem",
        client_key="/etc/consul/client-key.pem",
        prefix="staging",
    )
    assert settings.redacted()["token"] == "********"
    assert "secret-token" not in repr(settings.redacted())


def test_from_env_defaults():
    settings = s.ConnectionSettings.from_env({})
    assert settings == s.ConnectionSettings()
    assert settings.token is None and settings.validate_certs is True and settings.prefix == "cerana"
    assert settings.redacted()["token"] is None


@pytest.mark.parametrize("value", ["false", "0", "no", "off", "FALSE"])
def test_from_env_ssl_verify_false(value):
    assert s.ConnectionSettings.from_env({"CONSUL_HTTP_SSL_VERIFY": value}).validate_certs is False


def test_from_env_bad_boolean():
    with pytest.raises(s.Invalid, match="CONSUL_HTTP_SSL_VERIFY: must be a boolean"):
        s.ConnectionSettings.from_env({"CONSUL_HTTP_SSL_VERIFY": "maybe"})


def test_from_env_overrides_win_unless_none():
    env = {"CONSUL_HTTP_ADDR": "10.0.0.5:8500", "CONSUL_HTTP_TOKEN": "from-env"}
    settings = s.ConnectionSettings.from_env(env, address="http://127.0.0.1:9999", token=None, prefix="p")
    assert (settings.address, settings.token, settings.prefix) == ("http://127.0.0.1:9999", "from-env", "p")


def test_from_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.2:8600")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "t0k")
    settings = s.ConnectionSettings.from_env()
    assert (settings.address, settings.token) == ("http://127.0.0.2:8600", "t0k")


def test_store_token_is_explicit(monkeypatch):
    """py-consul would let CONSUL_HTTP_TOKEN override an explicit token; the Store must not."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    store = s.Store(s.ConnectionSettings(token=None))
    assert "X-Consul-Token" not in store._headers
    assert s.Store(s.ConnectionSettings(token="explicit"))._headers == {"X-Consul-Token": "explicit"}


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:8500", ("http", "127.0.0.1", 8500)),
        ("localhost", ("http", "localhost", 8500)),
        ("https://consul.example", ("https", "consul.example", 443)),
        ("http://[::1]:8500", ("http", "::1", 8500)),
        ("", ("http", "127.0.0.1", 8500)),
    ],
)
def test_parse_address(address, parsed):
    assert s.parse_address(address) == parsed


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("unix:///var/run/consul.sock", "unix sockets are not supported"),
        ("ftp://consul:21", "scheme must be http or https"),
        ("http://consul:99999", "port is not a number"),
        ("http://:8500", "no host"),
    ],
)
def test_parse_address_rejects(address, fragment):
    with pytest.raises(s.Invalid, match=fragment):
        s.parse_address(address)


@pytest.mark.parametrize("key", ["/a", "/", "a//b", "a/../b", "..", "a/./b", "a/..", "", 5, None])
def test_bad_keys(key):
    with pytest.raises(s.Invalid):
        s._check_key(key)


@pytest.mark.parametrize("key", ["a", "a/b/c", "a-b.c_d", "a/b/", "a..b", "x/.hidden"])
def test_good_keys(key):
    assert s._check_key(key) == key


def test_cas_conflict_messages():
    create = s.CasConflict("datasets/web/config", 0, 17)
    assert str(create) == (
        "compare-and-swap on 'datasets/web/config' failed: expected it to be absent (index 0), "
        "but its modify index is now 17"
    )
    stale = s.CasConflict("k", 5, None)
    assert str(stale) == "compare-and-swap on 'k' failed: expected modify index 5, but it is absent"
    assert (stale.key, stale.expected, stale.current) == ("k", 5, None)


def test_unreachable_message():
    err = s.Unreachable("http://127.0.0.1:1", "connection refused")
    assert str(err) == "cannot reach Consul at http://127.0.0.1:1: connection refused"


def test_error_hierarchy():
    for cls in (s.NotFound, s.CasConflict, s.Unreachable, s.PermissionDenied, s.Invalid, s.LockNotHeld):
        assert issubclass(cls, s.StoreError)


# ---------------------------------------------------------------------------
# The watch loop's index rules, against a fake Store._list


class FakeListing:
    """Replays (index, entries) answers to Store._list and records the index asked for."""

    def __init__(self, answers, stop):
        self.answers = list(answers)
        self.asked = []
        self.stop = stop

    def __call__(self, prefix, *, index=None, wait=None, consistent=False):
        self.asked.append(index)
        answer = self.answers.pop(0)
        if not self.answers:
            self.stop.set()
        return answer


def run_watch(answers, start=0):
    stop = threading.Event()
    store = s.Store(s.ConnectionSettings(address="http://127.0.0.1:1"))
    fake = FakeListing(answers, stop)
    store._list = fake
    yielded = list(store.watch("p", index=start, wait="1s", stop=stop))
    return yielded, fake.asked


def test_watch_yields_changes_only():
    yielded, asked = run_watch([(10, ["a"]), (10, ["a"]), (12, ["a", "b"]), (12, ["a", "b"])])
    assert yielded == [(10, ["a"]), (12, ["a", "b"])]
    assert asked == [0, 10, 10, 12]


def test_watch_resets_when_the_index_goes_backwards():
    # a snapshot restore: the index drops from 50 to 20; the watch asks again from 0 and
    # yields the restored listing even though its index is lower than the last one seen
    yielded, asked = run_watch([(50, ["a", "b"]), (20, ["a"]), (20, ["a"]), (21, ["a", "c"])])
    assert yielded == [(50, ["a", "b"]), (20, ["a"]), (21, ["a", "c"])]
    assert asked == [0, 50, 0, 20]


def test_watch_index_zero_is_treated_as_one():
    yielded, asked = run_watch([(0, []), (0, []), (3, ["a"])])
    assert yielded == [(1, []), (3, ["a"])]
    assert asked == [0, 1, 1]


def test_watch_starts_from_the_given_index():
    yielded, asked = run_watch([(7, ["a"]), (9, ["a", "b"])], start=7)
    assert yielded == [(9, ["a", "b"])]
    assert asked == [7, 7]


def test_watch_does_not_start_when_stopped():
    stop = threading.Event()
    stop.set()
    store = s.Store(s.ConnectionSettings(address="http://127.0.0.1:1"))
    store._list = pytest.fail  # never called
    assert list(store.watch("p", stop=stop)) == []


def test_requests_env_in_use_only_when_something_would_be_found(tmp_path):
    from ansible_collections.cerana.platform.plugins.module_utils._store import requests_env_in_use

    assert not requests_env_in_use({"PATH": "/bin", "CONSUL_HTTP_ADDR": "x"}, home=str(tmp_path))
    for name in ("HTTPS_PROXY", "http_proxy", "ALL_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NETRC"):
        assert requests_env_in_use({name: "x"}, home=str(tmp_path)), name
        assert not requests_env_in_use({name: ""}, home=str(tmp_path)), name  # set but empty: unused
    # per scheme: a CA bundle or an https proxy means nothing to an http:// agent
    for name in ("HTTPS_PROXY", "REQUESTS_CA_BUNDLE", "curl_ca_bundle", "NO_PROXY"):
        assert not requests_env_in_use({name: "x"}, home=str(tmp_path), scheme="http"), name
    for name in ("HTTPS_PROXY", "REQUESTS_CA_BUNDLE", "all_proxy", "netrc"):
        assert requests_env_in_use({name: "x"}, home=str(tmp_path), scheme="https"), name
    assert not requests_env_in_use({"HTTP_PROXY": "x", "NO_PROXY": "y"}, home=str(tmp_path), scheme="https")
    assert requests_env_in_use({"HTTP_PROXY": "x"}, home=str(tmp_path), scheme="http")
    (tmp_path / ".netrc").write_text("machine x login y password z\n")
    assert requests_env_in_use({}, home=str(tmp_path))
    assert requests_env_in_use({}, home=str(tmp_path), scheme="http")


def test_a_missing_ca_file_is_named_in_the_error(tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    store = s.Store(s.ConnectionSettings(address="https://127.0.0.1:1", ca_path=str(missing)), transport="http")
    with pytest.raises(s.Unreachable, match=r"TLS error: cannot load .*no-such-ca\.pem"):
        store.get("a")


def test_request_timeout_waits_for_a_blocking_query():
    assert s.request_timeout(10, [("recurse", "")]) == 10
    assert s.request_timeout(10, [("index", "5"), ("wait", "16s")]) == 10 + 16 + 1
    assert s.request_timeout(10, [("index", "5"), ("wait", "1m30s")]) == 10 + 90 + 90 / 16
    assert s.request_timeout(10, [("index", "5"), ("wait", "500ms")]) == 10 + 0.5 + 0.5 / 16
    assert s.request_timeout(2, [("index", "5")]) == 2 + 300 + 300 / 16  # Consul's default wait
