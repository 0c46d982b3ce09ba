"""The KV handle: where one request's KV must land, as the receiver hands it out.

The decode instance creates it (``KVReceiver.reserve``), the router carries
its bytes to a prefill instance, whose sender writes the prompt KV there. It is
small (a few hundred bytes of JSON), versioned, and validated on the way in:
bad bytes raise ``InvalidArgument`` with the reason.

    extent_offset                               extent_offset + extent_nbytes
    |<- prompt region [L, 2, Tp, Hkv, D] ->|<- generation region ... ->|
    |<--- the sender writes exactly this ->|

Fields describing the transport:
    transport       "shm" | "tcp" | "mooncake"
    endpoint        "host:port" of the receiver's authenticated control socket
    data_endpoint   shm segment name (shm), Mooncake session id (mooncake), "" (tcp)
    remote_base     address of the receiver's registered arena buffer (mooncake), else 0
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from pdserve.errors import InvalidArgument
from pdserve.kvtransfer.layout import KVLayout

HANDLE_VERSION = 1
MAX_HANDLE_BYTES = 8192
TRANSPORTS = ("shm", "tcp", "mooncake")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces


@dataclass(frozen=True)
class KVHandle:
    """Serialisable description of a reserved KV extent on a receiver."""

    request_id: str
    instance: str
    transport: str
    endpoint: str
    extent_offset: int
    extent_nbytes: int
    prompt_tokens: int
    max_new_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    model_fingerprint: str
    checksum: str = "xxh3"
    data_endpoint: str = ""
    remote_base: int = 0
    version: int = HANDLE_VERSION

    def __post_init__(self) -> None:
        check_request_id(self.request_id)
        if self.version != HANDLE_VERSION:
            raise ValueError(f"handle version {self.version} not supported (want {HANDLE_VERSION})")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.checksum not in ("xxh3", "crc32", "none"):
            raise ValueError(
                f"checksum must be 'xxh3', 'crc32' or 'none', got {self.checksum!r}"
            )
        if self.extent_offset < 0 or self.remote_base < 0:
            raise ValueError("extent_offset and remote_base must be non-negative")
        if self.prompt_tokens <= 0 or self.max_new_tokens < 0:
            raise ValueError(
                f"prompt_tokens must be positive and max_new_tokens non-negative, got "
                f"{self.prompt_tokens} and {self.max_new_tokens}"
            )
        if not self.model_fingerprint:
            raise ValueError("model_fingerprint must not be empty")
        layout = self.layout  # validates the geometry
        needed = layout.region_bytes(self.prompt_tokens)
        if self.extent_nbytes < needed:
            raise ValueError(
                f"extent of {self.extent_nbytes} bytes cannot hold a {self.prompt_tokens}-token "
                f"prompt ({needed} bytes)"
            )

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def prompt_nbytes(self) -> int:
        return self.layout.region_bytes(self.prompt_tokens)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KVHandle:
        """Parse and validate; raises ``InvalidArgument`` saying what is wrong."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"KV handle must be bytes, got {type(data).__name__}")
        if len(data) > MAX_HANDLE_BYTES:
            raise InvalidArgument(f"KV handle of {len(data)} bytes exceeds {MAX_HANDLE_BYTES}")
        try:
            raw = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"KV handle is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidArgument("KV handle must be a JSON object")
        if raw.get("version") != HANDLE_VERSION:
            raise InvalidArgument(
                f"KV handle version {raw.get('version')!r} not supported (want {HANDLE_VERSION})"
            )
        return cls._from_dict(raw)

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> KVHandle:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InvalidArgument(f"KV handle has unknown fields {unknown}")
        for name, value in raw.items():
            want = int if known[name].type == "int" else str
            if type(value) is not want:
                raise InvalidArgument(f"KV handle field {name!r} must be {want.__name__}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise InvalidArgument(f"KV handle is incomplete: {exc}") from None
        except ValueError as exc:
            raise InvalidArgument(f"KV handle is invalid: {exc}") from None


def check_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise InvalidArgument(
            "request_id must be 1-256 printable ASCII characters without spaces, "
            f"got {request_id!r}"
        )
    return request_id
