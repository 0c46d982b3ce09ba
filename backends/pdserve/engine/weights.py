"""Weights in Hugging Face naming: seeded random init for presets, safetensors
checkpoints (single or sharded) for real models, and the checks between them.

Everything here returns a ``dict[str, Tensor]`` keyed by HF names, so the
model code has one input format and presets export to transformers verbatim.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pdserve.engine.config import ModelConfig
from pdserve.errors import InvalidArgument

# Tensors some checkpoints carry that hold nothing we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = config
    shapes: dict[str, tuple[int, ...]] = {}
    shapes["model.embed_tokens.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "self_attn.q_proj.weight"] = (c.q_size, c.hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (c.kv_size, c.hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (c.kv_size, c.hidden_size)
        shapes[p + "self_attn.o_proj.weight"] = (c.hidden_size, c.q_size)
        if c.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (c.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (c.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (c.kv_size,)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    shapes["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def random_state_dict(config: ModelConfig, seed: int, *, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded float32 weights that give varied, non-degenerate greedy output.

    Linear layers use 1/sqrt(fan_in) scale (not HF's 0.02) so every layer
    changes the residual stream and next-token logits have unit spread, and
    the norms get a little noise; with 0.02 everywhere the model collapses to
    near-uniform logits and repeats one token.

    ``device``: draw them there (another generator: other values than the CPU's
    for the same seed; for an 8B model on a GPU, which the host would fill in
    minutes); ``dtype``: cast each tensor as it is drawn.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=gen, device=device)
        if "layernorm" in name or name == "model.norm.weight":
            t = 1.0 + 0.1 * t
        elif name.endswith(".bias"):
            t = 0.02 * t
        elif name != "model.embed_tokens.weight":
            t = t / shape[-1] ** 0.5
        state[name] = t if dtype is None else t.to(dtype)
    return state


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise InvalidArgument(f"{index} is malformed: {e}") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise InvalidArgument(f"shard {f.name} listed in {index.name} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidArgument(f"no *.safetensors files in {model_dir}")
    return files


def load_state_dict(model_dir: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, checked against the config (names and shapes)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    state: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    state[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own untyped errors
            raise InvalidArgument(f"cannot read {path.name}: {e}") from None
    check_state_dict(state, config)
    return state


def check_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Raise InvalidArgument naming the first missing, misshaped or unknown tensor."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise InvalidArgument(f"checkpoint is missing tensor {name!r} (shape {list(shape)})")
        if tuple(state[name].shape) != shape:
            raise InvalidArgument(
                f"tensor {name!r} has shape {list(state[name].shape)}, expected {list(shape)}"
            )
    for name in state:
        tied_head = name == "lm_head.weight" and config.tie_word_embeddings
        if name not in expected and not tied_head and not name.endswith(_IGNORED_SUFFIXES):
            raise InvalidArgument(f"checkpoint has unexpected tensor {name!r}")


def fingerprint(state: dict[str, torch.Tensor], config: ModelConfig, dtype: str) -> str:
    """A short hash of the config, dtype and every weight's bytes (as loaded)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(config).encode())
    h.update(dtype.encode())
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
