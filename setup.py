"""Everything lives in pyproject.toml except the editable-install strategy.

Ansible's collection loader finds collections by looking for an ``ansible_collections``
directory in every ``sys.path`` entry; it ignores import hooks. So ``pip install -e .``
must put ``collections/`` itself (and ``daemons/``) on ``sys.path`` with a static .pth
file. setuptools only chooses that strategy for a single package root, and picks an import
hook for two roots, so editable_wheel's choice is overridden here ("strict" mode is kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

ROOTS = ("daemons", "collections")


class _StaticPth:
    """Editable strategy: one .pth file listing the package roots."""

    def __init__(self, name: str, roots: list[Path]) -> None:
        self.name = name
        self.roots = roots

    def __call__(self, wheel: Any, files: list[str], mapping: dict[str, str]) -> None:
        entries = "".join(f"{root.resolve()}\n" for root in self.roots)
        wheel.writestr(f"__editable__.{self.name}.pth", entries.encode())

    def __enter__(self) -> _StaticPth:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class EditableWheel(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):  # type: ignore[override]
        if str(self.mode or "").lower() == "strict":
            return super()._select_strategy(name, tag, build_lib)
        return _StaticPth(name, [Path(self.project_dir, root) for root in ROOTS])


setup(cmdclass={"editable_wheel": EditableWheel})
