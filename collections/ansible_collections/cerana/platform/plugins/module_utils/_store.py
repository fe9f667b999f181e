# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""The platform's state store: one Consul KV client shared by modules, plugins and daemons.

Nothing here imports Ansible. Every call goes through :meth:`Store._call`, which
turns transport and HTTP failures into the typed errors below, so callers never
see a transport's own exception.

The HTTP transport is the standard library's ``http.client`` with one kept-alive
connection per thread (:class:`HttpTransport`): a module pays no import of
``requests`` and py-consul (about 0.2 s of each module call), and a daemon's small
request costs about 0.2 ms of client CPU instead of about 1 ms. Where the environment
holds something only ``requests`` honours for the agent's scheme (a proxy, a netrc file,
for https a CA bundle variable), the store uses py-consul's ``requests`` client instead
(:class:`RequestsTransport`), so such a setup keeps working as it did.

Keys given to a :class:`Store` are relative to its ``prefix`` (``cerana`` unless
told otherwise); entries it returns carry keys relative to that prefix too.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import random
import re
import ssl
import threading
import time
import urllib.parse

DEFAULT_PREFIX = "cerana"
DEFAULT_ADDRESS = "http://127.0.0.1:8500"
# Consul refuses more operations in one transaction (its limit since 0.7).
TXN_MAX_OPS = 64


class StoreError(Exception):
    """Base class of every error the store raises."""


class NotFound(StoreError):
    """The key or object does not exist."""


class CasConflict(StoreError):
    """A compare-and-swap lost: the key changed since it was read."""

    def __init__(self, key, expected, current):
        self.key = key
        self.expected = expected
        self.current = current
        if expected == 0:
            what = "expected it to be absent (index 0)"
        else:
            what = "expected modify index %s" % expected
        now = "it is absent" if current in (None, 0) else "its modify index is now %s" % current
        super().__init__("compare-and-swap on %r failed: %s, but %s" % (key, what, now))


class Unreachable(StoreError):
    """Consul could not be reached, or did not answer in time."""

    def __init__(self, address, reason):
        self.address = address
        self.reason = reason
        super().__init__("cannot reach Consul at %s: %s" % (address, reason))


class PermissionDenied(StoreError):
    """The ACL token (or its absence) does not allow the request."""


class Invalid(StoreError):
    """The request was malformed (bad key, bad argument, rejected by Consul with 400)."""


class LockNotHeld(StoreError):
    """A lock or ephemeral key was lost (its session expired or was destroyed)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One KV entry. ``key`` is relative to the store prefix; ``value`` is bytes."""

    key: str
    value: bytes
    modify_index: int
    create_index: int = 0
    lock_index: int = 0
    flags: int = 0
    session: str | None = None

    @property
    def text(self):
        return self.value.decode("utf-8")

    def json(self):
        return json.loads(self.value.decode("utf-8"))


