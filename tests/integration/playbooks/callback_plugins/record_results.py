# Test-only callback: append every task result, as one JSON line, to $CERANA_TEST_RECORD.
# The integration tests parse that file instead of scraping the screen output.
from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: record_results
type: aggregate
short_description: Write each task result as a JSON line to $CERANA_TEST_RECORD (tests only)
description: Used by tests/integration/test_modules.py.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record_results"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, status, result):
        path = os.environ.get("CERANA_TEST_RECORD")
        if not path:
            return
        line = {
            "task": result.task_name or result._task.get_name(),
            "host": result._host.get_name(),
            "status": status,
            "result": result.result,
        }
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")

    def v2_runner_on_ok(self, result):
        self._record("ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record("failed", result)

    def v2_runner_on_skipped(self, result):
        self._record("skipped", result)

    def v2_runner_retry(self, result):
        self._record("retry", result)
