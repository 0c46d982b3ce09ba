"""``pdserve serve``: start the real tritonserver shipped by ``nvidia-pytriton``.

The launcher assembles a backend directory in a temp dir::

    <tmp>/backends/
      python/   libtriton_python.so, the backend utils module, the stub
      pdserve/  model.py (a copy of this package's model.py)

and starts ``tritonserver`` in poll mode, bound to loopback unless told
otherwise, in its own process group so every stub it forks goes down with it.

Each stub's IPC pool is a 1 MiB shared-memory region that the Python backend
unlinks only on a clean shutdown: a stub killed (SIGKILL, OOM) or a server
stopped hard leaves ``/dev/shm/<prefix><uuid>`` behind. Every server gets a
prefix of its own (``shm-region-prefix-name``), and ``stop`` removes what is
left under it. The same goes for the Python backend's ``/tmp/python_env_XXXXXX``
directory (a fixed path, made at backend start, removed only by a clean
shutdown): ``stop`` removes the one its server made, if it can tell which.

Why the environment matters: the stub embeds the system libpython of the same
minor version as the running interpreter (pointing it at another build, e.g.
pyenv's via PYTHONHOME, corrupted BYTES tensors here). We hand it our
site-packages through ``PDSERVE_SITE_PACKAGES``; ``model.py`` adds them with
``site.addsitedir`` so the editable-install ``.pth`` hooks run (plain
``PYTHONPATH`` skips those).

Supervision: Triton 2.51's Python backend can abort the whole server when a
stub dies at the wrong moment (``terminate called after throwing an instance
of 'boost::interprocess::lock_exception'``, SIGABRT: the killed stub held a
mutex in the shared IPC region; an open upstream issue, seen here about once
in five SIGKILLs of a streaming decode stub). ``pdserve serve`` therefore
restarts a tritonserver that exits on its own: it cleans up what the dead
group left (stubs, IPC regions, KV arenas, sockets), starts it again on the
same ports and repository, and backs off (1 s, doubling) up to
``--max-restarts`` within ``--restart-window``; past that it exits 1. The
controller sees the instances fail and come back, as after any failure.

Stop: ``stop`` first writes a marker into the runtime dir, waits one router
heartbeat period (``QUIESCE_S``), and only then sends SIGTERM. On SIGTERM
Triton waits for the requests in flight and then unloads every model at once.
A router's heartbeat calls (one per instance) that are still out then never
return (2.51 cannot cancel a BLS call), and tritonserver died with SIGSEGV in
the router's instance finalize. That happened in 2 of the 18 servers of one
test suite run, and in 9 of 10 stops made in the middle of a burst. The routers
send no heartbeat once the marker is there (``config.server_stopping``). With
the marker and the wait, 0 of 10 such stops crashed. Either one alone also
passed the regression test (3 and 2 runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Protocol

from pdserve.errors import Unavailable
from pdserve.kvtransfer.shm import sweep_stale_segments
from pdserve.roles.cpu_quota import sweep_quota_cgroups
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.scheduler.controller.repository import Repository
from pdserve.server.config import (
    POOL_ENV,
    POOL_RESERVE,
    RUNTIME_DIR_ENV,
    STOPPING_MARKER,
    InstanceConfig,
)

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # backends/pdserve
SHM_DIR = Path("/dev/shm")
QUIESCE_S = 0.8  # stop: routers' heartbeats end (a 0.5 s period) before the SIGTERM
# The Python backend's temp dir for execution environments: mkdtemp on this fixed
# template when the backend starts, removed by its finalize only.
PYTHON_ENV_DIR, PYTHON_ENV_GLOB = Path("/tmp"), "python_env_*"
# How long a server with a dead router gets after SIGTERM before SIGKILL (``supervise``).
DEAD_ROUTER_STOP_S = 1.0
# A router's default stream_threads of BLS calls at once, and the reserve for its sends.
DEFAULT_POOL_THREADS = InstanceConfig(name="x", role="prefill").stream_threads + POOL_RESERVE


@dataclass(frozen=True)
class ServerOptions:
    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    poll_secs: int = 5
    ready_timeout_s: float = 300.0
    log_verbose: int = 0
    log_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # The Python backend's thread pool of each model instance (config.POOL_ENV): a
    # router makes at most this many minus POOL_RESERVE BLS calls at once.
    pool_threads: int = DEFAULT_POOL_THREADS

    def __post_init__(self) -> None:
        if self.pool_threads <= POOL_RESERVE:
            raise ValueError(f"pool_threads must be above {POOL_RESERVE}, "
                             f"got {self.pool_threads}")
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {port}")
        if self.poll_secs <= 0:
            raise ValueError(f"poll_secs must be positive, got {self.poll_secs}")
        if self.ready_timeout_s <= 0:
            raise ValueError(f"ready_timeout_s must be positive, got {self.ready_timeout_s}")

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def pytriton_paths() -> tuple[Path, Path]:
    """(tritonserver root, nvidia_pytriton.libs) of the installed nvidia-pytriton."""
    import pytriton

    site = Path(pytriton.__file__).resolve().parent.parent
    return site / "pytriton" / "tritonserver", site / "nvidia_pytriton.libs"


def assemble_backend_dir(dest: Path) -> Path:
    """Lay out python/ and pdserve/ backends under ``dest``; returns the backends dir."""
    triton_root, _ = pytriton_paths()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise Unavailable(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    backends = dest / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True)
    for src in (triton_root / "backends" / "python").iterdir():
        if src.is_file():
            shutil.copy2(src, python_dir / src.name)
    shutil.copy2(stub, python_dir / stub.name)
    pdserve_dir = backends / "pdserve"
    pdserve_dir.mkdir()
    shutil.copy2(PACKAGE_DIR / "model.py", pdserve_dir / "model.py")
    return backends


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and the stubs it forks."""
    _, libs = pytriton_paths()
    env = dict(os.environ)
    # The stub links the system libpython of the same minor version; pointing it
    # at another build of it (e.g. pyenv's, via PYTHONHOME) corrupted BYTES
    # tensors on this machine, so we leave interpreter discovery alone.
    env.pop("PYTHONHOME", None)
    ld = [str(libs)]
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    env["PDSERVE_SITE_PACKAGES"] = os.pathsep.join(site_dirs)
    env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Until no process of the group is left (killed stubs are reaped by init)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return  # the id was reused by someone else's group: ours is gone
        time.sleep(0.05)


