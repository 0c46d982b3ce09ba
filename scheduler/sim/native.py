"""An optional native build of the simulator's own event machinery (mypyc).

The scale run (10,000 instances, one simulated hour) spends most of its time in
the simulator's bookkeeping: the event heap, the instance index, snapshots, the
arrivals' random draws and a request's path through ``cluster``. ``build``
compiles exactly those modules (``MODULES``) with mypyc, the compiler that ships
with mypy, from the same sources; the routing and ratio policies
(``pdserve.scheduler.forwarding``, ``decode_choice``, ``ratio``, the controller's
code) are *not* compiled: they run as the same interpreted code the router runs,
so their measured cost per decision is the router's.

    python -m pdserve.scheduler.sim.native build [DIR]   # default build/sim-native
    PDSERVE_SIM_NATIVE=DIR python -m perf.sim_scale ...   # or: sim_scale --native

With ``PDSERVE_SIM_NATIVE`` set, importing ``pdserve.scheduler.sim`` puts the
build first on the package's search path. A build remembers a digest of the
sources it was compiled from (and of the Python and mypyc versions); a build
of other sources is refused with an error, never used silently. A native run
gives the same outcomes as an interpreted one (tested: same requests, events
and times), since both execute the same operations on the same floats.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ENV = "PDSERVE_SIM_NATIVE"
MODULES = ("events", "index", "instance", "arrivals", "cluster", "results")
_SIM = Path(__file__).resolve().parent  # scheduler/sim
_ROOT = _SIM.parents[1]  # the repository
DEFAULT_DIR = _ROOT / "build" / "sim-native"
# the installed package's layout (pyproject's package-dir): staged as one tree for mypyc
_PACKAGE_DIRS = (("pdserve", "backends/pdserve"), ("pdserve/scheduler", "scheduler"),
                 ("pdserve/kvtransfer", "kvtransfer"))
# type-checked for the interpreter that builds (and later loads) the extension
_MYPY_INI = (f"[mypy]\npython_version = {sys.version_info.major}.{sys.version_info.minor}\n"
             "ignore_missing_imports = True\n")


def digest() -> str:
    """What a build depends on: the compiled sources, the interpreter's ABI, mypyc."""
    h = hashlib.sha256()
    try:
        mypyc_version = importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        mypyc_version = "none"
    h.update(f"{sysconfig.get_config_var('EXT_SUFFIX')} {sys.version} {mypyc_version}".encode())
    for name in MODULES:
        h.update(name.encode() + b"\0" + (_SIM / f"{name}.py").read_bytes() + b"\0")
    return h.hexdigest()


def is_current(path: Path) -> bool:
    stamp = path / "DIGEST"
    return stamp.is_file() and stamp.read_text().strip() == digest()


def build(dest: Path = DEFAULT_DIR) -> Path:
    """Compile ``MODULES`` into ``dest`` (replaced as a whole when the build succeeds)."""
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sim-native-", dir=dest.parent) as tmp:
        stage = Path(tmp) / "stage"
        for target, source in _PACKAGE_DIRS:
            shutil.copytree(_ROOT / source, stage / target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        (stage / "mypy.ini").write_text(_MYPY_INI)
        sources = [f"pdserve/scheduler/sim/{m}.py" for m in MODULES]
        proc = subprocess.run([sys.executable, "-m", "mypyc", *sources], cwd=stage,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise RuntimeError("mypyc failed to build the simulator:\n" + "\n".join(tail))
        out = Path(tmp) / "out"
        (out / "modules").mkdir(parents=True)
        for lib in stage.glob("*__mypyc*.so"):  # the shared library every module loads
            shutil.copy2(lib, out / lib.name)
        for name in MODULES:
            found = list((stage / "pdserve/scheduler/sim").glob(f"{name}.*.so"))
            if len(found) != 1:
                raise RuntimeError(f"mypyc left {len(found)} extension files for {name}")
            shutil.copy2(found[0], out / "modules" / found[0].name)
        (out / "DIGEST").write_text(digest() + "\n")
        old = Path(tmp) / "old"
        if dest.exists():
            dest.rename(old)
        out.rename(dest)
    return dest


def activate(path: str | os.PathLike[str], package_path: list[str]) -> None:
    """Put the build at ``path`` first on ``pdserve.scheduler.sim``'s ``__path__``."""
    d = Path(path).resolve()
    if not is_current(d):
        why = "no build there" if not (d / "DIGEST").is_file() else "built from other sources"
        raise ImportError(
            f"{ENV}={path}: {why} (the simulator's sources, Python or mypyc changed since); "
            f"build it with: python -m pdserve.scheduler.sim.native build {path}"
        )
    if str(d) not in sys.path:
        sys.path.append(str(d))  # the shared library: a top-level module of its own name
    modules = str(d / "modules")
    if modules not in package_path:
        package_path.insert(0, modules)


def native_modules() -> list[str]:
    """The simulator modules this process runs from a native build (imported ones)."""
    out = []
    for name in MODULES:
        mod = sys.modules.get(f"pdserve.scheduler.sim.{name}")
        if mod is not None and str(getattr(mod, "__file__", "")).endswith(".so"):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the simulator's modules with mypyc")
    b.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    s = sub.add_parser("status", help="is the build at DIR current?")
    s.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(f"native simulator built in {build(Path(args.dir))}")
        return 0
    current = is_current(Path(args.dir))
    print(f"{args.dir}: {'current' if current else 'missing or stale'}")
    return 0 if current else 1


if __name__ == "__main__":
    raise SystemExit(main())
