"""The sample bundle (``cerana lab sample-dataset``: a front and a backend in Python) on a
deployed platform lab: declaring it, and asking its published port from inside a node."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from typing import Any

from platform_lab import Platform

BUNDLE = "shop"
EXTERNAL = 30080


def controller_play(platform: Platform, tasks: list[dict[str, Any]], name: str = "controller") -> None:
    """Run ``tasks`` on the controller against the lab's Consul (node1's agent, management token)."""
    play = {
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "module_defaults": {"group/cerana.platform.platform": {
            "consul_url": f"http://{platform.ip('node1')}:8500", "consul_token": platform.token}},
        "tasks": tasks,
    }  # fmt: skip
    path = platform.workdir / f"{name}.json"
    path.write_text(json.dumps([play]))
    platform.playbook(path)


def declare(platform: Platform, greeting: str, *, bundle: str = BUNDLE, redundancy: int = 2,
            external: int = EXTERNAL) -> None:  # fmt: skip
    """Declare (or update) the two services and the bundle."""
    controller_play(platform, [
        {"cerana.platform.service": {
            "id": "backend", "dataset": "pyapp", "cmd": ["/usr/bin/python3", "/app/backend.py"],
            "env": {"PORT": "8081"}, "limits": {"cpu": 0.5, "memory": 134217728, "processes": 64},
            "health_checks": [{"id": "tcp", "kind": "tcp", "args": {"port": 8081}, "interval": "1s",
                               "timeout": "1s"}]}},
        {"cerana.platform.service": {
            "id": "front", "dataset": "pyapp", "cmd": ["/usr/bin/python3", "/app/front.py"],
            "env": {"PORT": "8080", "BACKEND_URL": "http://127.0.0.1:8081/"},
            "limits": {"cpu": 0.5, "memory": 134217728, "processes": 64},
            "health_checks": [{"id": "http", "kind": "http", "args": {"port": 8080, "path": "/health"},
                               "interval": "1s", "timeout": "1s"}]}},
        {"cerana.platform.bundle": {
            "id": bundle, "redundancy": redundancy,
            "datasets": [{"name": "data", "type": "rw"}],
            "services": [{"id": "backend"},
                         {"id": "front", "env": {"GREETING": greeting},
                          "datasets": [{"name": "data", "mount_point": "/data"}]}],
            "ports": [{"port": 8080, "public": True, "external_port": external}]}},
    ], "declare")  # fmt: skip


def undeclare(platform: Platform, bundle: str = BUNDLE) -> None:
    controller_play(platform, [{"cerana.platform.bundle": {"id": bundle, "state": "absent"}}], "undeclare")


def get(platform: Platform, via: str, target: str, path: str = "/", port: int = EXTERNAL) -> dict[str, Any]:
    """GET http://<target's address>:<port><path> from inside ``via`` (its python3); {"error"} on failure."""
    code = textwrap.dedent(f"""
        import json, sys, urllib.request
        try:
            with urllib.request.urlopen("http://{platform.ip(target)}:{port}{path}", timeout=5) as r:
                print(r.read().decode())
        except Exception as e:
            print(json.dumps({{"error": str(e)}}))
    """)
    return json.loads(platform.run_in(via, "python3", "-c", code))


def fronts(platform: Platform, via: str, target: str, n: int) -> Counter:
    return Counter(get(platform, via, target).get("front", "error") for _ in range(n))


def fronts_are(platform: Platform, via: str, target: str, wanted: set[str], n: int = 20):
    """A wait_for predicate: the Counter of ``n`` answers if they came from exactly ``wanted``."""

    def check() -> Counter | None:
        seen = fronts(platform, via, target, n)
        return seen if set(seen) == wanted else None

    return check
