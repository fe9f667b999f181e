"""A sample app dataset for the lab and the tests: this machine's Python and two tiny services.

:func:`build_python` copies a Python interpreter, its standard library and the shared
libraries they load (found with ``ldd``) into a directory that works as a bwrap root:
``/usr/bin/python3`` runs there with no file from the node (about 35 MB; test suites, idle
and ``__pycache__`` are left out, but the modules the apps import are compiled into the
dataset: about 100 files, 3 MB, which start each service about 0.3 s sooner). :func:`build_sample`
adds the sample bundle's two services: ``/app/backend.py`` (answers with the address it was reached on) and
``/app/front.py`` (forwards ``/`` to ``$BACKEND_URL``; ``/health`` fails while
``/data/unhealthy`` exists). Both listen on ``$PORT``. ``cerana lab sample-dataset DIR``
runs :func:`build_sample`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "__pycache__",
               "site-packages", "dist-packages", "config-3.11-x86_64-linux-gnu"}  # fmt: skip


def _libraries(binaries: list[Path]) -> set[Path]:
    libs: set[Path] = set()
    for chunk in range(0, len(binaries), 200):
        proc = subprocess.run(["ldd", *map(str, binaries[chunk : chunk + 200])], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                libs.add(Path(parts[2]))
            elif parts and parts[0].startswith("/") and "ld-linux" in parts[0]:
                libs.add(Path(parts[0]))
    return libs


def _copy_file(src: Path, root: Path) -> None:
    dest = root / src.resolve().relative_to("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copy2(src.resolve(), dest)
    if src != src.resolve():  # keep the name the binaries ask for (e.g. libc.so.6 -> libc.so.6)
        link = root / src.relative_to("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():  # relative: a dataset may hold no link pointing outside itself
            link.symlink_to(os.path.relpath(dest, link.parent))


def build_python(root: Path, apps: dict[str, str] | None = None, python: str = "/usr/bin/python3") -> Path:
    """Fill ``root`` (created) with ``python``, its stdlib and ``apps`` ({relative path: text}); return it."""
    found = subprocess.run(
        [python, "-c", "import sys, sysconfig; print(sys.executable); print(sysconfig.get_paths()['stdlib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    python_bin, stdlib = Path(found[0]).resolve(), Path(found[1])
    root.mkdir(parents=True, exist_ok=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(python_bin, root / "usr/bin/python3")
    dest_stdlib = root / stdlib.relative_to("/")
    # links are followed: Debian links sitecustomize.py to /etc, outside any dataset
    shutil.copytree(stdlib, dest_stdlib, symlinks=False, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns(*SKIP_STDLIB, "*.pyc"))  # fmt: skip
    binaries = [python_bin, *sorted((stdlib / "lib-dynload").glob("*.so"))]
    for lib in sorted(_libraries(binaries)):
        _copy_file(lib, root)
    # a merged-/usr layout: /lib and /lib64 point into /usr, as on Debian
    for name in ("lib", "lib64"):
        if (root / "usr" / name).is_dir() and not (root / name).exists():
            (root / name).symlink_to(f"usr/{name}")
    for rel, text in (apps or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    if apps:
        compile_imports(python_bin, root, stdlib, dest_stdlib, [root / rel for rel in apps if rel.endswith(".py")])
    return root


# Run by the Python the dataset's was copied from (same version: its bytecode): imports what the
# apps import at their top level, then compiles every stdlib module loaded, into the dataset's
# copy of the stdlib. Hash-based and unchecked: a read-only dataset keeps its sources as they
# are, and a copy of it need not keep their modification times.
_COMPILE = r"""
import ast, importlib.util, os, py_compile, sys
root, stdlib, dest, apps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
for app in apps:
    with open(app) as f:
        tree = ast.parse(f.read(), app)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), app, "exec"), {})
for mod in list(sys.modules.values()):
    source = getattr(mod, "__file__", None) or ""
    if source.endswith(".py") and source.startswith(stdlib + os.sep):
        copy = os.path.join(dest, os.path.relpath(source, stdlib))
        if os.path.isfile(copy):
            py_compile.compile(copy, cfile=importlib.util.cache_from_source(copy),
                               dfile="/" + os.path.relpath(copy, root), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def compile_imports(python: str, root: Path, stdlib: Path, dest: Path, apps: list[Path]) -> None:
    """Bytecode for the stdlib modules that ``apps`` import (``stdlib`` copied to ``dest``), in
    the dataset: its Python cannot write any there (a dataset is read-only), and compiling them
    at every start of a service delays it by a good part of a second."""
    subprocess.run([python, "-I", "-c", _COMPILE, str(root), str(stdlib), str(dest), *map(str, apps)],
                   check=True, capture_output=True, text=True)  # fmt: skip


BACKEND = """\
import http.server, json, os, socket

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"backend": self.connection.getsockname()[0], "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer.request_queue_size = 128  # socketserver's default backlog is 5
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"""


FRONT = """\
import http.server, json, os, urllib.request

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            code, body = (503, b"marked unhealthy") if os.path.exists("/data/unhealthy") else (200, b"ok")
        else:
            with urllib.request.urlopen(os.environ["BACKEND_URL"], timeout=5) as resp:
                backend = json.load(resp)
            code, body = 200, json.dumps({
                "front": self.connection.getsockname()[0], "greeting": os.environ.get("GREETING", ""),
                "backend": backend,
            }).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer.request_queue_size = 128  # socketserver's default backlog is 5
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"""


def build_sample(root: Path, python: str = "/usr/bin/python3") -> Path:
    """The sample dataset: Python plus ``/app/backend.py`` and ``/app/front.py``."""
    return build_python(root, {"app/backend.py": BACKEND, "app/front.py": FRONT}, python)
