"""The bootserver's Consul transport for the event loop, :class:`AsyncTxn`; the lease service's
worker threads use the :class:`_store.Store` (one persistent ``http.client`` connection per
thread). The lease path makes several small Consul requests per
DHCP exchange; through py-consul's ``requests`` session each cost about 1.4 ms of client CPU on
top of Consul's own 0.4 ms, which made the client the bottleneck of the bootserver.

:class:`AsyncTxn` sends transactions from the event loop itself (asyncio streams, one
keep-alive connection per transaction in flight). Worker threads next to a busy event loop
wait for the GIL after every blocking call (up to the 5 ms switch interval each time), which
made a 0.6 ms transaction take several milliseconds under load; on the loop there is no such wait.

A request that fails because a reused keep-alive connection was closed by Consul before it
answered is sent once more on a new connection (as urllib3 does). The bootserver's writes
are compare-and-swap transactions, so a repeated write can at worst lose its CAS and be
retried from a fresh read; it can never grant an address twice.
"""

from __future__ import annotations

import asyncio
import base64
import json

from ansible_collections.cerana.platform.plugins.module_utils._store import (
    TXN_MAX_OPS,
    CasConflict,
    Entry,
    Invalid,
    PermissionDenied,
    StoreError,
    Unreachable,
    parse_address,
    tls_context,
)

__all__ = ["AsyncTxn", "Conflicts"]


class Conflicts(CasConflict):
    """A transaction lost compare-and-swaps: ``keys`` are the keys of *every* failed operation
    (Consul names them all; :class:`CasConflict`'s ``key`` is the first)."""

    def __init__(self, failed):
        first = failed[0] if failed else {}
        super().__init__(first.get("Key", "?"), first.get("Index", 0), None)
        self.keys = frozenset(op.get("Key", "?") for op in failed) or frozenset((self.key,))


async def _read_chunked(reader):
    """The body of a ``Transfer-Encoding: chunked`` answer (Go's net/http sends larger ones so)."""
    parts = []
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip() or b"x", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)  # CRLF after each chunk


class AsyncTxn:
    """``await txn(ops)``: a Consul transaction from the event loop, with :meth:`Store.txn`'s meaning.

    Keys are relative to the settings' prefix, values bytes or str; returns the result entries
    (keys relative again). A failed compare-and-swap raises :class:`CasConflict` naming the key
    of the operation Consul reports; transport failures raise :class:`Unreachable`. Idle
    keep-alive connections are kept for the next call; a call never shares one.
    """

    def __init__(self, settings):
        self.settings = settings
        self.scheme, self.host, self.port = parse_address(settings.address)
        self.address = "%s://%s:%s" % (self.scheme, self.host, self.port)
        prefix = (settings.prefix or "").strip("/")
        self.prefix = prefix + "/" if prefix else ""
        self._tls = None
        if self.scheme == "https":
            verify = settings.validate_certs
            if verify and settings.ca_path:
                verify = settings.ca_path
            cert = (settings.client_cert, settings.client_key) if settings.client_key else settings.client_cert
            self._tls = tls_context(verify, cert)
        self._idle = []  # (reader, writer) ready for the next request
        self._head = "PUT /v1/txn HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n" % (
            self.host,
            self.port,
        )
        if settings.token:
            self._head += "X-Consul-Token: %s\r\n" % settings.token

    async def _connection(self):
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._tls)
        return reader, writer, False

    async def _exchange(self, body):
        request = (self._head + "Content-Length: %d\r\n\r\n" % len(body)).encode("latin-1") + body
        for _attempt in range(2):
            try:
                reader, writer, reused = await self._connection()
            except OSError as e:
                raise Unreachable(self.address, str(e) or type(e).__name__) from None
            try:
                writer.write(request)
                status_line = await reader.readline()
                if not status_line:
                    raise ConnectionResetError("connection closed by Consul")
                status = int(status_line.split(None, 2)[1])
                length, close, chunked = None, False, False
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value.strip())
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                    elif name == "transfer-encoding" and "chunked" in value.lower():
                        chunked = True
                if chunked:
                    payload = await _read_chunked(reader)
                elif length is not None:
                    payload = await reader.readexactly(length)
                else:
                    payload, close = await reader.read(), True
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                writer.close()
                if reused:
                    continue  # Consul closed the idle connection: once more on a new one
                raise Unreachable(self.address, str(e) or type(e).__name__) from None
            except (OSError, ValueError, IndexError) as e:
                writer.close()
                raise Unreachable(self.address, str(e) or type(e).__name__) from None
            except BaseException:
                writer.close()  # cancelled mid-request: the connection's state is unknown
                raise
            if close:
                writer.close()
            else:
                self._idle.append((reader, writer))
            return status, payload
        raise Unreachable(self.address, "connection closed by Consul twice")  # pragma: no cover

    async def __call__(self, ops):
        if not ops:
            return []
        if len(ops) > TXN_MAX_OPS:
            raise Invalid("a transaction takes at most %d operations, got %d" % (TXN_MAX_OPS, len(ops)))
        payload = []
        for op in ops:
            kv = dict(op["KV"])
            kv["Key"] = self.prefix + kv["Key"]
            if "Value" in kv:
                value = kv["Value"]
                kv["Value"] = base64.b64encode(value.encode("utf-8") if isinstance(value, str) else value).decode()
            payload.append({"KV": kv})
        try:
            status, body = await asyncio.wait_for(self._exchange(json.dumps(payload).encode("utf-8")),
                                                  self.settings.timeout)  # fmt: skip
        except TimeoutError:
            raise Unreachable(self.address, "no answer within %ss" % self.settings.timeout) from None
        if status == 403:
            raise PermissionDenied("Consul refused the transaction: permission denied")
        if status in (400, 413):
            raise Invalid("Consul rejected the transaction: %s" % body.decode("utf-8", "replace").strip())
        if status >= 500:
            text = body.decode("utf-8", "replace").strip()
            if "rpc error" in text.lower():
                raise Unreachable(self.address, text)
            raise StoreError("Consul answered %s to the transaction: %s" % (status, text))
        try:
            data = json.loads(body) if body else {}
        except ValueError as e:
            raise StoreError("Consul's answer to the transaction is not JSON: %s" % e) from None
        if status == 409:
            errors = data.get("Errors") or [{}]
            failed = []
            for err in errors:
                idx, what = err.get("OpIndex", 0), err.get("What", "transaction rolled back")
                if "permission denied" in what.lower():
                    raise PermissionDenied("Consul refused the transaction: %s" % what)
                bad = ops[idx]["KV"] if isinstance(idx, int) and 0 <= idx < len(ops) else {}
                if bad.get("Verb") not in ("cas", "delete-cas", "check-index", "check-not-exists"):
                    raise Invalid("transaction rolled back: %s" % what)
                failed.append(bad)
            raise Conflicts(failed)
        if status != 200:
            raise StoreError("Consul answered %s to the transaction" % status)
        out = []
        for result in data.get("Results") or ():
            raw = result.get("KV")
            if not raw:
                continue
            key = raw["Key"]
            out.append(Entry(key=key[len(self.prefix) :] if self.prefix and key.startswith(self.prefix) else key,
                             value=base64.b64decode(raw["Value"]) if raw.get("Value") else b"",
                             modify_index=int(raw.get("ModifyIndex", 0)), create_index=int(raw.get("CreateIndex", 0)),
                             lock_index=int(raw.get("LockIndex", 0)), flags=int(raw.get("Flags", 0)),
                             session=raw.get("Session") or None))  # fmt: skip
        return out

    def close(self):
        for _reader, writer in self._idle:
            writer.close()
        self._idle = []
