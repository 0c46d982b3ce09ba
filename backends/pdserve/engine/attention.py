"""Attention that reads K/V in place from a sequence's arena extent.

Nothing here gathers or copies the cache: the prompt region and the
generation region are separate views, and a decode token attends over both
by concatenating the two *score* rows (tiny) rather than the K/V tensors:

    scores = [ q.Kp^T  |  q.Kg^T ]        [Hkv, G, Tp + n]
    p      = softmax(scores)              one softmax over both parts
    out    = p[:Tp].Vp + p[Tp:].Vg        [Hkv, G, D]

G = H / Hkv query heads share one KV head (grouped-query attention); query
head h uses KV head h // G, as in transformers' ``repeat_kv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                      scale: float) -> torch.Tensor:
    """Causal attention of a prompt chunk.

    q [C, H, D] holds positions start .. start+C-1; k, v [start+C, Hkv, D] are
    the prompt region up to the chunk's end (earlier chunks included). Returns
    [C, H*D].
    """
    num_q, num_heads, head_dim = q.shape
    num_k = k.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, C, D]
    kh = k.transpose(0, 1).unsqueeze(0)  # [1, Hkv, Tk, D]
    vh = v.transpose(0, 1).unsqueeze(0)  # [1, Hkv, Tk, D]
    mask = None
    if start > 0:
        # Query i sits at position start+i and sees keys 0 .. start+i: the
        # causal diagonal shifted right by `start` (is_causal would not shift).
        q_pos = torch.arange(start, start + num_q, device=q.device)
        mask = torch.arange(num_k, device=q.device)[None, :] <= q_pos[:, None]  # [C, Tk]
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, is_causal=start == 0, scale=scale,
        enable_gqa=kh.shape[1] != num_heads,
    )  # [1, H, C, D]
    return out[0].transpose(0, 1).reshape(num_q, num_heads * head_dim)


def decode_attention(q: torch.Tensor, k_prompt: torch.Tensor, v_prompt: torch.Tensor,
                     k_gen: torch.Tensor, v_gen: torch.Tensor, scale: float,
                     out: torch.Tensor) -> None:
    """One decode token over its prompt and generated K/V, written into ``out``.

    q [H, D]; k_prompt, v_prompt [1, Hkv, Tp, D] and k_gen, v_gen [1, Hkv, n, D]
    (views into the arena, transposed, not copied); out [H*D]. On CPU this
    runs the fused flash kernel once per region and merges the two partial
    results by their log-sum-exp, which is exactly one softmax over the
    concatenated scores; elsewhere it concatenates the scores explicitly.
    """
    num_heads, head_dim = q.shape
    num_kv_heads = k_prompt.shape[1]
    # The G query heads of one KV group act as G query rows: no mask is needed
    # for a single position, and the kernel sees plain multi-head attention.
    qg = q.view(1, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [1, Hkv, G, D]
    dst = out.view(qg.shape)
    if q.device.type != "cpu":
        _decode_attention_reference(qg, k_prompt, v_prompt, k_gen, v_gen, scale, dst)
        return
    out_p, lse_p = _flash_cpu(qg, k_prompt, v_prompt, scale=scale)  # [1, Hkv, G, D], [1, Hkv, G]
    out_g, lse_g = _flash_cpu(qg, k_gen, v_gen, scale=scale)
    # softmax over [Sp | Sg] = w * softmax(Sp) + (1 - w) * softmax(Sg) with
    # w = e^lse_p / (e^lse_p + e^lse_g) = sigmoid(lse_p - lse_g).
    w = torch.sigmoid(lse_p - lse_g).unsqueeze(-1).to(q.dtype)  # [1, Hkv, G, 1]
    torch.lerp(out_g, out_p, w, out=dst)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _decode_attention_reference(qg: torch.Tensor, k_prompt: torch.Tensor,
                                v_prompt: torch.Tensor, k_gen: torch.Tensor,
                                v_gen: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Portable version: scores of both regions, one float32 softmax, two PV sums."""
    num_prompt = k_prompt.shape[2]
    qs = qg * scale  # [1, Hkv, G, D]
    scores = torch.cat(
        (qs @ k_prompt.transpose(-1, -2), qs @ k_gen.transpose(-1, -2)), dim=-1
    )  # [1, Hkv, G, Tp + n]
    probs = scores.float().softmax(dim=-1).to(qg.dtype)
    torch.matmul(probs[..., :num_prompt], v_prompt, out=out)  # [1, Hkv, G, D]
    out += probs[..., num_prompt:] @ v_gen
