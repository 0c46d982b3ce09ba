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

import torch
import torch.nn.functional as F

from pdserve.engine.attention import decode_attention, prefill_attention
from pdserve.engine.config import ModelConfig
from pdserve.engine.linear import Linear
from pdserve.engine.rope import RotaryCache, apply_rotary


@dataclass
class AttnItem:
    """One sequence's share of a forward: a prompt chunk or one decode token."""

    rows: slice  # its rows in the packed [N, ...] tensors
    start: int  # position of its first token
    prompt_kv: torch.Tensor  # [L, 2, Tp, Hkv, D] view into the arena
    gen_kv: torch.Tensor | None  # [L, 2, G, Hkv, D] view; used by decode items
    is_decode: bool

    def __post_init__(self) -> None:
        if not self.is_decode:
            return
        # Views a decode token needs in every layer, made once per step (all
        # views into the arena, nothing copied).
        assert self.gen_kv is not None and self.num_tokens == 1
        slot = self.start - self.prompt_kv.shape[2]  # generation slot of this token
        prompt = self.prompt_kv.transpose(2, 3).unsqueeze(2)  # [L, 2, 1, Hkv, Tp, D]
        gen = self.gen_kv[:, :, : slot + 1].transpose(2, 3).unsqueeze(2)  # [L, 2, 1, Hkv, n, D]
        self.k_prompt, self.v_prompt = prompt[:, 0], prompt[:, 1]
        self.k_gen, self.v_gen = gen[:, 0], gen[:, 1]
        self.kv_slot = self.gen_kv[:, :, slot]  # [L, 2, Hkv, D]: where this token's K/V go

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
        for layer, lw in enumerate(self.layers):
            h = self._rms_norm(x, lw.input_norm)
            qkv = lw.qkv(h)  # [N, (H + 2 Hkv) D]
            # Rotate q and k heads in one pass: they are adjacent in qkv.
            qk = apply_rotary(qkv[:, : c.q_size + c.kv_size].view(-1, h_q + h_kv, d), cos, sin)
            q, k = qk[:, :h_q], qk[:, h_q:]  # [N, H, D], [N, Hkv, D]
            v = qkv[:, c.q_size + c.kv_size :].view(-1, h_kv, d)  # [N, Hkv, D]
            for it in items:
                self._attend(layer, it, q, k, v, attn_out)
            if on_layer_done is not None:
                on_layer_done(layer)
            x = x + lw.o(attn_out)
            h = self._rms_norm(x, lw.post_norm)
            gate, up = lw.gate_up(h).chunk(2, dim=-1)  # [N, I] each
            x = x + lw.down(F.silu(gate) * up)
        h = self._rms_norm(x[logit_rows], self.norm)  # [B, hidden]
        return self.lm_head(h).float()  # [B, V]

    def _attend(self, layer: int, it: AttnItem, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, out: torch.Tensor) -> None:
        r = it.rows
        if it.is_decode:
            row = r.start
            slot = it.kv_slot[layer]  # [2, Hkv, D]
            slot[0] = k[row]
            slot[1] = v[row]
            decode_attention(q[row], it.k_prompt[layer], it.v_prompt[layer], it.k_gen[layer],
                             it.v_gen[layer], self.scale, out[row])
        else:
            end = it.start + it.num_tokens
            kv = it.prompt_kv[layer]  # [2, Tp, Hkv, D]
            kv[0, it.start : end] = k[r]
            kv[1, it.start : end] = v[r]
            out[r] = prefill_attention(q[r], kv[0, :end], kv[1, :end], it.start, self.scale)
