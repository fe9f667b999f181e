"""An in-memory stand-in for _store.Store (get/list/txn/ping with Consul's CAS semantics), for unit tests."""

from __future__ import annotations

import threading

from ansible_collections.cerana.platform.plugins.module_utils._store import CasConflict, Entry, Unreachable


class MemoryStore:
    def __init__(self):
        self.data = {}  # key -> (value bytes, modify index)
        self.index = 1
        self.calls = 0
        self.down = False
        self.lock = threading.Lock()

    def _check(self):
        self.calls += 1
        if self.down:
            raise Unreachable("memory://", "connection refused")

    def ping(self):
        self._check()
        return "memory"

    def get(self, key, *, consistent=False):
        with self.lock:
            self._check()
            if key not in self.data:
                return None
            value, idx = self.data[key]
            return Entry(key, value, idx)

    def list(self, prefix="", *, consistent=False):
        with self.lock:
            self._check()
            return [Entry(k, v, i) for k, (v, i) in sorted(self.data.items()) if k.startswith(prefix)]

    def put(self, key, value, *, cas=None):
        op = {"Verb": "set" if cas is None else "cas", "Key": key, "Value": value}
        if cas is not None:
            op["Index"] = cas
        return self.txn([{"KV": op}])[0]

    def txn(self, ops):
        with self.lock:
            self._check()
            for op in ops:
                kv = op["KV"]
                have = self.data.get(kv["Key"], (None, 0))[1]
                if kv["Verb"] in ("cas", "delete-cas", "check-index") and have != kv["Index"]:
                    raise CasConflict(kv["Key"], kv["Index"], None)
            self.index += 1
            out = []
            for op in ops:
                kv = op["KV"]
                if kv["Verb"] in ("set", "cas"):
                    value = kv["Value"]
                    value = value.encode() if isinstance(value, str) else value
                    self.data[kv["Key"]] = (value, self.index)
                    out.append(Entry(kv["Key"], b"", self.index))
                elif kv["Verb"] in ("delete", "delete-cas"):
                    self.data.pop(kv["Key"], None)
            return out