def python_env_dirs() -> set[Path]:
    """Every Python backend's temp dir on this machine (any server's)."""
    return set(PYTHON_ENV_DIR.glob(PYTHON_ENV_GLOB))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TritonServer:
    """A running tritonserver; a context manager that ALWAYS stops it."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: object = None
        # Stubs' IPC regions of this server: /dev/shm/<prefix><uuid> (see the module doc)
        self.shm_prefix = f"pdserve_{os.getpid()}_{os.urandom(4).hex()}_"
        # The Python backend's temp dir: those there before the start, and ours once
        # known (the one new dir at ready; none if another server made one too).
        self._env_before: set[Path] | None = None
        self.python_env_dir: Path | None = None

    def command(self, backend_dir: Path) -> list[str]:
        o = self.options
        triton_root, _ = pytriton_paths()
        return [
            str(triton_root / "bin" / "tritonserver"),
            f"--model-repository={Path(o.repository).resolve()}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=poll",
            f"--repository-poll-secs={o.poll_secs}",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            "--allow-metrics=true",
            f"--log-verbose={o.log_verbose}",
            "--exit-timeout-secs=10",
            # "python" for the plain Python backend, "pdserve" for ours built on it
            *(f"--backend-config={b},shm-region-prefix-name={self.shm_prefix}"
              for b in ("python", "pdserve")),
            # Python-based backends take the "python" entry's pool size (a
            # "pdserve" entry is not read for it; checked on 2.51's log).
            f"--backend-config=python,thread-pool-size={o.pool_threads}",
        ]

    def environment(self, runtime_dir: Path) -> dict[str, str]:
        """tritonserver's (and so its stubs') environment."""
        return server_env({RUNTIME_DIR_ENV: str(runtime_dir),
                           POOL_ENV: str(self.options.pool_threads), **self.options.extra_env})

    def start(self) -> TritonServer:
        if not Path(self.options.repository).is_dir():
            raise FileNotFoundError(f"model repository {self.options.repository} is not a dir")
        self._tmp = tempfile.TemporaryDirectory(prefix="pdserve-backend-")
        self._env_before, self.python_env_dir = python_env_dirs(), None
        backend_dir = assemble_backend_dir(Path(self._tmp.name))
        # Routers put their token channel sockets here, so that they go with the
        # server even when a stub is killed and never runs its finalize.
        runtime_dir = Path(self._tmp.name) / "run"
        runtime_dir.mkdir(mode=0o700)
        log = self.options.log_file
        out = open(log, "ab") if log else None  # noqa: SIM115 - closed in stop()
        self._log = out
        self.process = subprocess.Popen(
            self.command(backend_dir),
            env=self.environment(runtime_dir),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # own process group: stubs die with it
        )
        return self

    def model_names(self) -> list[str]:
        req = urllib.request.Request(
            f"http://{self.options.http_url}/v2/repository/index", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return [m["name"] for m in json.loads(resp.read())]

    def is_ready(self) -> bool:
        try:
            url = f"http://{self.options.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Block until every model in the repository is READY; raise on exit/timeout
        (or as soon as ``should_stop()`` is true)."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        expected = {p.name for p in Path(self.options.repository).iterdir() if p.is_dir()}
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise Unavailable(f"tritonserver {describe_exit(self.process.returncode)}")
            if should_stop is not None and should_stop():
                raise Unavailable("stopped while waiting for the models to be ready")
            if self.is_ready():
                with contextlib.suppress(urllib.error.URLError, OSError):
                    req = urllib.request.Request(
                        f"http://{self.options.http_url}/v2/repository/index",
                        data=b"{}",
                        method="POST",
                    )
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        index = json.loads(resp.read())
                    ready = {m["name"] for m in index if m.get("state") == "READY"}
                    if expected <= ready:
                        self._claim_env_dir()
                        return
            time.sleep(0.5)
        raise Unavailable(
            f"models not ready after {self.options.ready_timeout_s:.0f}s "
            f"(expected {sorted(expected)})"
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what is left; remove the temp dir."""
        proc = self.process
        if proc is not None:
            self._quiesce_routers(proc)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
            # Stubs may outlive the server briefly; the whole group goes.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            _wait_group_gone(proc.pid, timeout_s=5.0)
            self.process = None
        self.sweep_shm()
        # A decode's KV arena is unlinked by its own stub on a clean shutdown and
        # swept by the next stub's start after a kill; a stub killed last (or at
        # stop) has no successor: its segment goes now (only dead creators').
        sweep_stale_segments()
        # Stubs with a CPU quota killed without finalize leave empty cgroups.
        sweep_quota_cgroups()
        # A server that did not shut down cleanly leaves the backend's temp dir.
        if self.python_env_dir is not None:
            shutil.rmtree(self.python_env_dir, ignore_errors=True)
        self._env_before = self.python_env_dir = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _quiesce_routers(self, proc: subprocess.Popen[bytes]) -> None:
        """Have the routers stop their heartbeats before Triton unloads the instances
        they ask (``server_stopping``): the marker, then one heartbeat period and
        its answer."""
        if self._tmp is None or proc.poll() is not None:
            return
        runtime = Path(self._tmp.name) / "run"
        with contextlib.suppress(OSError):
            (runtime / STOPPING_MARKER).touch()
            time.sleep(QUIESCE_S)

    def stubs(self) -> dict[str, int]:
        """The Python backend stubs of this server's process group: model -> pid
        (a stub's first argument is <repository>/<model>/<version>/model.py)."""
        if self.process is None:
            return {}
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # pgid: the 5th field after the command's closing parenthesis
            pgid = int(stat[stat.rindex(")") + 2:].split()[2])
            if (pgid == self.process.pid and len(args) > 1
                    and args[0].endswith(b"triton_python_backend_stub")):
                found[Path(args[1].decode(errors="replace")).parent.parent.name] = int(entry.name)
        return found

    def dump_stacks(self, pause_s: float = 0.3) -> dict[str, str]:
        """Every stub's Python threads, as each writes them to the server log on
        SIGUSR1 (``model.py`` registers faulthandler for it): model -> its dump.
        Asked one stub at a time, so the dumps do not interleave; for a server
        that hangs (what is each stub waiting on) before it is stopped."""
        log = self.options.log_file
        if log is None or self.process is None:
            return {}
        dumps: dict[str, str] = {}
        for model, pid in sorted(self.stubs().items()):
            start = log.stat().st_size
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
            time.sleep(pause_s)
            with open(log, "rb") as f:
                f.seek(start)
                dumps[model] = f.read().decode(errors="replace")
        return dumps

    def dead_router(self) -> str | None:
        """A router model of this server whose stub died, as ``"name: error"``;
        None when every router answers its heartbeat, or fails it otherwise (a
        slow answer under load is not a dead stub: only Triton's own "is not
        healthy" verdict counts)."""
        try:
            routers = sorted(Repository(Path(self.options.repository)).routers())
        except Exception as exc:  # a repository mid-edit, or broken by hand
            log.warning("cannot read the routers of %s: %s", self.options.repository, exc)
            return None
        probe = TritonProbeClient(timeout_s=2.0)
        for name in routers:
            result = probe.probe_router(self.options.http_url, name)
            if not result.ok and "is not healthy" in result.error:
                return f"{name}: {result.error}"
        return None

    def _claim_env_dir(self) -> None:
        """Which ``python_env_*`` dir is this server's, asked once it is ready: the
        only one made since its start. With two made (another server started
        meanwhile) it stays unknown and is left alone, as it is when the server
        never got ready: removing another live server's would break it."""
        if self.python_env_dir is not None or self._env_before is None:
            return
        made = python_env_dirs() - self._env_before
        if len(made) == 1:
            self.python_env_dir = made.pop()

    def restart(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Start tritonserver again on the same options (ports, repository) after
        it died: what the dead process group left goes first (``stop``), then a
        fresh start that waits until every model is READY. On failure the server
        is left stopped (``process`` None) and ``Unavailable`` raised."""
        self.stop()
        self._start_ready(should_stop)

    def _start_ready(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Start and wait until every model is READY; stopped again if that fails."""
        self.start()
        try:
            self.wait_ready(should_stop)
        except BaseException:
            self.stop()
            raise

    def shm_regions(self) -> list[Path]:
        """This server's stub IPC regions in /dev/shm (live or left behind)."""
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def sweep_shm(self) -> None:
        """Remove this server's stub IPC regions left by stubs that died without
        unlinking them (call once the server is down)."""
        for path in self.shm_regions():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> TritonServer:
        self._start_ready()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def describe_exit(returncode: int | None) -> str:
    """``subprocess`` return code in words: a negative one is the signal that killed it."""
    if returncode is None:
        return "is not running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


@dataclass(frozen=True)
class RestartPolicy:
    """How ``supervise`` restarts a tritonserver that exited on its own."""

    max_restarts: int = 5  # within window_s; 0: never restart
    window_s: float = 600.0
    backoff_s: float = 1.0  # before the first restart in the window; doubles, capped
    max_backoff_s: float = 30.0
    # A router whose stub died (``TritonServer.dead_router``) on this many checks
    # in a row, one every router_check_s (0: not checked), is restarted with the server.
    router_check_s: float = 1.0
    router_strikes: int = 2

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or not self.window_s > 0 or self.backoff_s < 0 \
                or self.max_backoff_s < self.backoff_s:
            raise ValueError("need max_restarts >= 0, window_s > 0 and "
                             "0 <= backoff_s <= max_backoff_s")
        if self.router_check_s < 0 or self.router_strikes < 1:
            raise ValueError("need router_check_s >= 0 and router_strikes >= 1")

    def delay_s(self, recent: int) -> float:
        """The wait before a restart, ``recent`` restarts already in the window."""
        return min(self.backoff_s * math.pow(2, recent), self.max_backoff_s)


class _Process(Protocol):
    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...


class Supervised(Protocol):
    """What ``supervise`` needs of a server (``TritonServer``, or a test's fake)."""

    options: ServerOptions

    @property
    def process(self) -> _Process | None: ...

    def restart(self, should_stop: Callable[[], bool] | None = None) -> None: ...

    def stop(self, timeout_s: float = 20.0) -> None: ...

    def dead_router(self) -> str | None: ...


def supervise(
    server: Supervised,
    stopping: Callable[[], bool],
    policy: RestartPolicy,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] | None = None,
) -> int:
    """Run until ``stopping()`` (returns 0), restarting tritonserver whenever it
    exits on its own, or stopping and restarting it when a router's stub died;
    1 once it went down more than ``policy.max_restarts`` times within
    ``policy.window_s``. The caller stops the server afterwards.

    Why a dead router takes the whole server down: Triton 2.51 never starts that
    stub again, and never ends the client streams it was serving (they wait
    forever, measured). A reload of the router alone (what the controller does
    where nobody supervises the process) brings new requests back but leaves
    those streams hanging; a restart closes their connections, so every client
    gets an error now."""
    if say is None:
        def say(msg: str) -> None:
            print(f"pdserve serve: {msg}", file=sys.stderr, flush=True)
    restarts: deque[float] = deque()
    while True:
        what = _watch(server, stopping, policy, clock, sleep)
        if stopping():
            return 0
        if what is None:
            what = "tritonserver " + describe_exit(
                server.process.returncode if server.process is not None else None)
        else:
            say(f"{what}: stopping tritonserver (the streams it was serving would never end)")
            # Not gracefully: a dead router's model never unloads, so tritonserver
            # would wait out its whole exit timeout (10 s) with the streams open.
            server.stop(timeout_s=DEAD_ROUTER_STOP_S)
        now = clock()
        while restarts and now - restarts[0] > policy.window_s:
            restarts.popleft()
        if len(restarts) >= policy.max_restarts:
            say(f"{what}; {len(restarts)} restarts in the last "
                f"{policy.window_s:.0f} s already: giving up")
            return 1
        delay = policy.delay_s(len(restarts))
        restarts.append(now)
        say(f"{what}; restarting in {delay:.1f} s (restart {len(restarts)} of "
            f"at most {policy.max_restarts} in {policy.window_s:.0f} s)")
        waited = 0.0
        while waited < delay and not stopping():
            step = min(0.25, delay - waited)
            sleep(step)
            waited += step
        if stopping():
            return 0
        try:
            server.restart(stopping)
        except Unavailable as e:
            say(f"restart failed: {e}")
            continue
        say(f"ready again: HTTP http://{server.options.http_url}  gRPC {server.options.grpc_url}")


