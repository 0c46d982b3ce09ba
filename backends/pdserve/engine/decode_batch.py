"""Decode attention for a whole batch in a few kernels per layer.

Each sequence's KV lives in its own extent of the arena (prompt region then
generation region, layer-major: ``pdserve.kvtransfer.layout``), so a batch's
K/V are not one tensor. ``decode_attention`` (attention.py) reads them in
place, one sequence at a time: two fused kernels, a sigmoid and a lerp per
sequence and layer. Where launching a kernel costs more than the work it does
(every GPU; a CPU with short contexts) that is most of a decode step: 7 ms a
sequence for Llama-3-8B on an H100 (perf/RESULTS.md, "pdserve on an H100").

``DecodeBatch`` does the same attention with a fixed number of kernels per
layer, whatever the batch size:

1. the new token's K and V go to their generation slots, one indexed write
   for the batch;
2. one gather copies every sequence's K/V rows of this layer into a padded
   [2, B, Tmax, Hkv, D] tensor: the arena is addressed as overlapping rows
   (one row = one token's Hkv x D values, starting at any element), and each
   sequence's row numbers follow from its extent offset alone, since every
   region is packed;
3. one masked attention over the padded batch (query heads grouped per KV
   head, as in ``decode_attention``; padding masked out).

The indices are computed once per step for layer 0; layer l adds l times a
per-position stride. The gather moves the batch's KV once more than reading
it in place, which is why on a CPU the engine keeps the per-sequence path
where that copy costs more than the calls it saves
(``LlamaModel._batch_decodes``). Measured on the 2-core EPYC, one thread,
full decode steps, per-sequence / batched (``python -m perf.decode_attention``,
perf/RESULTS.md):

    K+V of a sequence's layer      batch 4   16        64
    tiny, 64-256 tokens (<=64 KiB)  1.1x     1.9-2.1x  2.8-2.9x
    tiny, 900 tokens (225 KiB)      1.0x     1.5x      1.5x
    small, 64 tokens (128 KiB)      1.0x     1.1x      1.1x
    small, 256 tokens (512 KiB)     0.9x     1.1x      0.6x
    small, 900 tokens (1.8 MiB)     0.9x     0.8x      0.3x

so a CPU batches the sequences up to 256 KiB a sequence's layer (when there
are 2 or more; the longer ones of the same step attend per sequence); any
other device batches them all (there a launch costs more than any one
sequence's copy: pdserve's per-sequence path took 7 ms a sequence on an H100).
The engine orders a batch by length and splits it where the padded gather
would pass 256 MiB a layer, so a long context pads only the long ones.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F


class DecodeBatch:
    """Row indices of B decode tokens' K/V, for every layer of one step."""

    def __init__(self, storage: torch.Tensor, *, prompt_offsets: Seq[int],
                 prompt_tokens: Seq[int], gen_offsets: Seq[int], gen_slots: Seq[int],
                 slots: Seq[int], num_kv_heads: int, head_dim: int) -> None:
        """``storage``: any tensor over the arena in the KV dtype (its whole
        storage is used); offsets are element offsets of each sequence's
        prompt and generation regions; ``slots``: the generation slot the new
        token's K/V go to (so the sequence attends over ``slot + 1``
        generated positions)."""
        dev = storage.device
        row = num_kv_heads * head_dim
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        numel = storage.untyped_storage().nbytes() // storage.element_size()
        self.elems = storage.as_strided((numel,), (1,), 0)
        # Regions are whole rows, so where every extent starts on a row (the
        # arenas' usual case: every extent's size is a multiple of a row) the
        # arena is a plain [rows, row] matrix and indices count rows; else
        # row i is the `row` elements from element i (overlapping rows: the
        # same gather, a slower copy on a CPU).
        self.aligned = all(o % row == 0 for o in (*prompt_offsets, *gen_offsets))
        if self.aligned:
            self.rows = storage.as_strided((numel // row, row), (row, 1), 0)
            unit = row
        else:
            self.rows = storage.as_strided((numel - row + 1, row), (1, 1), 0)
            unit = 1

        def col(values: Seq[int], scale: int = 1) -> torch.Tensor:
            return torch.tensor([x // scale for x in values], dtype=torch.long,
                                device=dev)[:, None]  # [B, 1]

        pe, ge = col(prompt_offsets, unit), col(gen_offsets, unit)
        tp, g, slot = col(prompt_tokens), col(gen_slots), col(slots)
        row //= unit  # a row's extent in index units: 1 row, or `row` elements
        lengths = tp + slot + 1  # [B, 1]
        self.batch = len(prompt_tokens)
        self.tmax = max(t + n + 1 for t, n in zip(prompt_tokens, slots, strict=True))  # no sync
        pos = torch.arange(self.tmax, device=dev)[None, :]  # [1, Tmax]
        in_prompt = pos < tp
        self.valid = pos < lengths  # [B, Tmax]
        # Layer 0's K row of each position; padding reads the sequence's
        # first prompt row (a valid address; masked out of the softmax).
        start = torch.where(in_prompt, pe + pos * row, ge + (pos - tp) * row)
        self.start = torch.where(self.valid, start, pe)
        region = torch.where(in_prompt, tp, g) * row  # elements of one K (or V) of a layer
        self.v_step = torch.where(self.valid, region, 0)  # K -> V of the same layer
        self.layer_step = 2 * self.v_step  # layer l -> l + 1
        # Where the new token's K of layer 0 goes: its generation slot.
        self.new_k = (ge + slot * row).view(-1)  # [B]
        self.new_layer_step = (2 * g * row).view(-1)
        self.new_v_step = (g * row).view(-1)
        self.mask = self.valid[:, None, None, :]  # [B, 1, 1, Tmax]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float, out: torch.Tensor) -> None:
        """q [B, H, D], k and v [B, Hkv, D] (the new tokens); writes out [B, H*D]."""
        b, num_heads, d = q.shape
        hkv = self.num_kv_heads
        # 1. the new tokens' K and V into their slots (one write for the batch)
        k_at = self.new_k + layer * self.new_layer_step  # [B]
        new = torch.cat((k, v)).view(2 * b, -1)  # [2B, row]
        dst = torch.cat((k_at, k_at + self.new_v_step))  # [2B]
        if self.aligned:
            self.rows.index_copy_(0, dst, new)
        else:  # overlapping rows cannot be written through: write elements
            cols = torch.arange(new.shape[1], device=dst.device)
            self.elems.index_put_(
                ((dst[:, None] + cols).view(-1),), new.reshape(-1))
        # 2. every position's K and V rows of this layer, padded per sequence
        k_rows = self.start + layer * self.layer_step  # [B, Tmax]
        idx = torch.stack((k_rows, k_rows + self.v_step))  # [2, B, Tmax]
        kv = self.rows.index_select(0, idx.view(-1)).view(2, b, self.tmax, hkv, d)
        # 3. one masked attention; G = H / Hkv query heads per KV head act as G rows
        qg = q.view(b, hkv, num_heads // hkv, d)
        res = F.scaled_dot_product_attention(
            qg, kv[0].transpose(1, 2), kv[1].transpose(1, 2), attn_mask=self.mask, scale=scale,
        )  # [B, Hkv, G, D]
        out.copy_(res.reshape(b, num_heads * d))
