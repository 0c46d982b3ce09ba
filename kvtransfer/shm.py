"""Shared-memory transport: one host, different processes, one-sided writes.

Triton runs each model instance in its own stub process. The decode instance
keeps its whole KV arena in a POSIX shared-memory segment (``ShmArena``:
``/dev/shm/pdkv-...``, created 0600, unlinked when its owner closes it) and
its engine attends over the arena in place. A prefill instance attaches to the
segment by name (from the handle) and copies its KV straight into the
reserved extent: one memcpy, no copy on the decode side. The authenticated
control connection carries only BEGIN/GRANT, a NOTE per ``NOTE_BYTES`` written,
and END (length + checksum) / DONE.

Who verifies, and when. The sender copies in ``wire.CHUNK_BYTES`` chunks and
hashes each SOURCE chunk right after copying it (still in cache: nearly free).
The receiver must still check what LANDED, or a bad copy, a short write or a
stray writer would go unnoticed; that needs its own pass over the extent.
Two ways, both measured by ``perf.kv_transfer`` (``checksum`` vs
``checksum_at_end``, perf/RESULTS.md):

    verify="streaming" (default)  hash each span when its NOTE arrives, on the
        receiver's connection thread, while the sender copies the next chunk
        (and, layer-wise, while prefill computes the next layer): at END only
        the last span is left. Misses a change made to a span after its NOTE
        was hashed (nothing may write there then but a buggy process).
    verify="at_end"  one pass over the whole region at END: also catches such
        late changes, but the pass is cache-cold and fully exposed (~0.4-0.5x
        a memcpy of the region here, xxh3 ~12 GB/s vs memcpy ~7 GB/s).

Either way a copy that went wrong before its NOTE is caught, so the default is
the one that hides the pass. On a busy 2-core box the overlap has no free core
to run on, which is why shm with checksum stays below 70 % of memcpy there.

Why the one-sided writer waits for GRANT (unlike tcp): see ``sender.py``.

    arena = ShmArena(capacity_bytes)          # decode instance owns it
    receiver = ShmReceiver(arena, layout, fingerprint, config)
    ...
    receiver.close(); arena.close()           # close() unlinks the segment

Trust: an attached sender can write anywhere in the segment, so only
processes holding the deployment secret and running as the same user (0600)
get to attach; spans are checked against the granted reservation on the
sender and re-verified (order, length, checksum) on the receiver.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import threading

import torch

from pdserve.errors import InvalidArgument, TransferError
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.arena import Arena
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.handle import KVHandle
from pdserve.kvtransfer.layout import KVLayout
from pdserve.kvtransfer.receiver import ControlReceiver
from pdserve.kvtransfer.sender import ControlSender, ControlStream

NOTE_BYTES = 2 << 20  # a NOTE per this many written bytes: lets a streaming receiver keep up
SHM_DIR = "/dev/shm"
SHM_PREFIX = "pdkv-"
_NAME = re.compile(r"^pdkv-[A-Za-z0-9_-]{1,200}$")  # no path separators: names come off the wire


class ShmSegment:
    """A POSIX shared-memory segment mapped into this process as a uint8 tensor."""

    def __init__(self, name: str, fd: int, owner: bool) -> None:
        self.name, self.owner = name, owner
        try:
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the memory; the fd is not needed
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)  # [size], no copy
        self._closed = False

    @classmethod
    def create(cls, nbytes: int, prefix: str = SHM_PREFIX) -> ShmSegment:
        if nbytes <= 0:
            raise ValueError(f"segment size must be positive, got {nbytes}")
        name = f"{prefix}{os.getpid()}-{secrets.token_hex(8)}"
        check_segment_name(name)
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask says
            os.ftruncate(fd, nbytes)
            return cls(name, fd, owner=True)
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, name: str) -> ShmSegment:
        check_segment_name(name)
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        except OSError as exc:
            raise TransferError(f"cannot attach shared-memory segment {name!r}: {exc}") from None
        return cls(name, fd, owner=False)

    def close(self) -> None:
        """Drop this process's mapping; the owner also unlinks the name."""
        if self._closed:
            return
        self._closed = True
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))
        # The memory goes when the last tensor view of it does (torch keeps the
        # mmap alive); closing the mmap under a live view would be a crash.
        del self.tensor


def check_segment_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(f"bad shared-memory segment name {name!r}")
    return name