@dataclasses.dataclass(frozen=True)
class ConnectionSettings:
    """How to reach Consul; the fields follow the ``consul`` CLI's environment variables."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    validate_certs: bool = True
    ca_path: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    prefix: str = DEFAULT_PREFIX
    timeout: float = 10.0

    @classmethod
    def from_env(cls, environ=None, **overrides):
        """Settings from ``CONSUL_HTTP_*`` variables; non-None ``overrides`` win."""
        env = os.environ if environ is None else environ
        values = {
            # Like the consul CLI: CONSUL_HTTP_SSL also applies to the default address.
            "address": env.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDRESS.split("://", 1)[1],
            "token": env.get("CONSUL_HTTP_TOKEN") or None,
            "validate_certs": parse_bool(env.get("CONSUL_HTTP_SSL_VERIFY", "true"), "CONSUL_HTTP_SSL_VERIFY"),
            "ca_path": env.get("CONSUL_CACERT") or None,
            "client_cert": env.get("CONSUL_CLIENT_CERT") or None,
            "client_key": env.get("CONSUL_CLIENT_KEY") or None,
            "prefix": env.get("CERANA_KV_PREFIX", DEFAULT_PREFIX),
        }
        if parse_bool(env.get("CONSUL_HTTP_SSL", "false"), "CONSUL_HTTP_SSL") and "://" not in values["address"]:
            values["address"] = "https://" + values["address"]
        elif "://" not in values["address"]:
            values["address"] = "http://" + values["address"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def redacted(self):
        """A dict for logs and results: the token never appears."""
        d = dataclasses.asdict(self)
        d["token"] = "********" if self.token else None
        return d


def parse_bool(value, name):
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise Invalid("%s: must be a boolean, got %r" % (name, value))


def parse_address(address):
    """Split a Consul address (``host:port``, ``http://host:port``, ``https://...``) into scheme, host, port."""
    addr = (address or DEFAULT_ADDRESS).strip()
    if addr.startswith("unix://"):
        raise Invalid("consul address %r: unix sockets are not supported; use http(s)://host:port" % address)
    if "://" not in addr:
        addr = "http://" + addr
    parsed = urllib.parse.urlsplit(addr)
    if parsed.scheme not in ("http", "https"):
        raise Invalid("consul address %r: scheme must be http or https" % address)
    try:
        port = parsed.port
    except ValueError:
        raise Invalid("consul address %r: port is not a number in 1-65535" % address) from None
    host = parsed.hostname
    if not host:
        raise Invalid("consul address %r: no host" % address)
    if port is None:
        port = 443 if parsed.scheme == "https" else 8500
    return parsed.scheme, host, port


def _check_key(key):
    if not isinstance(key, str):
        raise Invalid("key must be a string, got %r" % (key,))
    if not key:
        raise Invalid("key must not be empty")
    if key.startswith("/"):
        raise Invalid("key %r: must not start with '/'" % key)
    if "//" in key or any(part in (".", "..") for part in key.split("/")):
        raise Invalid("key %r: empty, '.' or '..' path segments are not allowed" % key)
    return key


def _b64(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("utf-8")
    return base64.b64encode(value).decode("ascii")


_REQUESTS_ENV = {
    # what requests reads from the environment for a URL of each scheme (NO_PROXY alone changes nothing)
    "http": ("http_proxy", "all_proxy", "netrc"),
    "https": ("https_proxy", "all_proxy", "netrc", "requests_ca_bundle", "curl_ca_bundle"),
}


def requests_env_in_use(environ=None, home=None, scheme=None):
    """Whether the environment holds anything requests would use for a URL of ``scheme`` (any
    scheme when None): a proxy, a CA bundle (https only), a netrc file."""
    environ = os.environ if environ is None else environ
    names = set(_REQUESTS_ENV["http"]) | set(_REQUESTS_ENV["https"]) if scheme is None else set(_REQUESTS_ENV[scheme])
    if any(name.lower() in names and value for name, value in environ.items()):
        return True
    home = os.path.expanduser("~") if home is None else home
    return any(os.path.exists(os.path.join(home, name)) for name in (".netrc", "_netrc"))


class Store:
    """A Consul KV client rooted at a key prefix.

    Reads default to Consul's default consistency mode; pass ``consistent=True``
    where a stale read would be wrong.
    """

    def __init__(self, settings=None, *, transport=None, **kwargs):
        self.settings = settings or ConnectionSettings.from_env(**kwargs)
        scheme, host, port = parse_address(self.settings.address)
        self.address = "%s://%s:%s" % (scheme, host, port)
        verify = self.settings.validate_certs
        if verify and self.settings.ca_path:
            verify = self.settings.ca_path
        cert = None
        if self.settings.client_cert:
            cert = (
                (self.settings.client_cert, self.settings.client_key)
                if self.settings.client_key
                else self.settings.client_cert
            )
        if transport is None:
            transport = "requests" if requests_env_in_use(scheme=scheme) else "http"
        if transport not in _TRANSPORTS:
            raise Invalid("transport %r: must be one of %s" % (transport, ", ".join(sorted(_TRANSPORTS))))
        self.transport = _TRANSPORTS[transport](scheme, host, port, verify, cert, self.settings.timeout)
        self._headers = {"X-Consul-Token": self.settings.token} if self.settings.token else {}
        prefix = (self.settings.prefix or "").strip("/")
        self.prefix = prefix + "/" if prefix else ""

    def close(self):
        """Close the calling thread's connection (the next request opens a new one)."""
        self.transport.close()

    # -- plumbing -------------------------------------------------------------

    def _full(self, key):
        return self.prefix + _check_key(key)

    def _rel(self, key):
        return key[len(self.prefix) :] if self.prefix and key.startswith(self.prefix) else key

    def _call(self, method, path, params=None, body=None, *, allow_404=True):
        """One HTTP request; returns (status, headers, body text). Raises typed errors."""
        params = [(k, v) for k, v in (params or []) if v is not None]
        if body is None and method != "get":
            body = ""
        try:
            resp = self.transport.request(method.upper(), path, params, body, self._headers)
        except _TLSError as e:
            raise Unreachable(self.address, "TLS error: %s" % e) from None
        except _Timeout:
            raise Unreachable(self.address, "no answer within %ss" % self.settings.timeout) from None
        except _ConnectionError as e:
            raise Unreachable(self.address, _connection_reason(e)) from None
        code = resp.code
        if code == 403:
            raise PermissionDenied(
                "Consul refused %s %s: permission denied (%s)"
                % (
                    method.upper(),
                    path,
                    "the token lacks the right" if self.settings.token else "no ACL token was given",
                )
            )
        if code == 404 and allow_404:
            return resp
        if code == 500 and "invalid session" in resp.body.lower():
            # acquire/release with a session that expired or was destroyed
            raise LockNotHeld("Consul refused %s %s: %s" % (method.upper(), path, resp.body.strip()))
        if code == 400 or code == 413:
            raise Invalid("Consul rejected %s %s: %s" % (method.upper(), path, resp.body.strip()))
        if code >= 500 and "rpc error" in resp.body.lower():
            # No leader, or the servers cannot be reached from this agent.
            raise Unreachable(self.address, resp.body.strip())
        if code >= 400 and code != 409:
            raise StoreError("Consul answered %s to %s %s: %s" % (code, method.upper(), path, resp.body.strip()))
        return resp

    def _entry(self, raw):
        value = raw.get("Value")
        return Entry(
            key=self._rel(raw["Key"]),
            value=base64.b64decode(value) if value else b"",
            modify_index=int(raw.get("ModifyIndex", 0)),
            create_index=int(raw.get("CreateIndex", 0)),
            lock_index=int(raw.get("LockIndex", 0)),
            flags=int(raw.get("Flags", 0)),
            session=raw.get("Session") or None,
        )

    # -- reads ----------------------------------------------------------------

    def ping(self):
        """Return the name of the agent's node; raises Unreachable when it does not answer."""
        resp = self._call("get", "/v1/status/leader")
        leader = json.loads(resp.body or '""')
        if not leader:
            raise Unreachable(self.address, "the Consul cluster has no leader")
        return leader

    def peers(self):
        """The Raft peers of the Consul servers, as ``ip:port`` strings (``/v1/status/peers``)."""
        resp = self._call("get", "/v1/status/peers")
        try:
            peers = json.loads(resp.body or "[]")
        except ValueError:
            raise StoreError("Consul answered /v1/status/peers with something that is not JSON") from None
        return [str(p) for p in peers] if isinstance(peers, list) else []

    def get(self, key, *, consistent=False):
        """The entry at ``key``, or None."""
        params = [("consistent", "")] if consistent else []
        resp = self._call("get", "/v1/kv/" + self._full(key), params)
        if resp.code == 404:
            return None
        items = json.loads(resp.body)
        return self._entry(items[0]) if items else None

    def require(self, key, *, consistent=False):
        entry = self.get(key, consistent=consistent)
        if entry is None:
            raise NotFound("key %r not found" % key)
        return entry

    def list(self, prefix="", *, consistent=False):
        """Every entry below ``prefix``, recursively, sorted by key."""
        return self._list(prefix, consistent=consistent)[1]

    def _list(self, prefix, *, index=None, wait=None, consistent=False):
        params = [("recurse", "")]
        if consistent:
            params.append(("consistent", ""))
        if index is not None:
            params += [("index", str(index)), ("wait", wait)]
        full = self.prefix + prefix if prefix else self.prefix
        if prefix:
            _check_key(prefix.rstrip("/") or prefix)  # "/" and "//" are invalid too
        resp = self._call("get", "/v1/kv/" + full, params)
        new_index = int(resp.headers.get("X-Consul-Index", 0) or 0)
        if resp.code == 404:
            if index is None:
                self._check_read(full)
            return new_index, []
        return new_index, sorted((self._entry(i) for i in json.loads(resp.body)), key=lambda e: e.key)

    def keys(self, prefix="", *, separator=None):
        """Keys below ``prefix`` (relative to the store prefix). With ``separator='/'``, immediate children only."""
        full = self.prefix + prefix if prefix else self.prefix
        if prefix:
            _check_key(prefix.rstrip("/") or prefix)  # "/" and "//" are invalid too
        params = [("keys", ""), ("separator", separator)]
        resp = self._call("get", "/v1/kv/" + full, params)
        if resp.code == 404:
            self._check_read(full)
            return []
        return sorted(self._rel(k) for k in json.loads(resp.body))

    def _check_read(self, full):
        """Raise PermissionDenied when an empty listing is really an ACL filtering everything out.

        Consul answers a recursive read it may not show with 404, like an empty tree; a
        plain read of the prefix key itself answers 403 in that case.
        """
        self._call("get", "/v1/kv/" + full)

    def children(self, prefix):
        """Names of the immediate children of ``prefix/`` (both leaves and sub-trees)."""
        base = prefix.rstrip("/") + "/" if prefix.rstrip("/") else ""
        names = set()
        for key in self.keys(base, separator="/"):
            rest = key[len(base) :]
            name = rest.split("/", 1)[0]
            if name:
                names.add(name)
        return sorted(names)

    # -- writes ---------------------------------------------------------------

    def put(self, key, value, *, cas=None):
        """Write ``value``; with ``cas`` (0 = create only) write only if the index matches.

        Returns the new Entry, read back atomically in the same transaction, so the
        new modify index is exact (no racy second GET).
        """
        op = {"Verb": "set" if cas is None else "cas", "Key": key, "Value": value}
        if cas is not None:
            op["Index"] = int(cas)
        try:
            results = self.txn([{"KV": op}])
        except CasConflict:
            current = self.get(key, consistent=True)
            raise CasConflict(key, cas, current.modify_index if current else None) from None
        # Consul's transaction results leave the value out; it is the one we wrote.
        return dataclasses.replace(results[0], value=_bytes(value))

    def delete(self, key, *, cas=None):
        """Delete one key (no error when it is absent); with ``cas``, only if unchanged since that index."""
        if cas is None:
            self._call("delete", "/v1/kv/" + self._full(key))
            return
        resp = self._call("delete", "/v1/kv/" + self._full(key), [("cas", str(int(cas)))])
        if resp.body.strip() != "true":
            current = self.get(key, consistent=True)
            if current is None and cas == 0:
                return
            raise CasConflict(key, cas, current.modify_index if current else None)

    def delete_tree(self, prefix, *, cas_key=None, cas=None):
        """Delete the key ``prefix`` and every key below ``prefix/``, atomically.

        ``datasets/web`` removes ``datasets/web`` and ``datasets/web/...`` but never
        ``datasets/webapp``. With ``cas_key`` and ``cas``, only if ``cas_key`` still has
        modify index ``cas`` (raises CasConflict otherwise).
        """
        base = prefix.rstrip("/")
        if not base:
            raise Invalid("refusing to delete the whole store: the prefix is empty")
        _check_key(base)
        ops = []
        if cas_key is not None and cas is not None:
            ops.append({"KV": {"Verb": "check-index", "Key": cas_key, "Index": int(cas)}})
        ops += [{"KV": {"Verb": "delete", "Key": base}}, {"KV": {"Verb": "delete-tree", "Key": base + "/"}}]
        try:
            self.txn(ops)
        except CasConflict:
            current = self.get(cas_key, consistent=True)
            raise CasConflict(cas_key, cas, current.modify_index if current else None) from None

    def txn(self, ops):
        """Run KV operations atomically; returns the entries the operations produced.

        ``ops`` are Consul transaction operations ``{"KV": {"Verb": ..., "Key": ...}}``
        with keys relative to the store prefix (values may be bytes or str; they are
        base64-encoded here). A failed check-and-set raises :class:`CasConflict`.
        """
        if not ops:
            return []
        if len(ops) > TXN_MAX_OPS:
            raise Invalid("a transaction takes at most %d operations, got %d" % (TXN_MAX_OPS, len(ops)))
        payload = []
        for op in ops:
            kv = dict(op["KV"])
            key = kv["Key"]
            # "x/" (a delete-tree prefix) is checked as "x"; "/" alone stays invalid
            kv["Key"] = self._full(key.rstrip("/") or key) + ("/" if key.endswith("/") else "")
            if "Value" in kv:
                kv["Value"] = _b64(kv["Value"])
            payload.append({"KV": kv})
        resp = self._call("put", "/v1/txn", body=json.dumps(payload))
        data = json.loads(resp.body) if resp.body else {}
        if resp.code == 409:
            errors = data.get("Errors") or []
            first = errors[0] if errors else {}
            idx = first.get("OpIndex", 0)
            bad = payload[idx]["KV"] if idx < len(payload) else {}
            msg = first.get("What", "transaction rolled back")
            if "permission denied" in msg.lower():
                # ACLs reject a transaction's operations with 409, not 403.
                raise PermissionDenied(
                    "Consul refused the transaction on %r: permission denied (%s)"
                    % (
                        self._rel(bad.get("Key", "?")),
                        "the token lacks the right" if self.settings.token else "no ACL token was given",
                    )
                )
            # Classify by the failed operation's verb: Consul's message quotes the key,
            # so matching words in it misfires on keys such as "cas-lock".
            verb = bad.get("Verb")
            if verb in ("cas", "delete-cas", "check-index", "check-not-exists"):
                raise CasConflict(self._rel(bad.get("Key", "?")), bad.get("Index", 0), None)
            if verb in ("lock", "unlock", "check-session"):
                raise LockNotHeld("transaction on %r failed: %s" % (self._rel(bad.get("Key", "?")), msg))
            raise Invalid("transaction rolled back: %s" % msg)
        return [self._entry(r["KV"]) for r in (data.get("Results") or []) if r.get("KV")]

    def update(self, key, fn, *, attempts=50):
        """Read-modify-write under CAS, retried on conflict. ``fn(old: bytes|None) -> bytes|None``.

        Returning None from ``fn`` leaves the key as it is. Returns the final Entry.
        """
        last = CasConflict(key, None, None)
        for attempt in range(attempts):
            current = self.get(key, consistent=True)
            new = fn(current.value if current else None)
            if new is None:
                return current
            try:
                return self.put(key, new, cas=current.modify_index if current else 0)
            except CasConflict as e:
                last = e  # report the indexes of the last lost race, not "expected None"
                # Back off a little, with jitter, so hot writers stop colliding in lockstep.
                time.sleep(random.uniform(0, min(0.2, 0.005 * (2**attempt))))
        raise last

    # -- sessions -------------------------------------------------------------

    def session_create(self, ttl, *, behavior="release", lock_delay=15, name="cerana"):
        """Create a session with a TTL (seconds). Returns its id."""
        body = {
            "Name": name,
            "TTL": "%ds" % max(1, round(ttl)),
            "Behavior": behavior,
            "LockDelay": "%ds" % int(lock_delay),
            # No node health checks: a session lives exactly as long as it is renewed.
            "Checks": [],
        }
        resp = self._call("put", "/v1/session/create", body=json.dumps(body))
        return json.loads(resp.body)["ID"]

    def session_renew(self, session_id):
        """Renew a session; raises LockNotHeld when it is gone."""
        resp = self._call("put", "/v1/session/renew/" + session_id)
        if resp.code == 404:
            raise LockNotHeld("session %s has expired or was destroyed" % session_id)

    def session_destroy(self, session_id):
        self._call("put", "/v1/session/destroy/" + session_id)

    def session_info(self, session_id):
        resp = self._call("get", "/v1/session/info/" + session_id)
        if resp.code == 404:
            return None
        data = json.loads(resp.body or "null")
        return data[0] if data else None

    def acquire(self, key, value, session_id):
        """Write ``value`` at ``key`` bound to a session; False when another session holds it."""
        resp = self._call("put", "/v1/kv/" + self._full(key), [("acquire", session_id)], body=_bytes(value))
        return resp.body.strip() == "true"

    def release(self, key, session_id, value=None):
        params = [("release", session_id)]
        body = _bytes(value) if value is not None else None
        if body is None:
            current = self.get(key)
            body = current.value if current else b""
        resp = self._call("put", "/v1/kv/" + self._full(key), params, body=body)
        return resp.body.strip() == "true"

    # -- watches --------------------------------------------------------------

    def watch(self, prefix="", *, index=0, wait="30s", stop=None):
        """Yield ``(index, entries)`` each time something under ``prefix`` changes.

        Blocking queries per Consul's rules: an index that goes backwards (a
        snapshot restore, a new cluster) resets to 0 and the full listing is
        yielded again; an index of 0 from the server is treated as 1. Stops when
        ``stop`` (a threading.Event) is set.
        """
        last = int(index)
        while stop is None or not stop.is_set():
            new, entries = self._list(prefix, index=last, wait=wait)
            if new < 1:
                new = 1
            if new < last:
                last = 0
                continue
            if new == last:
                continue
            last = new
            yield new, entries


def _bytes(value):
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def _connection_reason(exc):
    text = str(exc)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "No route to host",
        "timed out",
        "Network is unreachable",
    ):
        if marker in text:
            return marker.lower() if marker != "Connection refused" else "connection refused"
    return text


# -- transports ----------------------------------------------------------------------------------
#
# A transport sends one request: ``request(method, path, params, body, headers)`` returns a
# :class:`Response`, or raises one of the three errors below, which :meth:`Store._call` turns into
# :class:`Unreachable`. ``close()`` drops the calling thread's connection.


class _TransportError(Exception):
    pass


class _ConnectionError(_TransportError):
    pass


class _Timeout(_TransportError):
    pass


class _TLSError(_TransportError):
    pass


class Response:
    """An HTTP answer: status ``code``, ``headers`` (case-insensitive ``get``) and ``body`` text."""

    __slots__ = ("body", "code", "headers")

    def __init__(self, code, headers, body):
        self.code = code
        self.headers = headers
        self.body = body


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9.]+)(ns|us|\u00b5s|ms|s|m|h)")
# Consul holds a blocking query without ``wait`` for five minutes.
_DEFAULT_WAIT = 300.0


