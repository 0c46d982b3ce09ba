"""Attention kernels against a plain softmax over concatenated K/V."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import (
    _decode_attention_reference,
    decode_attention,
    prefill_attention,
)


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
           scale: float) -> torch.Tensor:
    """q [C, H, D], k/v [T, Hkv, D]: causal attention, GQA by repeat."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("chd,thd->hct", q, k) * scale
    mask = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]  # [C, T]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hct,thd->chd", probs, v).reshape(q.shape[0], -1)


@pytest.mark.parametrize("start", [0, 5, 17])
def test_prefill_chunk_attention_with_offset(start: int) -> None:
    torch.manual_seed(0)
    chunk, h, hkv, d = 6, 8, 2, 16
    k = torch.randn(start + chunk, hkv, d)
    v = torch.randn(start + chunk, hkv, d)
    q = torch.randn(chunk, h, d)
    got = prefill_attention(q, k, v, start, 0.25)
    want = _naive(q, k, v, torch.arange(start, start + chunk), 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_over_two_regions() -> None:
    torch.manual_seed(1)
    h, hkv, d, tp, n = 8, 2, 16, 11, 4
    kp, vp = torch.randn(tp, hkv, d), torch.randn(tp, hkv, d)
    kg, vg = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    q = torch.randn(h, d)
    want = _naive(q[None], torch.cat([kp, kg]), torch.cat([vp, vg]),
                  torch.tensor([tp + n - 1]), 0.25)[0]

    def as4d(t: torch.Tensor) -> torch.Tensor:  # [T, Hkv, D] -> [1, Hkv, T, D] view
        return t.transpose(0, 1)[None]

    got = torch.empty(h * d)
    decode_attention(q, as4d(kp), as4d(vp), as4d(kg), as4d(vg), 0.25, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = torch.empty(1, hkv, h // hkv, d)
    _decode_attention_reference(q.view(1, hkv, h // hkv, d), as4d(kp), as4d(vp), as4d(kg),
                                as4d(vg), 0.25, ref)
    torch.testing.assert_close(ref.view(-1), want, rtol=1e-5, atol=1e-5)
