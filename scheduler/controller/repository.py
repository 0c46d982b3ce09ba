"""The deployment as the model repository holds it, and atomic edits of it.

Triton polls the repository; every edit here must look instantaneous to it.
A model directory is never edited in place: it is copied into a staging dir
next to the repository, changed there, and then swapped with the live one in
one ``renameat2(RENAME_EXCHANGE)`` call, so a poll sees either the old
complete directory or the new complete one::

    <parent>/<repo>/prefill_0/         live        --+  exchange (atomic)
    <parent>/.<repo>.staging/prefill_0.<id>/ new   --+  then rm the old copy

New models are built in staging and renamed into place (the name appears with
its config complete); removed ones are renamed out first, then deleted.

Reloads: Triton (poll mode) reloads a model with a fresh stub when a
``parameters`` value changes and ignores whitespace-only changes, so every
edit that must restart the instance bumps the ``generation`` parameter.
Every edit is logged (logger and an optional JSON-lines file) with its reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from google.protobuf import text_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2

from pdserve.errors import ErrorCode, InvalidArgument, PdserveError
from pdserve.server.config import InstanceConfig

log = logging.getLogger(__name__)

GENERATION_KEY = "generation"
MODEL_KEY = "model"
SWITCHABLE_ROLES = ("prefill", "decode")
INSTANCE_ROLES = ("prefill", "decode", "aggregated")
DEFAULT_MODEL = str(InstanceConfig.__dataclass_fields__["model"].default)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class RepositoryError(PdserveError):
    """The repository cannot be read or an edit cannot be applied."""


class NotFound(RepositoryError):
    """No such model (or repository)."""

    code: ClassVar[ErrorCode] = "NOT_FOUND"


@dataclass(frozen=True)
class ModelEntry:
    """One model directory: its name, ``parameters`` and version folders."""

    name: str
    params: Mapping[str, str]
    versions: tuple[int, ...]

    @property
    def role(self) -> str:
        return self.params.get("role", "")

    @property
    def scenario(self) -> str:
        return self.params.get("scenario", "default")

    @property
    def model(self) -> str:
        """The weights: the ``model`` parameter, or the serving side's default when absent."""
        return self.params.get(MODEL_KEY) or DEFAULT_MODEL

    @property
    def generation(self) -> int:
        raw = self.params.get(GENERATION_KEY, "0").strip()
        return int(raw) if raw.isdigit() else 0

    def with_role(self, role: str) -> ModelEntry:
        """This entry as seen while it serves ``role`` (switched in place); not written."""
        return replace(self, params={**self.params, "role": role})

    @property
    def is_instance(self) -> bool:
        return self.role in INSTANCE_ROLES

    @property
    def max_batch_size(self) -> int:
        raw = self.params.get("max_batch_size", "32").strip()
        return int(raw) if raw.isdigit() and int(raw) > 0 else 32


@dataclass(frozen=True)
class Edit:
    """One logged change of the repository."""

    at: float
    model: str
    kind: str
    reason: str
    changes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def parse_config(text: str, where: str) -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{where}: config.pbtxt does not parse: {exc}") from None