def request_timeout(timeout, params):
    """How long to wait for an answer: ``timeout``, or for a blocking query (``index`` in
    ``params``) its ``wait`` plus Consul's jitter of up to wait/16 on top."""
    params = dict(params or ())
    if "index" not in params:
        return timeout
    wait = params.get("wait")
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(wait)) if wait else _DEFAULT_WAIT
    return timeout + seconds + seconds / 16


def tls_context(verify, cert):
    """An ``ssl`` context from ``verify`` (a bool, or a CA file) and ``cert`` (a file, or (cert, key))."""
    ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        certfile, keyfile = cert if isinstance(cert, tuple) else (cert, None)
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def request_target(path, params):
    """The request target of ``path`` (quoted as Consul expects) with ``params`` as its query."""
    url = urllib.parse.quote(path, safe="/:")
    return url + "?" + urllib.parse.urlencode(params) if params else url


_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class HttpTransport:
    """``http.client`` with one kept-alive connection per thread, so that one store can be shared
    between threads (a blocking query in one never holds up another).

    A request that fails because Consul closed a reused idle connection before answering is sent
    once more on a new connection, as urllib3 does. Consul may then see it twice, which every
    request of the store allows: reads, compare-and-swap or idempotent writes, and session
    creations (a spare session is never used and expires with its TTL).
    """

    def __init__(self, scheme, host, port, verify=True, cert=None, timeout=10.0):
        self.scheme, self.host, self.port = scheme, host, port
        self.verify, self.cert, self.timeout = verify, cert, timeout
        self._local = threading.local()
        self._ssl = None

    @property
    def connection(self):
        """The calling thread's open connection, or None."""
        return getattr(self._local, "conn", None)

    def _connect(self):
        if self.scheme != "https":
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        if self._ssl is None:
            try:
                self._ssl = tls_context(self.verify, self.cert)
            except (OSError, ValueError) as e:  # a CA or certificate file missing or unreadable
                cert = self.cert if isinstance(self.cert, tuple) else (self.cert,)
                files = [f for f in (self.verify if isinstance(self.verify, str) else None, *cert) if f]
                raise _TLSError(
                    "cannot load %s: %s" % (", ".join(files) or "the system's CA certificates", e)
                ) from None
        return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ssl)

    def close(self):
        conn, self._local.conn = self.connection, None
        if conn is not None:
            conn.close()

    def request(self, method, path, params, body, headers):
        target = request_target(path, params)
        if isinstance(body, str):
            body = body.encode("utf-8")
        timeout = request_timeout(self.timeout, params)
        for _attempt in range(2):
            conn = self.connection
            reused = conn is not None
            if not reused:
                conn = self._local.conn = self._connect()
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except _STALE as e:
                self.close()
                if reused:
                    continue  # Consul closed the idle connection: once more on a new one
                raise _ConnectionError(str(e) or type(e).__name__) from None
            except TimeoutError:
                self.close()
                raise _Timeout() from None
            except ssl.SSLError as e:
                self.close()
                raise _TLSError(str(e)) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise _ConnectionError(str(e) or type(e).__name__) from None
            if resp.will_close:
                self.close()
            return Response(resp.status, resp.headers, payload.decode("utf-8", "replace"))
        raise _ConnectionError("connection closed by Consul twice")  # pragma: no cover