def _watch(server: Supervised, stopping: Callable[[], bool], policy: RestartPolicy,
           clock: Callable[[], float], sleep: Callable[[float], None]) -> str | None:
    """Until stopping, the process exits (None) or a router is dead on
    ``policy.router_strikes`` checks in a row (what is wrong with it)."""
    strikes = 0
    due = clock() + policy.router_check_s
    while not stopping() and server.process is not None and server.process.poll() is None:
        sleep(0.5)
        if not policy.router_check_s or clock() < due:
            continue
        due = clock() + policy.router_check_s
        dead = server.dead_router()
        strikes = strikes + 1 if dead is not None else 0
        if dead is not None and strikes >= policy.router_strikes:
            return f"router {dead}"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default="model_repository", type=Path)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--poll-secs", type=int, default=5)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts,
                        help="restart tritonserver when it exits on its own, at most this "
                             "many times within --restart-window (0: exit instead)")
    parser.add_argument("--restart-window", type=float, default=RestartPolicy.window_s,
                        help="seconds over which --max-restarts counts")
    parser.add_argument("--pool-threads", type=int, default=DEFAULT_POOL_THREADS,
                        help="the Python backend's thread pool of each model instance; a "
                             f"router makes at most this many minus {POOL_RESERVE} BLS "
                             f"calls at once (default {DEFAULT_POOL_THREADS})")


def run(args: argparse.Namespace) -> int:
    try:
        options = ServerOptions(
            repository=args.repository,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            poll_secs=args.poll_secs,
            ready_timeout_s=args.ready_timeout,
            log_verbose=args.log_verbose,
            pool_threads=args.pool_threads,
        )
        policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
    except ValueError as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    server = TritonServer(options)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        server.wait_ready(lambda: stopping)
        print(
            f"pdserve ready: HTTP http://{options.http_url}  gRPC {options.grpc_url}  "
            f"metrics {options.metrics_url}",
            flush=True,
        )
        rc = supervise(server, lambda: stopping, policy)
    except Unavailable as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        rc = 1
    finally:
        server.stop()
    return rc

