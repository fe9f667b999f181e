"""The DHCP transport: one UDP socket bound to the interface, the owner rule, batched writes, a worker pool.

Per datagram, on the event loop: a DISCOVER whose MAC another live bootserver owns is
dropped before it is parsed (``peers.py``); the rest is parsed and decided, and what the
server's own state answers is answered at once (``LeaseService.fast``). An exchange that
needs one transaction (an ACK against a known lease, a new MAC's first claim) queues it on
the :class:`batch.Batcher`, which sends the queued ones together; the reply goes out when
its transaction returns. Everything else, and every transaction that lost its
compare-and-swap, runs the blocking way (``LeaseService.execute``) on the worker pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import socket
import time

from ansible_collections.cerana.platform.plugins.module_utils._store import CasConflict, Store, StoreError
from cerana_bootserver import dhcp, peers, pxe
from cerana_bootserver import handler as h
from cerana_bootserver.batch import Batcher
from cerana_bootserver.kvhttp import AsyncTxn
from cerana_bootserver.leasing import IN_FLIGHT, Commit, LeaseService

log = logging.getLogger(__name__)

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def open_socket(interface, bind_address="0.0.0.0", port=67):
    """A UDP socket on ``port`` that only sees ``interface`` and may broadcast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode() + b"\0")
        sock.bind((bind_address, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Slow:
    """:meth:`Handler.fast` could not answer: run :meth:`Handler.finish` on a worker thread."""

    __slots__ = ("admitted", "ctx", "data", "intent", "packet")

    def __init__(self, packet, intent, ctx, data=None, admitted=False):
        self.packet, self.intent, self.ctx, self.data, self.admitted = packet, intent, ctx, data, admitted


class Pending(Slow):
    """:meth:`Handler.fast` needs ``commit`` (a :class:`leasing.Commit`) written first."""

    __slots__ = ("commit",)

    def __init__(self, packet, intent, ctx, commit):
        super().__init__(packet, intent, ctx)
        self.commit = commit


def _gated(intent):
    """The requests only the MAC's owner answers: DISCOVER, and INIT-REBOOT (broadcast, no server id)."""
    return isinstance(intent, h.Offer) or (isinstance(intent, h.Ack) and intent.kind == "init-reboot")


class Handler:
    """bytes in -> (bytes, address) out, using the pure core and the lease service. Thread-safe.

    ``gate`` (a :class:`peers.Gate`) makes it answer DISCOVER and INIT-REBOOT only for the
    MACs this server owns (or whose clients have been trying for a while); None: all.
    """

    def __init__(self, settings, service, gate=None):
        self.settings = settings
        self.service = service
        self.gate = gate
        self.server_id = ipaddress.IPv4Address(settings.server_address)
        url = (
            settings.ipxe_script_url.replace("{server}", settings.server_address) if settings.ipxe_script_url else None
        )
        self.boot = h.Boot(
            next_server=ipaddress.IPv4Address(settings.next_server) if settings.next_server else None,
            bios_file=settings.bios_boot_file or None,
            efi_file=settings.efi_boot_file or None,
            ipxe_url=url,
            http_base=pxe.http_base(settings.server_address, settings.http_port),
        )
        self.broadcast = ipaddress.IPv4Address(settings.broadcast_address)
        self._ctx = (None, None)  # (DHCPConfig, Context of it)

    def context(self, cfg):
        known, ctx = self._ctx
        if known is not cfg:
            ctx = h.Context.from_config(self.server_id, cfg, self.boot)
            self._ctx = (cfg, ctx)
        return ctx

    def _parse(self, data):
        try:
            return dhcp.parse(data)
        except dhcp.CodecError as e:
            log.debug("dropped a malformed datagram: %s", e)
            return None

    def _intent(self, packet, cfg, *, admitted=False):
        """(intent or None when nothing is to be done, Context)."""
        ctx = self.context(cfg)
        intent = h.decide(packet, self.server_id, ctx.net)
        if isinstance(intent, h.Ignore):
            log.debug("ignored %s: %s", dhcp.describe(packet), intent.reason)
            return None, ctx
        gated = self.gate is not None and not admitted and _gated(intent)
        if gated and not self.gate.admit(intent.mac, packet.xid, packet.secs):
            log.debug("%s: left to server %s", dhcp.describe(packet), self.gate.owner(intent.mac))
            return None, ctx
        return intent, ctx

    def __call__(self, data, *, admitted=False):
        """The blocking way for any datagram (worker thread)."""
        packet = self._parse(data)
        if packet is None:
            return None
        got = self.service.config()
        if got is None:
            log.debug("no DHCP configuration yet: ignoring %s", dhcp.describe(packet))
            return None
        intent, ctx = self._intent(packet, got[0], admitted=admitted)
        if intent is None:
            return None
        return self.finish(packet, intent, ctx)

    def finish(self, packet, intent, ctx):
        """Execute ``intent`` (blocking) and build the reply."""
        outcome = h.Silent(intent.reason) if isinstance(intent, h.Nak) else self.service.execute(intent)
        return self.reply(packet, intent, outcome, ctx)

    def fast(self, data, *, admitted=False):
        """The non-blocking way (event loop): None (nothing to send), (bytes, address), or a
        :class:`Slow` or :class:`Pending` for the caller to carry on. ``admitted``: the owner rule
        was applied to this datagram already."""
        packet = self._parse(data)
        if packet is None:
            return None
        got = self.service.cached_config()
        if got is None:
            return Slow(packet, None, None, data, admitted)
        intent, ctx = self._intent(packet, got[0], admitted=admitted)
        if intent is None:
            return None
        if isinstance(intent, h.Nak):
            return self.reply(packet, intent, h.Silent(intent.reason), ctx)
        outcome = self.service.fast(intent)
        if outcome is None:
            return Slow(packet, intent, ctx)
        if isinstance(outcome, Commit):
            return Pending(packet, intent, ctx, outcome)
        return self.reply(packet, intent, outcome, ctx)

    def carry_on(self, slow):
        """The blocking rest of a :class:`Slow` (worker thread)."""
        if slow.intent is None:  # no configuration was cached: the whole way
            return self(slow.data, admitted=slow.admitted)
        return self.finish(slow.packet, slow.intent, slow.ctx)

    def reply(self, packet, intent, outcome, ctx):
        reply = h.respond(packet, intent, outcome, ctx)
        if reply is None:
            if isinstance(outcome, h.Silent) and (isinstance(intent, h.ReleaseOffer) or outcome.reason == IN_FLIGHT):
                log.debug("%s -> no reply (%s)", dhcp.describe(packet), outcome.reason)
            else:
                log.info("%s -> no reply (%s)", dhcp.describe(packet), getattr(outcome, "reason", ""))
            return None
        dest = h.destination(
            packet, reply, server_port=self.settings.port, client_port=self.settings.client_port,
            broadcast=self.broadcast,
        )  # fmt: skip
        log.info("%s -> %s %s to %s:%d", dhcp.describe(packet), dhcp.MESSAGE_TYPES[reply.message_type],
                 reply.yiaddr, dest[0], dest[1])  # fmt: skip
        return dhcp.build(reply), dest


def _is_discover(data):
    """Whether a datagram looks like a DHCPDISCOVER (option 53 first after the magic cookie, as clients send it)."""
    return len(data) > 242 and data[240] == dhcp.MESSAGE_TYPE and data[242] == dhcp.DISCOVER


def _chosen_server(data):
    """The server identifier (option 54, 4 raw octets) of a datagram that looks like a DHCPREQUEST
    (option 53 first), found by a scan of the options without parsing them; None otherwise, and
    when options are overloaded into ``file``/``sname`` (option 52): the parser decides those."""
    if not (len(data) > 242 and data[240] == dhcp.MESSAGE_TYPE and data[242] == dhcp.REQUEST):
        return None
    i, n, found = 243, len(data), None
    while i < n:
        code = data[i]
        if code == dhcp.END:
            break
        if code == dhcp.PAD:
            i += 1
            continue
        if i + 1 >= n or code == dhcp.OVERLOAD:
            return None
        length = data[i + 1]
        if code == dhcp.SERVER_ID:
            if length != 4 or found is not None:
                return None  # malformed or repeated (RFC 3396): the parser's turn
            found = data[i + 2 : i + 6]
        i += 2 + length
    return found


DRAIN = 256  # datagrams read from the socket per wake-up, at most
DISCOVER_BUDGET = 16  # DISCOVERs handled per wake-up, at most (the newest; see _Protocol)


class _Protocol(asyncio.DatagramProtocol):
    """Answers on the event loop what needs no blocking call, batches single writes, and hands the
    rest to the worker pool; at most ``backlog`` datagrams wait for or run on the pool at once.

    Beyond that, new datagrams are dropped, as a full socket buffer would: under overload an
    unbounded queue makes every answer seconds late, after the client gave up on it, and the
    server then spends all its time on requests nobody waits for. Clients retransmit.
    DISCOVERs are shed first (from half the backlog on): finishing the exchanges already
    offered is worth more than starting new ones. The batcher's queue is bounded the same way.

    :meth:`attach` reads the socket itself instead (asyncio's datagram transport reads one
    datagram per turn of the loop): at each wake-up everything queued, up to ``DRAIN``; the
    requests that finish exchanges first, then at most ``DISCOVER_BUDGET`` DISCOVERs, the
    newest (older ones' clients may have given up). Under overload the socket buffer would
    otherwise overflow and the kernel drop REQUESTs as often as DISCOVERs, wasting the work
    of every OFFER whose REQUEST it dropped. Below overload a wake-up finds one or two
    datagrams and nothing is shed.

    ``handle`` (bytes -> reply) is the blocking way for everything when there is no ``handler``
    (a :class:`Handler`, whose non-blocking way is then tried first).
    """

    def __init__(self, handle, executor, backlog=64, *, handler=None, batcher=None, gate=None):
        self.handle = handle
        self.handler = handler
        self.executor = executor
        self.backlog = backlog
        self.batcher = batcher
        self.gate = gate
        self.transport = None
        self.sock = None
        self.tasks = set()
        self.dropped = 0
        self.shed = 0  # DISCOVERs beyond the budget of a wake-up
        self.received = 0
        self.slow = 0  # datagrams handed to the worker pool
        self._reported = 0.0
        self._last = {}

    def stats(self):
        """Counters since the start (for the periodic log line)."""
        out = {"datagrams": self.received, "shed": self.shed, "dropped": self.dropped, "blocking": self.slow}
        if self.gate is not None:
            out.update(left_to_peers=self.gate.passed, taken_over=self.gate.taken_over)
        if self.batcher is not None:
            out.update(transactions=self.batcher.transactions, batched=self.batcher.jobs_done,
                       conflicts=self.batcher.conflicts, consul_ms=int(self.batcher.waited * 1000))  # fmt: skip
        if self.handler is not None:
            out.update(self.handler.service.counts)
        return out

    def report(self):
        """Log what changed since the last report (INFO, one line), when anything did."""
        now = self.stats()
        delta = {k: v - self._last.get(k, 0) for k, v in now.items() if v - self._last.get(k, 0) or k == "datagrams"}
        self._last = now
        if delta["datagrams"]:
            log.info("since the last report: %s", ", ".join("%s %d" % kv for kv in delta.items()))

    def connection_made(self, transport):
        self.transport = transport

    def attach(self, loop, sock):
        """Read and write ``sock`` (non-blocking) directly from ``loop``."""
        self.sock = sock
        loop.add_reader(sock.fileno(), self._readable)

    def detach(self, loop):
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.sock = None

    def _readable(self):
        sock, got = self.sock, []
        if sock is None:
            return
        for _ in range(DRAIN):
            try:
                got.append(sock.recvfrom(4096))
                self.received += 1
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("socket error: %s", e)
                break
        discovers = []
        for data, addr in got:
            if _is_discover(data):
                discovers.append((data, addr))
            else:
                self.datagram_received(data, addr)
        if not discovers:
            return
        mine = [d for d in discovers if self._admit(d[0])]
        budget = DISCOVER_BUDGET
        if self.batcher is not None and len(self.batcher.queue) >= self.batcher.max_ops:
            budget = 0  # the writes of the exchanges under way are behind: finish those first
        if len(mine) > budget:
            self.shed += len(mine) - budget
            mine = mine[len(mine) - budget :]
        for data, addr in mine:
            self._received(data, addr, True)

    def _admit(self, data):
        if self.gate is None:
            return True
        xid, secs = int.from_bytes(data[4:8], "big"), int.from_bytes(data[8:10], "big")
        return self.gate.admit(peers.mac_text(data[28:34]), xid, secs)

    def _overloaded(self, waiting, limit):
        self.dropped += 1
        now = time.monotonic()
        if now - self._reported >= 10:
            self._reported = now
            log.warning("overloaded: %d requests waiting, dropping new ones (%d so far)", waiting, self.dropped)
        return None

    def datagram_received(self, data, addr):
        discover = _is_discover(data)
        if discover and not self._admit(data):
            return None  # another live server owns this MAC
        if not discover and self.handler is not None and self._elsewhere(data):
            return None
        return self._received(data, addr, discover)

    def _elsewhere(self, data):
        """A REQUEST that chose another server, from a client this server offered nothing: nothing to
        do (most REQUESTs another server's clients broadcast), decided without parsing it."""
        chosen = _chosen_server(data)
        if chosen is None or chosen == self.handler.server_id.packed:
            return False
        return not self.handler.service.offered(peers.mac_text(data[28:34]))

    def _received(self, data, addr, discover):
        if self.handler is None:
            return self._blocking(self.handle, data, discover)
        try:
            got = self.handler.fast(data, admitted=discover)
        except Exception:
            log.exception("unexpected error while handling a datagram")
            return None
        if got is None:
            return None
        if isinstance(got, Pending) and self.batcher is not None:
            if self.batcher.full(got.commit.claim):
                self.handler.service.abandon(got.intent)
                return self._overloaded(len(self.batcher.queue), self.batcher.limit)
            future = self.batcher.submit(got.commit.ops, claim=got.commit.claim, prepare=got.commit.prepare)
            future.add_done_callback(lambda f, got=got: self._committed(got, f))
            return None
        if isinstance(got, Slow):
            return self._blocking(self.handler.carry_on, got, discover)
        return self._send(got)

    def _blocking(self, fn, arg, discover):
        limit = (self.backlog + 1) // 2 if discover else self.backlog
        if len(self.tasks) >= limit:
            return self._overloaded(len(self.tasks), limit)
        self.slow += 1
        task = asyncio.ensure_future(self._process(fn, arg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return None

    def _committed(self, got, future):
        if future.cancelled():
            return
        err = future.exception()
        try:
            if err is None:
                outcome = got.commit.done(future.result())
            elif isinstance(err, CasConflict):
                # somebody else wrote first: another address to claim, or read the table the blocking way
                retry = got.commit.failed(getattr(err, "keys", None) or frozenset((err.key,)))
                if retry is not None:
                    got.commit = retry
                    future = self.batcher.submit(retry.ops, claim=retry.claim, prepare=retry.prepare)
                    future.add_done_callback(lambda f, got=got: self._committed(got, f))
                    return
                outcome = None
            elif isinstance(err, StoreError):
                outcome = self.handler.service.after_failure(got.intent, err)
            else:
                log.error("unexpected error while writing a lease: %r", err)
                self.handler.service.abandon(got.intent)
                return
            if outcome is None:
                self._blocking(self.handler.carry_on, got, False)
                return
            out = self.handler.reply(got.packet, got.intent, outcome, got.ctx)
        except Exception:
            log.exception("unexpected error while handling a datagram")
            return
        self._send(out)

    async def _process(self, fn, arg):
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self.executor, fn, arg)
        except Exception:
            log.exception("unexpected error while handling a datagram")
            return
        self._send(out)

    def _send(self, out):
        if out is None:
            return
        payload, dest = out
        try:
            if self.sock is not None:
                self.sock.sendto(payload, dest)
            elif self.transport is not None:
                self.transport.sendto(payload, dest)
        except BlockingIOError:
            self.dropped += 1  # the send buffer is full: as if the network lost it
        except OSError as e:
            log.warning("cannot send to %s:%d: %s", dest[0], dest[1], e)

    def error_received(self, exc):
        log.debug("socket error: %s", exc)


async def serve(settings, stop, *, service=None, ready=None, sock=None, txn=None):
    """Run until ``stop`` (an asyncio.Event) is set. ``ready`` (asyncio.Event) is set once listening.

    ``sock`` is an already bound socket (tests); by default one is opened from the settings.
    ``txn`` (a coroutine function like :class:`kvhttp.AsyncTxn`) sends the batched transactions;
    by default one over the Consul settings. Tests with their own ``service`` give one over its store.
    """
    if service is None:
        service = LeaseService(
            lambda: Store(settings.consul),
            server_id=settings.server_address, pool=settings.pool, offer_hold=settings.offer_hold,
            decline_hold=settings.decline_hold, skew=settings.clock_skew, max_probes=settings.max_probes,
            config_refresh=settings.config_refresh,
        )  # fmt: skip
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="bootserver-kv")
    gate = heart = None
    if settings.peer_interval > 0:
        gate = peers.Gate(settings.server_address, fallback=settings.peer_fallback)
        heart = peers.Peers(gate, pool=settings.pool, ttl=settings.peer_ttl)
    if txn is None:
        txn = AsyncTxn(settings.consul)
    batcher = Batcher(txn, max_ops=settings.batch_ops, in_flight=2, limit=4 * settings.backlog)
    if sock is None:
        sock = open_socket(settings.interface, settings.bind_address, settings.port)
    service.gate = gate
    handler = Handler(settings, service, gate)
    protocol = _Protocol(handler, executor, settings.backlog, handler=handler, batcher=batcher, gate=gate)
    protocol.attach(loop, sock)
    beating = None
    if heart is not None:
        await _beat(loop, executor, heart, service)
        beating = asyncio.ensure_future(_heartbeat(loop, executor, heart, service, stop, settings.peer_interval))
    log.info(
        "DHCP server %s listening on %s:%d (interface %s), leases in Consul %s under %s/%s",
        settings.server_address, settings.bind_address, sock.getsockname()[1], settings.interface,
        settings.consul.address, settings.consul.prefix, settings.pool,
    )  # fmt: skip
    if ready is not None:
        ready.set()
    announced = None
    reported = time.monotonic()
    try:
        while not stop.is_set():
            if time.monotonic() - reported >= settings.stats_interval > 0:
                reported = time.monotonic()
                protocol.report()
            await loop.run_in_executor(executor, service.tick)
            have = service.cached_config() is not None
            if have != announced:
                if not have:
                    log.warning("no DHCP configuration at dhcp/config yet: not answering until there is one")
                announced = have
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.2, min(5.0, settings.config_refresh)))
            except TimeoutError:
                pass
    finally:
        protocol.detach(loop)
        sock.close()
        if beating is not None:
            beating.cancel()
        for task in [*protocol.tasks, *batcher.tasks]:
            task.cancel()
        if heart is not None:
            try:  # the peers take this server's MACs over at their next beat, not after its heartbeat expired
                await asyncio.wait_for(loop.run_in_executor(executor, lambda: heart.leave(service.leases().store)), 3)
            except (StoreError, TimeoutError) as e:
                log.debug("could not delete this server's heartbeat: %s", e)
        executor.shutdown(wait=False, cancel_futures=True)
        if isinstance(txn, AsyncTxn):
            txn.close()
        protocol.report()
        log.info("DHCP server stopped")


async def _beat(loop, executor, heart, service):
    try:
        changed = await loop.run_in_executor(executor, lambda: heart.beat(service.leases().store))
    except StoreError as e:
        if heart.failing is None:
            log.warning("cannot write this server's heartbeat (%s): keeping the last live set of bootservers %s",
                        e, ", ".join(heart.gate.live))  # fmt: skip
        heart.failing = e
        return
    if heart.failing is not None:
        log.info("heartbeat written again")
        heart.failing = None
    if changed:
        service.forget_trusted()


async def _heartbeat(loop, executor, heart, service, stop, interval):
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
        if not stop.is_set():
            await _beat(loop, executor, heart, service)