class RequestsTransport:
    """py-consul's ``requests`` client: for environments with proxies, a CA bundle variable or
    a netrc file, which only ``requests`` honours."""

    def __init__(self, scheme, host, port, verify=True, cert=None, timeout=10.0):
        try:
            import consul.std
            import requests
        except ImportError as e:
            raise StoreError(
                "the environment sets a proxy, a CA bundle or a netrc file, which only the requests library honours: "
                "install py-consul (and requests) to use them, or unset them (%s)" % e
            ) from None
        self._errors = requests.exceptions
        self._http = consul.std.HTTPClient(host, port, scheme, verify, cert, connections_timeout=timeout)

    def close(self):
        pass

    def request(self, method, path, params, body, headers):
        fn = getattr(self._http, method.lower())
        try:
            if method == "GET":
                return fn(lambda r: r, path, params=params, headers=headers)
            return fn(lambda r: r, path, params=params, data=body, headers=headers)
        except self._errors.SSLError as e:
            raise _TLSError(str(e)) from None
        except self._errors.Timeout:
            raise _Timeout() from None
        except (self._errors.ConnectionError, OSError, ValueError) as e:
            raise _ConnectionError(str(e)) from None


_TRANSPORTS = {"http": HttpTransport, "requests": RequestsTransport}