def sweep_stale_segments() -> list[str]:
    """Unlink pdkv segments whose creating process is gone (killed before close).

    Only the creator unlinks, so a SIGKILLed decode instance leaves its segment
    behind; call this at instance start-up. Only safe where /dev/shm and the pid
    namespace are shared by the same set of processes (one container / host).
    """
    removed = []
    for name in os.listdir(SHM_DIR):
        match = re.match(r"^pdkv-(\d+)-[0-9a-f]+$", name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmArena(Arena):
    """An Arena whose buffer is a shared-memory segment this process owns."""

    def __init__(self, capacity_bytes: int) -> None:
        self.segment = ShmSegment.create(capacity_bytes)
        super().__init__(buffer=self.segment.tensor)

    @property
    def name(self) -> str:
        return self.segment.name

    def close(self) -> None:
        self.segment.close()

    def __enter__(self) -> ShmArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShmReceiver(ControlReceiver):
    """Decode side: the arena is a ShmArena; senders write into it directly."""

    transport = "shm"
    data_frame = wire.NOTE

    def __init__(self, arena: Arena, layout: KVLayout, model_fingerprint: str,
                 config: TransferConfig, instance: str = "decode") -> None:
        if not isinstance(arena, ShmArena):
            raise InvalidArgument("the shm transport needs a ShmArena (shared-memory buffer)")
        super().__init__(arena, layout, model_fingerprint, config, instance)

    @property
    def data_endpoint(self) -> str:
        assert isinstance(self.arena, ShmArena)
        return self.arena.name


class ShmSender(ControlSender):
    """Prefill side: attach each receiver's segment once, copy spans into it."""

    transport = "shm"
    one_sided = True

    def __init__(self, layout: KVLayout, model_fingerprint: str, config: TransferConfig) -> None:
        super().__init__(layout, model_fingerprint, config)
        self._segments: dict[str, ShmSegment] = {}
        self._seg_lock = threading.Lock()

    def _prepare(self, handle: KVHandle) -> None:
        segment = self._segment(handle.data_endpoint)
        if handle.extent_offset + handle.prompt_nbytes > segment.size:
            raise InvalidArgument(f"handle extent ends beyond segment {segment.name!r} "
                                  f"({segment.size} bytes)")

    def _segment(self, name: str) -> ShmSegment:
        with self._seg_lock:
            segment = self._segments.get(name)
            if segment is None:
                # A new segment: a decode started (or restarted, or switched roles)
                # with a new arena. Mappings of segments their owners unlinked
                # since are dropped, or they would keep every page the old arena
                # touched (a copy in progress keeps its own view until it ends).
                for old in [n for n in self._segments
                            if not os.path.exists(os.path.join(SHM_DIR, n))]:
                    self._segments.pop(old).close()
                segment = self._segments[name] = ShmSegment.attach(name)
            return segment

    def _put(self, stream: ControlStream, offset: int, flat: torch.Tensor, ack: bool) -> None:
        dst = self._segment(stream.handle.data_endpoint).tensor
        nbytes = flat.numel()
        if nbytes == 0:
            self._note(stream, offset, 0, ack)
            return
        hashing = stream.hasher.enabled
        src = wire.as_memoryview(flat) if hashing else None
        noted = 0
        for start in range(0, nbytes, wire.CHUNK_BYTES):
            if start:
                # The receiver frees the extent when the reservation fails (cancel,
                # TTL, its timeout) and says so with ERR: stop within a chunk,
                # not at the end of a span (a layer, or the whole prompt).
                stream.conn.poll_error()
            end = min(start + wire.CHUNK_BYTES, nbytes)
            dst[offset + start : offset + end].copy_(flat[start:end])
            if src is not None:
                stream.hasher.update(src[start:end])  # the source chunk is still in cache
            if end == nbytes or (hashing and end - noted >= NOTE_BYTES):
                self._note(stream, offset + noted, end - noted, ack and end == nbytes)
                noted = end

    @staticmethod
    def _note(stream: ControlStream, offset: int, nbytes: int, ack: bool) -> None:
        stream.conn.send_frame(wire.NOTE, offset=offset, meta={"nbytes": nbytes},
                               flags=wire.FLAG_ACK if ack else 0)
        if ack:
            stream.conn.expect(wire.ACK)

    def detach(self, name: str) -> None:
        """Forget a receiver's segment (e.g. that decode instance was removed)."""
        with self._seg_lock:
            segment = self._segments.pop(name, None)
        if segment is not None:
            segment.close()

    def _release_transport(self) -> None:
        with self._seg_lock:
            segments, self._segments = self._segments, {}
        for segment in segments.values():
            segment.close()
