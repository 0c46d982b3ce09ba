"""The Llama-family decoder over packed tokens.

One forward runs any mix of prompt chunks and decode tokens: the linear
layers see all tokens packed as [N, hidden] (no padding), attention runs per
item against that item's KV views, and K/V are written in place into the
arena before attention reads them. q/k/v and gate/up are fused into one
matmul each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from pdserve.engine.attention import decode_attention, prefill_attention
from pdserve.engine.config import ModelConfig
from pdserve.engine.decode_batch import DecodeBatch
from pdserve.engine.linear import Linear
from pdserve.engine.rope import RotaryCache, apply_rotary

GATHER_BYTES = 256 << 20  # K+V one batched decode attention gathers for a layer, at most
CPU_GATHER_MAX_BYTES = 256 << 10  # K+V of a sequence's layer up to which a CPU batches


@dataclass
class AttnItem:
    """One sequence's share of a forward: a prompt chunk or one decode token."""

    rows: slice  # its rows in the packed [N, ...] tensors
    start: int  # position of its first token
    prompt_kv: torch.Tensor  # [L, 2, Tp, Hkv, D] view into the arena
    gen_kv: torch.Tensor | None  # [L, 2, G, Hkv, D] view; used by decode items
    is_decode: bool

    def __post_init__(self) -> None:
        assert not self.is_decode or (self.gen_kv is not None and self.num_tokens == 1)

    @property
    def slot(self) -> int:
        """Generation slot of a decode token (where its K/V go)."""
        return self.start - self.prompt_kv.shape[2]

    @cached_property
    def decode_views(self) -> tuple[torch.Tensor, ...]:
        """(k_prompt, v_prompt, k_gen, v_gen, kv_slot) of every layer, for the
        per-sequence decode attention: views into the arena, nothing copied.
        The first four are [L, 1, Hkv, T, D]; kv_slot [L, 2, Hkv, D]."""
        assert self.gen_kv is not None
        prompt = self.prompt_kv.transpose(2, 3).unsqueeze(2)  # [L, 2, 1, Hkv, Tp, D]
        gen = self.gen_kv[:, :, : self.slot + 1].transpose(2, 3).unsqueeze(2)
        return prompt[:, 0], prompt[:, 1], gen[:, 0], gen[:, 1], self.gen_kv[:, :, self.slot]

    @property
    def num_tokens(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # weight [(H + 2 Hkv) D, hidden], bias [(H + 2 Hkv) D] (Qwen2)
    o: Linear  # [hidden, H D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 I, hidden]
    down: Linear  # [hidden, I]


class LlamaModel:
    """Weights plus the forward; stateless between calls (thread-agnostic)."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype, *, pack_weights: bool = True) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype

        def w(name: str) -> torch.Tensor:
            return state[name].to(device=device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")  # [V, hidden]
        self.norm = w("model.norm.weight")  # [hidden]
        head = self.embed if config.tie_word_embeddings else w("lm_head.weight")  # [V, hidden]
        self.lm_head = Linear(head, pack=pack_weights)
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            qkv_bias = torch.cat([w(a + "q_proj.bias"), w(a + "k_proj.bias"),
                                  w(a + "v_proj.bias")]) if config.attention_bias else None
            self.layers.append(LayerWeights(
                input_norm=w(p + "input_layernorm.weight"),
                qkv=Linear(torch.cat([w(a + "q_proj.weight"), w(a + "k_proj.weight"),
                                      w(a + "v_proj.weight")]), qkv_bias, pack=pack_weights),
                o=Linear(w(a + "o_proj.weight"), pack=pack_weights),
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=Linear(torch.cat([w(m + "gate_proj.weight"), w(m + "up_proj.weight")]),
                               pack=pack_weights),
                down=Linear(w(m + "down_proj.weight"), pack=pack_weights),
            ))
        self.rotary = RotaryCache(config, device, dtype)
        self.scale = config.head_dim**-0.5
        self.decode_batching = "auto"  # "auto", "always" or "never"

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights read per forward (embedding lookup excluded)."""
        total = self.lm_head.weight.numel() + self.norm.numel()
        for lw in self.layers:
            total += lw.input_norm.numel() + lw.post_norm.numel()
            total += sum(lin.weight.numel() for lin in (lw.qkv, lw.o, lw.gate_up, lw.down))
        return total * self.dtype.itemsize

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # HF normalizes in float32 and rounds back before the weight multiply.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.config.rms_norm_eps)
        return weight * y.to(x.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, items: list[AttnItem],
                logit_rows: torch.Tensor,
                on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions [N]; returns float32 logits [len(logit_rows), V]."""
        c = self.config
        h_q, h_kv, d = c.num_heads, c.num_kv_heads, c.head_dim
        x = self.embed[input_ids]  # [N, hidden]
        cos, sin = self.rotary.lookup(positions)  # [N, 1, D]
        attn_out = torch.empty(x.shape[0], c.q_size, device=x.device, dtype=x.dtype)  # [N, H D]
        batches, items = self._decode_batches(items)
        for layer, lw in enumerate(self.layers):
            h = self._rms_norm(x, lw.input_norm)
            qkv = lw.qkv(h)  # [N, (H + 2 Hkv) D]
            # Rotate q and k heads in one pass: they are adjacent in qkv.
            qk = apply_rotary(qkv[:, : c.q_size + c.kv_size].view(-1, h_q + h_kv, d), cos, sin)
            q, k = qk[:, :h_q], qk[:, h_q:]  # [N, H, D], [N, Hkv, D]
            v = qkv[:, c.q_size + c.kv_size :].view(-1, h_kv, d)  # [N, Hkv, D]
            for it in items:
                self._attend(layer, it, q, k, v, attn_out)
            for batch, rows in batches:
                if isinstance(rows, slice):
                    batch.attend(layer, q[rows], k[rows], v[rows], self.scale, attn_out[rows])
                else:
                    res = attn_out.new_empty(rows.numel(), c.q_size)
                    batch.attend(layer, q.index_select(0, rows), k.index_select(0, rows),
                                 v.index_select(0, rows), self.scale, res)
                    attn_out.index_copy_(0, rows, res)
            if on_layer_done is not None:
                on_layer_done(layer)
            x = x + lw.o(attn_out)
            h = self._rms_norm(x, lw.post_norm)
            gate, up = lw.gate_up(h).chunk(2, dim=-1)  # [N, I] each
            x = x + lw.down(F.silu(gate) * up)
        h = self._rms_norm(x[logit_rows], self.norm)  # [B, hidden]
        return self.lm_head(h).float()  # [B, V]

    def _decode_batches(self, items: list[AttnItem]
                        ) -> tuple[list[tuple[DecodeBatch, slice | torch.Tensor]], list[AttnItem]]:
        """The decode tokens to attend batched, as ``DecodeBatch``es with their
        packed rows, and the items left to attend one by one. Batched tokens go
        in order of length, grouped so one gather (padded to the group's
        longest) holds at most ``GATHER_BYTES`` a layer: a long context pads only
        the long ones."""
        chosen = self._batchable([it for it in items if it.is_decode])
        if not chosen:
            return [], items
        chosen.sort(key=lambda it: it.start)
        row_bytes = 2 * self.config.kv_size * self.dtype.itemsize  # K and V of a token
        groups: list[list[AttnItem]] = [[]]
        for it in chosen:  # ascending length: the newcomer is the group's longest
            if groups[-1] and (len(groups[-1]) + 1) * (it.start + 1) * row_bytes > GATHER_BYTES:
                groups.append([])
            groups[-1].append(it)
        batched = {id(it) for it in chosen}
        return ([(self._decode_batch(g), self._rows(g)) for g in groups],
                [it for it in items if id(it) not in batched])

    def _rows(self, group: list[AttnItem]) -> slice | torch.Tensor:
        """The group's packed rows: a slice where they are consecutive (no copy)."""
        rows = [it.rows.start for it in group]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _decode_batch(self, group: list[AttnItem]) -> DecodeBatch:
        gens = [it.gen_kv for it in group if it.gen_kv is not None]
        assert len(gens) == len(group)
        return DecodeBatch(
            group[0].prompt_kv,
            prompt_offsets=[int(it.prompt_kv.storage_offset()) for it in group],
            prompt_tokens=[int(it.prompt_kv.shape[2]) for it in group],
            gen_offsets=[int(g.storage_offset()) for g in gens],
            gen_slots=[int(g.shape[2]) for g in gens],
            slots=[it.slot for it in group],
            num_kv_heads=self.config.num_kv_heads, head_dim=self.config.head_dim)

    def _batchable(self, decodes: list[AttnItem]) -> list[AttnItem]:
        """The decode tokens for which one gather beats kernels per sequence."""
        if self.decode_batching != "auto":
            return list(decodes) if self.decode_batching == "always" else []
        if self.device.type != "cpu":
            return list(decodes)  # a kernel launch costs more than copying any one KV
        # On a CPU the per-sequence kernels cost ~50-100 us a sequence and
        # layer; the gather copies the K/V once more (~5-10 GB/s a core).
        # Measured break-even (decode_batch.py): ~256 KiB of K+V a sequence's layer.
        per_token = 2 * self.config.kv_size * self.dtype.itemsize
        short = [it for it in decodes if (it.start + 1) * per_token <= CPU_GATHER_MAX_BYTES]
        return short if len(short) >= 2 else []

    def _attend(self, layer: int, it: AttnItem, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, out: torch.Tensor) -> None:
        r = it.rows
        if it.is_decode:
            row = r.start
            k_prompt, v_prompt, k_gen, v_gen, kv_slot = it.decode_views
            slot = kv_slot[layer]  # [2, Hkv, D]
            slot[0] = k[row]
            slot[1] = v[row]
            decode_attention(q[row], k_prompt[layer], v_prompt[layer], k_gen[layer],
                             v_gen[layer], self.scale, out[row])
        else:
            end = it.start + it.num_tokens
            kv = it.prompt_kv[layer]  # [2, Tp, Hkv, D]
            kv[0, it.start : end] = k[r]
            kv[1, it.start : end] = v[r]
            out[r] = prefill_attention(q[r], kv[0, :end], kv[1, :end], it.start, self.scale)
