"""The contract between the load generator's parts.

``RequestSpec`` is what the workload asks for; ``RequestRecord`` is what the
client observed. Metrics are pure functions of records, so they are tested on
hand-made records without a server.

Times are seconds on the ``time.perf_counter`` clock, relative to the start of
the measured run (t = 0 when the first measured request may be sent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RequestStatus = Literal["ok", "error", "cancelled"]


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload.

    ``arrival_s`` is the scheduled send time for open-loop modes (rate, trace);
    ``None`` in closed-loop mode, where a request goes as soon as a slot frees.
    """

    index: int
    input_len: int
    output_len: int
    arrival_s: float | None = None

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"index must be >= 0, got {self.index}")
        if self.input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {self.input_len}")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if self.arrival_s is not None and self.arrival_s < 0:
            raise ValueError(f"arrival_s must be >= 0, got {self.arrival_s}")


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request, as seen by the client.

    ``response_s[i]`` is when response i arrived and ``response_tokens[i]`` how
    many output tokens it carried (from ``output_ids``, never from text). An
    empty final response (the FINAL flag alone) is not in these lists.
    ``final_s`` is when the request ended for the client: the FINAL flag, the
    error, or the cancel (None only if it never ended, which the client avoids).
    """

    index: int
    input_len: int
    requested_output_len: int
    send_s: float
    response_s: tuple[float, ...]
    response_tokens: tuple[int, ...]
    final_s: float | None
    status: RequestStatus
    error_kind: str | None = None
    error_message: str | None = None
    finish_reason: str | None = None
    scheduled_s: float | None = None

    def __post_init__(self) -> None:
        if len(self.response_s) != len(self.response_tokens):
            raise ValueError(
                f"response_s has {len(self.response_s)} entries but response_tokens "
                f"{len(self.response_tokens)}"
            )
        if any(t < self.send_s for t in self.response_s):
            raise ValueError(f"request {self.index}: a response precedes its send time")
        if any(n < 0 for n in self.response_tokens):
            raise ValueError(f"request {self.index}: negative token count")
        if self.status == "ok" and self.error_kind is not None:
            raise ValueError(f"request {self.index}: status ok with error_kind set")
        if self.status != "ok" and self.error_kind is None:
            raise ValueError(f"request {self.index}: status {self.status} needs an error_kind")

    @property
    def output_tokens(self) -> int:
        return sum(self.response_tokens)

    @property
    def is_ok(self) -> bool:
        return self.status == "ok"

    @property
    def first_token_s(self) -> float | None:
        """Arrival of the first response that carried a token (genai-perf skips empty ones)."""
        for t, n in zip(self.response_s, self.response_tokens, strict=True):
            if n > 0:
                return t
        return None

    @property
    def last_token_s(self) -> float | None:
        for t, n in zip(reversed(self.response_s), reversed(self.response_tokens), strict=True):
            if n > 0:
                return t
        return None

    @property
    def end_s(self) -> float:
        """When the client was done with the request (final flag, error or cancel)."""
        candidates = [self.send_s, *self.response_s]
        if self.final_s is not None:
            candidates.append(self.final_s)
        return max(candidates)
