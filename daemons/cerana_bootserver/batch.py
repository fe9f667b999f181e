"""Many exchanges' lease writes in one Consul transaction.

Under load, many exchanges wait for a compare-and-swap at once. Sent one by one, each
costs a Consul request (an HTTP round trip and a Raft write: about 0.3 ms of client CPU
and 0.35 ms of Consul's here); sent together in one ``/v1/txn`` (up to 64 operations),
a write costs a tenth of that. :class:`Batcher` queues the operations of each exchange
(a *job*) and, whenever fewer than ``in_flight`` transactions are on their way, sends
everything queued that fits into one. Nothing waits for a timer: at a low rate every job
goes alone and at once; the batches grow with the load.

A transaction is all or nothing. When a job's compare-and-swap fails, Consul rolls the
whole transaction back and names every failed operation: those jobs fail with a
:class:`CasConflict` whose ``keys`` are their failed keys (the caller may try another
address, or go the blocking way and read the table), and the others go again at once.
Two jobs never touch the same key in one transaction, nor in two transactions in flight
at once (the later one waits), since the second would fail against the first's write.
Any other error fails every job of the transaction with it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from ansible_collections.cerana.platform.plugins.module_utils._store import TXN_MAX_OPS, CasConflict

log = logging.getLogger(__name__)


class _JobConflict(CasConflict):
    """What a job's future raises when its compare-and-swap lost: ``keys`` are its failed keys."""

    def __init__(self, keys, cause):
        super().__init__(next(iter(sorted(keys))), cause.expected, cause.current)
        self.keys = frozenset(keys)


class _Job:
    __slots__ = ("claim", "future", "keys", "ops", "prepare")

    def __init__(self, ops, future, claim, prepare):
        self.ops = ops
        self.keys = frozenset(op["KV"]["Key"] for op in ops)
        self.future = future
        self.claim = claim
        self.prepare = prepare


class Batcher:
    """``await submit(ops)`` -> the result entries of ``ops`` (Store.txn's), or its exception.

    ``txn(ops)`` is a coroutine function with ``Store.txn``'s meaning (``kvhttp.AsyncTxn``).
    Use from one event loop. ``limit`` bounds the queued jobs: :meth:`full` tells the caller
    to shed new work.
    """

    def __init__(self, txn, *, max_ops=TXN_MAX_OPS, in_flight=2, limit=256):
        self.txn = txn
        self.max_ops = max(1, min(max_ops, TXN_MAX_OPS))
        self.in_flight = max(1, in_flight)
        self.limit = limit
        self.queue = collections.deque()
        self.running = 0
        self.busy_keys = set()
        self.tasks = set()
        # statistics
        self.transactions = 0
        self.jobs_done = 0
        self.conflicts = 0
        self.waited = 0.0  # seconds spent waiting for transactions, summed

    def full(self, claim=False):
        """Whether a new job should be shed: claims (new offers) from half the limit on."""
        return len(self.queue) >= (self.limit // 2 if claim else self.limit)

    def submit(self, ops, *, claim=False, prepare=None):
        """Queue ``ops``; ``prepare()``, when given, is called as the job goes into a transaction and
        returns its operations then (on the same keys): e.g. against a modify index that an earlier
        job of the same key, which this one waited for, has just written."""
        if len(ops) > self.max_ops:
            raise ValueError("a job of %d operations exceeds a transaction (%d)" % (len(ops), self.max_ops))
        future = asyncio.get_running_loop().create_future()
        self.queue.append(_Job(ops, future, claim, prepare))
        self._kick()
        return future

    def _kick(self):
        while self.running < self.in_flight and self.queue:
            batch = self._take()
            if not batch:
                return  # what is queued waits for a key in flight
            self.running += 1
            task = asyncio.ensure_future(self._send(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _take(self):
        batch, ops, keys, rest = [], 0, set(), collections.deque()
        while self.queue:
            job = self.queue.popleft()
            if job.future.done():
                continue  # cancelled
            if ops + len(job.ops) > self.max_ops:
                rest.append(job)
                break
            if job.keys & keys or job.keys & self.busy_keys:
                rest.append(job)  # keeps its place for the next transaction
                continue
            if job.prepare is not None:
                job.ops = job.prepare()
            batch.append(job)
            ops += len(job.ops)
            keys |= job.keys
        rest.extend(self.queue)
        self.queue = rest
        self.busy_keys |= keys
        return batch

    async def _send(self, batch):
        try:
            while batch:
                ops = [op for job in batch for op in job.ops]
                start = time.monotonic()
                try:
                    results = await self.txn(ops)
                except CasConflict as e:
                    self.transactions += 1
                    self.waited += time.monotonic() - start
                    failed = getattr(e, "keys", None) or frozenset((e.key,))
                    losers = [j for j in batch if j.keys & failed]
                    if not losers:
                        raise
                    for job in losers:
                        self.conflicts += 1
                        batch.remove(job)
                        self._finish(job, exc=_JobConflict(job.keys & failed, e))
                    continue  # the others again, at once (nothing of them was written)
                self.transactions += 1
                self.waited += time.monotonic() - start
                by_key = {entry.key: entry for entry in results}
                for job in batch:
                    self._finish(job, result=[by_key[k] for k in job.keys if k in by_key])
                batch = []
        except Exception as e:
            for job in batch:
                self._finish(job, exc=e)
            batch = []
        finally:
            for job in batch:  # cancelled while in flight (the server stops)
                self._finish(job, cancel=True)
            self.running -= 1
            # After the callbacks of the jobs just finished (call_soon keeps the order): a job that
            # waited for one of their keys prepares its operations from what they wrote.
            asyncio.get_running_loop().call_soon(self._kick)

    def _finish(self, job, *, result=None, exc=None, cancel=False):
        self.busy_keys -= job.keys
        if job.future.done():
            return
        self.jobs_done += 1
        if cancel:
            job.future.cancel()
        elif exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