def params_of(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


class Repository:
    """Reads and edits one model repository; safe against concurrent editors.

    Edits by several processes (the controller, ``pdserve upgrade``) are
    serialised by an ``flock`` on a lock file in the staging directory.
    """

    def __init__(
        self,
        root: Path,
        *,
        edit_log: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotFound(f"model repository {self.root} is not a directory")
        self.staging = self.root.parent / f".{self.root.name}.staging"
        self.edit_log = edit_log
        self.clock = clock
        self.edits: list[Edit] = []

    # -- reading ---------------------------------------------------------------

    def entries(self) -> dict[str, ModelEntry]:
        """Every model directory with a config.pbtxt, by name."""
        out: dict[str, ModelEntry] = {}
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or path.name.startswith("."):
                continue
            cfg_path = path / "config.pbtxt"
            if not cfg_path.is_file():
                log.warning("model dir %s has no config.pbtxt; ignored", path)
                continue
            config = parse_config(cfg_path.read_text(), str(cfg_path))
            versions = tuple(sorted(int(p.name) for p in path.iterdir()
                                    if p.is_dir() and p.name.isdigit()))
            out[path.name] = ModelEntry(path.name, params_of(config), versions)
        return out

    def instances(self) -> dict[str, ModelEntry]:
        """The P/D (and aggregated) instances: what the controller manages."""
        return {n: e for n, e in self.entries().items() if e.is_instance}

    def routers(self) -> dict[str, ModelEntry]:
        """The router models (client entry points): the controller keeps them alive."""
        return {n: e for n, e in self.entries().items() if e.role == "router"}

    def entry(self, name: str) -> ModelEntry:
        entry = self.entries().get(name)
        if entry is None:
            raise NotFound(f"model {name!r} is not in repository {self.root}")
        return entry

    # -- edits -----------------------------------------------------------------

    def switch_role(self, name: str, role: str, reason: str) -> ModelEntry:
        if role not in SWITCHABLE_ROLES:
            raise InvalidArgument(f"can switch only to {SWITCHABLE_ROLES}, got {role!r}")
        current = self.entry(name)
        if current.role not in SWITCHABLE_ROLES:
            raise InvalidArgument(f"{name} has role {current.role!r}; only P/D roles switch")
        if current.role == role:
            raise InvalidArgument(f"{name} already has role {role!r}")
        return self.set_params(name, {"role": role}, "switch_role", reason)

    def reload(self, name: str, reason: str) -> ModelEntry:
        """Make Triton load the model again with a fresh stub."""
        return self.set_params(name, {}, "reload", reason)

    def set_model(self, name: str, model: str, reason: str, role: str = "") -> ModelEntry:
        """Roll ``name`` onto new weights (a preset name or a checkpoint dir);
        ``role``: also write this role (one it serves after a switch in place,
        which the reload would otherwise lose)."""
        if not model.strip():
            raise InvalidArgument("model must not be empty")
        if role and role not in SWITCHABLE_ROLES:
            raise InvalidArgument(f"role must be one of {SWITCHABLE_ROLES}, got {role!r}")
        return self.set_params(name, {MODEL_KEY: model, **({"role": role} if role else {})},
                               "set_model", reason)

    def set_params(
        self, name: str, updates: Mapping[str, str], kind: str, reason: str
    ) -> ModelEntry:
        """Set ``updates`` and bump ``generation`` (so the change reloads), atomically."""
        if GENERATION_KEY in updates:
            raise InvalidArgument(f"{GENERATION_KEY!r} is bumped by the repository itself")
        with self._locked():
            live = self._model_dir(name)
            config = parse_config((live / "config.pbtxt").read_text(), str(live))
            before = params_of(config)
            after = {**before, **updates}
            after[GENERATION_KEY] = str(ModelEntry(name, before, ()).generation + 1)
            _set_parameters(config, after)
            staged = self._stage_copy(live)
            _write_file(staged / "config.pbtxt", text_format.MessageToString(config))
            self._swap_into_place(staged, live)
        self._record(name, kind, reason, before, after)
        return ModelEntry(name, after, self.entry(name).versions)

    def add_version(self, name: str, reason: str) -> int:
        """Add version folder N+1 (a copy of the latest): Triton loads it, then unloads N."""
        with self._locked():
            live = self._model_dir(name)
            versions = sorted(int(p.name) for p in live.iterdir()
                              if p.is_dir() and p.name.isdigit())
            new = (versions[-1] + 1) if versions else 1
            staged = self.staging / f"{name}.v{new}.{uuid.uuid4().hex[:8]}"
            if versions:
                shutil.copytree(live / str(versions[-1]), staged, symlinks=True)
            else:
                staged.mkdir(parents=True)
            _fsync_tree(staged)
            os.rename(staged, live / str(new))  # appears complete under its final name
        self._record(name, "add_version", reason, {"version": str(versions[-1]) if versions
                                                   else None}, {"version": str(new)})
        return new

    def add_instance(
        self, name: str, *, template: str, role: str, scenario: str, reason: str
    ) -> ModelEntry:
        """A new instance model, copied from ``template`` with its own name and role."""
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgument(f"bad model name {name!r}")
        if role not in INSTANCE_ROLES:
            raise InvalidArgument(f"role must be one of {INSTANCE_ROLES}, got {role!r}")
        with self._locked():
            if (self.root / name).exists():
                raise InvalidArgument(f"model {name!r} already exists")
            source = self._model_dir(template)
            staged = self._stage_copy(source)
            config = parse_config((staged / "config.pbtxt").read_text(), str(staged))
            config.name = name
            params = {**params_of(config), "role": role, "scenario": scenario,
                      GENERATION_KEY: "1"}
            _set_parameters(config, params)
            _write_file(staged / "config.pbtxt", text_format.MessageToString(config))
            os.rename(staged, self.root / name)
        self._record(name, "add_instance", reason, {}, params)
        return self.entry(name)

    def remove_instance(self, name: str, reason: str) -> None:
        with self._locked():
            live = self._model_dir(name)
            before = params_of(parse_config((live / "config.pbtxt").read_text(), str(live)))
            graveyard = self.staging / f"{name}.removed.{uuid.uuid4().hex[:8]}"
            os.rename(live, graveyard)  # the model vanishes from the repository at once
            shutil.rmtree(graveyard, ignore_errors=True)
        self._record(name, "remove_instance", reason, before, {})

    # -- internals -------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        path = self.root / name
        if not (path / "config.pbtxt").is_file():
            raise NotFound(f"model {name!r} is not in repository {self.root}")
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.staging.mkdir(parents=True, exist_ok=True)
        with open(self.staging / "lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _stage_copy(self, live: Path) -> Path:
        staged = self.staging / f"{live.name}.{uuid.uuid4().hex[:8]}"
        shutil.copytree(live, staged, symlinks=True)
        return staged

    def _swap_into_place(self, staged: Path, live: Path) -> None:
        _fsync_tree(staged)
        try:
            try:
                exchange_dirs(staged, live)
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                     errno.EXDEV):
                    raise
                # No RENAME_EXCHANGE on this filesystem, or the staging directory is
                # on another one (the repository is a mount point, as in a
                # container's -v DIR:/models): replacing the one changed file is
                # still atomic, from a complete copy in the model's own directory.
                part = live / f".config.pbtxt.{uuid.uuid4().hex[:8]}"
                try:
                    shutil.copyfile(staged / "config.pbtxt", part)
                    _fsync_file(part)
                    os.replace(part, live / "config.pbtxt")
                finally:
                    part.unlink(missing_ok=True)
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # the old copy after an exchange

    def _record(
        self, name: str, kind: str, reason: str,
        before: Mapping[str, str | None], after: Mapping[str, str | None],
    ) -> None:
        changes = {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
                   if before.get(k) != after.get(k)}
        edit = Edit(self.clock(), name, kind, reason, changes)
        self.edits.append(edit)
        log.info("repository edit %s %s: %s %s", kind, name, reason, changes)
        if self.edit_log is not None:
            with open(self.edit_log, "a") as f:
                f.write(edit.to_json() + "\n")


def exchange_dirs(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2({a}, {b}): {os.strerror(err)}")


def _set_parameters(config: Message, params: Mapping[str, str]) -> None:
    config.parameters.clear()
    for key, value in sorted(params.items()):
        config.parameters[key].string_value = value


def _write_file(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """Durable before it becomes visible: a crash never leaves a torn live model."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
