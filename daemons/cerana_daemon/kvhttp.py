"""A :class:`_store.Store` whose HTTP transport is a persistent ``http.client`` connection per thread.

Through py-consul's ``requests`` session, a small Consul request costs about 1 ms of client
CPU on top of Consul's own (environment and CA-bundle look-ups on every call, gzip,
urllib3's pool); through one kept-alive ``http.client`` connection, about 0.2 ms. The
daemons make such requests all the time (the cluster tick's watch and reads on every
heartbeat, the node tick's heartbeats, the bootserver's leases), so they use this transport.
It keeps everything the Store does (URLs, tokens, error mapping, typed errors) and only
replaces the HTTP layer; it raises the ``requests`` exceptions the Store already maps to
:class:`_store.Unreachable`. It knows nothing of proxies, netrc files or CA bundles named in
the environment: where any of those is set, :func:`daemon_store` gives py-consul's own client,
which honours them. The modules keep py-consul's own client: one process per call,
where a persistent connection buys nothing.

Each thread that uses a store gets its own connection, so one store may be shared between
threads (a blocking query in one never holds up the others).

A request that fails because a reused keep-alive connection was closed by Consul before it
answered is sent once more on a new connection (as urllib3 does). Consul may then see a
request twice, which the daemons' requests allow: reads, writes that are compare-and-swap or
idempotent, and session creations (a spare session is never used and expires with its TTL).
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.parse

import requests
from consul import base as consul_base
from consul.std import parse_duration

from ansible_collections.cerana.platform.plugins.module_utils._store import Store, requests_env_in_use

_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def tls_context(verify, cert):
    """An ``ssl`` context from py-consul's ``verify`` (bool or a CA file) and ``cert`` (a file, or (cert, key))."""
    ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        certfile, keyfile = cert if isinstance(cert, tuple) else (cert, None)
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


class KeepAliveClient(consul_base.HTTPClient):
    """py-consul's HTTP client interface (get/put/delete/post) over one ``http.client``
    connection per thread."""

    def __init__(self, host, port, scheme, verify=True, cert=None, timeout=10.0):
        super().__init__(host, port, scheme, verify, cert)
        self.timeout = timeout
        self._local = threading.local()

    @property
    def _conn(self):
        return getattr(self._local, "conn", None)

    @_conn.setter
    def _conn(self, conn):
        self._local.conn = conn

    def _connect(self):
        if self.scheme != "https":
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        ctx = tls_context(self.verify, self.cert)
        return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=ctx)

    def _timeout(self, params):
        params = dict(params or ())
        if "index" not in params:
            return self.timeout
        wait = parse_duration(params.get("wait", "5m"))
        return self.timeout + wait + wait / 16  # a blocking query answers after its wait plus jitter

    def close(self):
        """Close the calling thread's connection (the next request opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _request(self, method, path, params=None, data=None, headers=None, raw=False):
        url = urllib.parse.quote(path, safe="/:")
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = data.encode("utf-8") if isinstance(data, str) else data
        timeout = self._timeout(params)
        for _attempt in range(2):
            reused = self._conn is not None
            if not reused:
                self._conn = self._connect()
            conn = self._conn
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, url, body=body, headers=headers or {})
                resp = conn.getresponse()
                payload = resp.read()
            except _STALE as e:
                self.close()
                if reused:
                    continue  # Consul closed the idle connection: once more on a new one
                raise requests.exceptions.ConnectionError(str(e) or type(e).__name__) from None
            except TimeoutError:
                self.close()
                raise requests.exceptions.Timeout() from None
            except ssl.SSLError as e:
                self.close()
                raise requests.exceptions.SSLError(str(e)) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise requests.exceptions.ConnectionError(str(e) or type(e).__name__) from None
            if resp.will_close:
                self.close()
            return consul_base.Response(resp.status, resp.headers,
                                        payload if raw else payload.decode("utf-8", "replace"))  # fmt: skip
        raise requests.exceptions.ConnectionError("connection closed by Consul twice")  # pragma: no cover

    def get(self, callback, path, params=None, headers=None, raw=False):
        return callback(self._request("GET", path, params, None, headers, raw))

    def put(self, callback, path, params=None, data="", headers=None):
        return callback(self._request("PUT", path, params, data, headers))

    def delete(self, callback, path, params=None, data="", headers=None):
        return callback(self._request("DELETE", path, params, data or None, headers))

    def post(self, callback, path, params=None, data="", headers=None):
        return callback(self._request("POST", path, params, data, headers))


class KeepAliveStore(Store):
    """A :class:`_store.Store` over :class:`KeepAliveClient` (same settings, same errors)."""

    def __init__(self, settings=None, **kwargs):
        super().__init__(settings, **kwargs)
        old = self._consul.http
        self._consul.http = KeepAliveClient(old.host, old.port, old.scheme, old.verify, old.cert,
                                            timeout=self.settings.timeout)  # fmt: skip

    def close(self):
        self._consul.http.close()


def daemon_store(settings):
    """The store a daemon uses: a :class:`KeepAliveStore`, or py-consul's own client where the
    environment holds anything ``requests`` would use (proxies, a CA bundle, a netrc file)."""
    return Store(settings) if requests_env_in_use() else KeepAliveStore(settings)