class EphemeralKey:
    """A key that lives only while its session is renewed (Behavior ``delete``).

    ``set()`` writes the value, creating the session on first use or after it was
    lost; ``renew()`` extends it; ``rebind(ttl)`` moves the key to a fresh session
    with another TTL in one transaction (the original kept the first TTL forever);
    ``destroy()`` deletes the key and its session.
    """

    def __init__(self, store, key, ttl, *, lock_delay=0, name="cerana-ephemeral"):
        self.store = store
        self.key = _check_key(key)
        self.ttl = ttl
        self.lock_delay = lock_delay
        self.name = name
        self.session = None

    def _new_session(self, ttl):
        return self.store.session_create(ttl, behavior="delete", lock_delay=self.lock_delay, name=self.name)

    def set(self, value):
        if self.session is not None:
            try:
                self.store.session_renew(self.session)
            except LockNotHeld:
                self.session = None
        if self.session is None:
            self.session = self._new_session(self.ttl)
        if not self.store.acquire(self.key, value, self.session):
            raise LockNotHeld("ephemeral key %r is held by another session" % self.key)

    def renew(self):
        if self.session is None:
            raise LockNotHeld("ephemeral key %r has no session yet" % self.key)
        try:
            self.store.session_renew(self.session)
        except LockNotHeld:
            self.session = None
            raise

    def rebind(self, ttl, value=None):
        """Bind the key to a new session with ``ttl``, atomically; the old session is destroyed."""
        old = self.session
        new = self._new_session(ttl)
        if value is None:
            current = self.store.get(self.key, consistent=True)
            value = current.value if current else b""
        ops = []
        if old is not None:
            ops.append({"KV": {"Verb": "unlock", "Key": self.key, "Value": value, "Session": old}})
        ops.append({"KV": {"Verb": "lock", "Key": self.key, "Value": value, "Session": new}})
        try:
            self.store.txn(ops)
        except StoreError:
            self.store.session_destroy(new)
            raise
        self.session, self.ttl = new, ttl
        if old is not None:
            self.store.session_destroy(old)

    def destroy(self):
        if self.session is not None:
            self.store.session_destroy(self.session)
            self.session = None
        self.store.delete(self.key)


