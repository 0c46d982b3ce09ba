"""Transfer configuration shared by both sides of every transport.

One frozen dataclass, validated on construction. The receiver (decode
instance) and the sender (prefill instance) must be built with the same
``secret``; everything else is local policy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

ChecksumKind = Literal["xxh3", "crc32", "none"]
VerifyKind = Literal["at_end", "streaming"]

MIN_SECRET_BYTES = 16
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class TransferConfig:
    """Knobs of one KV transfer endpoint.

    secret: shared by all instances of a deployment; proves a peer is one of
        them (HMAC challenge-response, never sent on the wire).
    host/port: where a receiver binds its control socket; port 0 picks a free
        one. Never a wildcard unless ``advertise_host`` says what peers dial.
    checksum: "xxh3" (default, xxHash3-64) verifies every transfer end to end;
        "crc32" is accepted (slower); "none" exists only so the benchmark can
        report the checksum's cost.
    verify: when the receiver of a one-sided transport (shm, mooncake) hashes
        the landed bytes: "streaming" (default: each span as its NOTE arrives,
        overlapping the sender's next chunk, and in layer-wise mode the
        prefill's next layers) or "at_end" (one pass over the region at END:
        also catches a change made after the NOTE). See shm.py.
    page_tokens: tokens per page of the block-fixed baseline.
    """

    secret: bytes
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    connect_timeout_s: float = 5.0
    io_timeout_s: float = 10.0
    checksum: ChecksumKind = "xxh3"
    verify: VerifyKind = "streaming"
    max_connections: int = 64
    page_tokens: int = 16
    mooncake_protocol: str = "tcp"

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"secret must be at least {MIN_SECRET_BYTES} bytes")
        if self.host in WILDCARD_HOSTS and not self.advertise_host:
            raise ValueError(
                f"host {self.host!r} is a wildcard: set advertise_host to the address peers dial"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("connect_timeout_s", "io_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.checksum not in ("xxh3", "crc32", "none"):
            raise ValueError(
                f"checksum must be 'xxh3', 'crc32' or 'none', got {self.checksum!r}"
            )
        if self.verify not in ("at_end", "streaming"):
            raise ValueError(f"verify must be 'at_end' or 'streaming', got {self.verify!r}")
        if self.max_connections <= 0:
            raise ValueError(f"max_connections must be positive, got {self.max_connections}")
        if self.page_tokens <= 0:
            raise ValueError(f"page_tokens must be positive, got {self.page_tokens}")
        if self.mooncake_protocol not in ("tcp", "rdma"):
            raise ValueError(
                f"mooncake_protocol must be 'tcp' or 'rdma', got {self.mooncake_protocol!r}"
            )

    @property
    def public_host(self) -> str:
        """The address written into handles (what peers connect to)."""
        return self.advertise_host or self.host


def format_endpoint(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError on anything else."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError(f"endpoint port out of range in {endpoint!r}")
    return host.strip("[]"), port
