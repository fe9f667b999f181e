"""The thin DHCP transport: one UDP socket bound to the interface, a worker pool for Consul calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import socket
import time

from cerana_bootserver import dhcp, pxe
from cerana_bootserver import handler as h
from cerana_bootserver.kvhttp import KeepAliveStore
from cerana_bootserver.leasing import LeaseService

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


class Handler:
    """bytes in -> (bytes, address) out, using the pure core and the lease service. Thread-safe."""

    def __init__(self, settings, service):
        self.settings = settings
        self.service = service
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

    def __call__(self, data):
        try:
            packet = dhcp.parse(data)
        except dhcp.CodecError as e:
            log.debug("dropped a malformed datagram: %s", e)
            return None
        got = self.service.config()
        if got is None:
            log.debug("no DHCP configuration yet: ignoring %s", dhcp.describe(packet))
            return None
        cfg, _pool = got
        ctx = h.Context.from_config(self.server_id, cfg, self.boot)
        intent = h.decide(packet, self.server_id, ctx.net)
        if isinstance(intent, h.Ignore):
            log.debug("ignored %s: %s", dhcp.describe(packet), intent.reason)
            return None
        outcome = h.Silent(intent.reason) if isinstance(intent, h.Nak) else self.service.execute(intent)
        reply = h.respond(packet, intent, outcome, ctx)
        if reply is None:
            log.info("%s -> no reply (%s)", dhcp.describe(packet), getattr(outcome, "reason", ""))
            return None
        dest = h.destination(
            packet, reply, server_port=self.settings.port, client_port=self.settings.client_port,
            broadcast=ipaddress.IPv4Address(self.settings.broadcast_address),
        )  # fmt: skip
        log.info("%s -> %s %s to %s:%d", dhcp.describe(packet), dhcp.MESSAGE_TYPES[reply.message_type],
                 reply.yiaddr, dest[0], dest[1])  # fmt: skip
        return dhcp.build(reply), dest


def _is_discover(data):
    """Whether a datagram looks like a DHCPDISCOVER (option 53 first after the magic cookie, as clients send it)."""
    return len(data) > 242 and data[240] == dhcp.MESSAGE_TYPE and data[242] == dhcp.DISCOVER


class _Protocol(asyncio.DatagramProtocol):
    """Hands each datagram to the worker pool; at most ``backlog`` wait or run at once.

    Beyond that, new datagrams are dropped, as a full socket buffer would: under overload an
    unbounded queue makes every answer seconds late, after the client gave up on it, and the
    server then spends all its time on requests nobody waits for. Clients retransmit.
    DISCOVERs are shed first (from half the backlog on): finishing the exchanges already
    offered is worth more than starting new ones.
    """

    def __init__(self, handle, executor, backlog=64):
        self.handle = handle
        self.executor = executor
        self.backlog = backlog
        self.transport = None
        self.tasks = set()
        self.dropped = 0
        self._reported = 0.0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        limit = (self.backlog + 1) // 2 if _is_discover(data) else self.backlog
        if len(self.tasks) >= limit:
            self.dropped += 1
            now = time.monotonic()
            if now - self._reported >= 10:
                self._reported = now
                log.warning("overloaded: %d datagrams waiting, dropping new ones (%d so far)", len(self.tasks),
                            self.dropped)  # fmt: skip
            return
        task = asyncio.ensure_future(self._process(data))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _process(self, data):
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self.executor, self.handle, data)
        except Exception:
            log.exception("unexpected error while handling a datagram")
            return
        if out is not None and self.transport is not None:
            payload, dest = out
            try:
                self.transport.sendto(payload, dest)
            except OSError as e:
                log.warning("cannot send to %s:%d: %s", dest[0], dest[1], e)

    def error_received(self, exc):
        log.debug("socket error: %s", exc)


async def serve(settings, stop, *, service=None, ready=None, sock=None):
    """Run until ``stop`` (an asyncio.Event) is set. ``ready`` (asyncio.Event) is set once listening.

    ``sock`` is an already bound socket (tests); by default one is opened from the settings.
    """
    if service is None:
        service = LeaseService(
            lambda: KeepAliveStore(settings.consul),
            server_id=settings.server_address, pool=settings.pool, offer_hold=settings.offer_hold,
            decline_hold=settings.decline_hold, skew=settings.clock_skew, max_probes=settings.max_probes,
            config_refresh=settings.config_refresh,
        )  # fmt: skip
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="bootserver-kv")
    if sock is None:
        sock = open_socket(settings.interface, settings.bind_address, settings.port)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _Protocol(Handler(settings, service), executor, settings.backlog), sock=sock
    )
    log.info(
        "DHCP server %s listening on %s:%d (interface %s), leases in Consul %s under %s/%s",
        settings.server_address, settings.bind_address, sock.getsockname()[1], settings.interface,
        settings.consul.address, settings.consul.prefix, settings.pool,
    )  # fmt: skip
    if ready is not None:
        ready.set()
    announced = None
    try:
        while not stop.is_set():
            await loop.run_in_executor(executor, service.tick)
            have = service.config() is not None
            if have != announced:
                if not have:
                    log.warning("no DHCP configuration at dhcp/config yet: not answering until there is one")
                announced = have
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.2, min(5.0, settings.config_refresh)))
            except TimeoutError:
                pass
    finally:
        transport.close()
        for task in list(protocol.tasks):
            task.cancel()
        executor.shutdown(wait=False, cancel_futures=True)
        log.info("DHCP server stopped")