class Lock:
    """A Consul lock (leader election): session + acquire, released on shutdown.

    ``lock_delay`` is how long Consul keeps the key from being re-acquired after
    the holder's session was invalidated (not after a clean release).
    """

    def __init__(self, store, key, *, ttl=15, lock_delay=15, value=b"", name="cerana-lock"):
        self.store = store
        self.key = _check_key(key)
        self.ttl = ttl
        self.lock_delay = lock_delay
        self.value = value
        self.name = name
        self.session = None

    def acquire(self, *, blocking=False, timeout=None, stop=None, poll=1.0):
        """Try to take the lock; with ``blocking``, wait until it is free (or ``timeout``/``stop``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.session is None:
                self.session = self.store.session_create(
                    self.ttl, behavior="release", lock_delay=self.lock_delay, name=self.name
                )
            try:
                acquired = self.store.acquire(self.key, self.value, self.session)
            except LockNotHeld:
                # Our session expired or was destroyed since the last attempt: start afresh.
                self.session = None
                continue
            if acquired:
                return True
            if not blocking:
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            # Keep our session alive while we wait, then wait for the key to change.
            try:
                self.store.session_renew(self.session)
            except LockNotHeld:
                self.session = None
            step = poll if remaining is None else min(poll, remaining)
            if stop is not None:
                if stop.wait(step):
                    return False
            else:
                time.sleep(step)

    def held(self):
        """Whether this instance still holds the lock (reads the key)."""
        if self.session is None:
            return False
        entry = self.store.get(self.key, consistent=True)
        return entry is not None and entry.session == self.session

    def renew(self):
        if self.session is None:
            raise LockNotHeld("lock %r is not held" % self.key)
        self.store.session_renew(self.session)
        if not self.held():
            raise LockNotHeld("lock %r was lost" % self.key)

    def release(self):
        """Release the lock and destroy the session; safe to call twice."""
        session, self.session = self.session, None
        if session is None:
            return
        try:
            self.store.release(self.key, session, self.value)
        finally:
            self.store.session_destroy(session)

    def __enter__(self):
        if not self.acquire(blocking=True):
            raise LockNotHeld("could not acquire %r" % self.key)
        return self

    def __exit__(self, *exc):
        self.release()


class Renewer(threading.Thread):
    """Renews a session every ``ttl/3`` seconds until stopped; calls ``on_lost`` if it is lost."""

    def __init__(self, store, session_id, ttl, on_lost=None):
        super().__init__(daemon=True, name="cerana-session-renewer")
        self.store = store
        self.session_id = session_id
        self.interval = max(0.2, ttl / 3.0)
        self.on_lost = on_lost
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.wait(self.interval):
            try:
                self.store.session_renew(self.session_id)
            except LockNotHeld:
                if self.on_lost:
                    self.on_lost()
                return
            except StoreError:
                continue  # Consul briefly away: try again at the next interval

    def stop(self):
        self.stop_event.set()
