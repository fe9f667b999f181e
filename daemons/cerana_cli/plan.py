"""``cerana plan``: what the cluster tick would change, like ``terraform plan``.

Reads the cluster's state from Consul (two requests, see ``_clusterstate.read_state``),
runs the planner the cluster tick uses and prints its text (``--json``: the plan as JSON).
Exit status, as ``terraform plan -detailed-exitcode``: 0 nothing to do, 2 changes pending
(including updates deferred by the rolling rule), 1 an error (one line on stderr, no
traceback). Problems (bad declarations) are part of the output, not errors.

Consul is reached as by the ``consul`` CLI and the daemons: ``CONSUL_HTTP_ADDR``,
``CONSUL_HTTP_TOKEN`` (no flag: it would show in ``ps``), ``CONSUL_HTTP_SSL``,
``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``
and ``CERANA_KV_PREFIX``; ``--consul-address``, ``--consul-timeout`` and ``--kv-prefix``
override them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cerana_cli.consul_flags import add_consul_flags, seconds, store_from_args

EXIT_CLEAN, EXIT_ERROR, EXIT_PENDING = 0, 1, 2


class PlanError(Exception):
    """An expected failure: one line on stderr, exit status 1."""


def compute(args: argparse.Namespace):
    """The Plan (restricted to ``--node`` when given) from the Consul the arguments name."""
    from ansible_collections.cerana.platform.plugins.module_utils import _planner
    from ansible_collections.cerana.platform.plugins.module_utils._clusterstate import read_state
    from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
    from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError

    try:
        store = store_from_args(args)
        state = read_state(Objects(store), time.time())
    except StoreError as e:
        raise PlanError(str(e)) from None
    except ValueError as e:  # a malformed address or setting
        raise PlanError("bad Consul setting: %s" % e) from None
    plan = _planner.plan(state, max_unavailable=args.max_unavailable, grace=args.grace)
    if args.node:
        found = [n for n, o in sorted(state.nodes.items()) if args.node in (n, o.hostname)]
        if not found:
            live = ", ".join("%s (%s)" % (n, o.hostname) for n, o in sorted(state.nodes.items())) or "none"
            raise PlanError("--node %s is not a live node (live nodes: %s)" % (args.node, live))
        plan = plan.only_node(found[0])
    return plan


def run(args: argparse.Namespace) -> int:
    from ansible_collections.cerana.platform.plugins.module_utils import _planner

    try:
        plan = compute(args)
    except PlanError as e:
        print("cerana plan: %s" % e, file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
    else:
        sys.stdout.write(_planner.render_text(plan))
    return EXIT_PENDING if plan.pending() else EXIT_CLEAN


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1, got %d" % n)
    return n


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``plan`` command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "plan",
        help="show what the cluster tick would change (exit 0: nothing, 2: changes pending, 1: error)",
        description=(
            "Show what the cluster tick would change: per node, bundles to start (+), update (~), defer (.) "
            "or stop (-) and dataset copies to add or remove, then problems and a summary. Exit status: 0 "
            "nothing to do, 2 changes pending, 1 error. Consul from CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, "
            "CONSUL_CACERT, ... and CERANA_KV_PREFIX, as the consul CLI and the daemons."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--node", metavar="NODE", help="only this node's part (id or hostname)")
    parser.add_argument(
        "--max-unavailable",
        type=_positive_int,
        default=1,
        metavar="N",
        help="replicas of one bundle that may be down for an update at once (default: 1)",
    )
    parser.add_argument(
        "--grace",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="seconds after an apply before a bundle without heartbeat is applied again (default: 10)",
    )
    add_consul_flags(parser)
    parser.set_defaults(func=run)
    return parser
