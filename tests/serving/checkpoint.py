"""The tiny preset with other seeded weights, saved as a Hugging Face checkpoint dir.

Same architecture and KV layout as ``tiny``, different weights: what a rolling
upgrade test rolls onto (a greedy output tells old from new weights).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from pdserve.engine import PRESETS
from pdserve.engine.weights import random_state_dict
from tests.engine.hf_util import write_tokenizer


def save_tiny(path: Path, seed: int) -> Path:
    cfg = PRESETS["tiny"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_context,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids), "hidden_act": "silu",
    }))
    state = {k: v.contiguous() for k, v in random_state_dict(cfg, seed).items()}
    save_file(state, str(path / "model.safetensors"))
    write_tokenizer(path)  # instances never tokenize (the router sends ids)
    return path
