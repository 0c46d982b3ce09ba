"""Loading HF checkpoints: sharded files, tokenizer.json, and clear errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.engine import LLMEngine, SamplingParams, generate
from pdserve.errors import InvalidArgument
from tests.engine.hf_util import save_checkpoint


def test_sharded_checkpoint_loads_and_matches_single(tmp_path: Path) -> None:
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    save_checkpoint(single, "llama", seed=3)
    save_checkpoint(sharded, "llama", seed=3, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = LLMEngine.load(str(single)), LLMEngine.load(str(sharded))
    assert a.fingerprint == b.fingerprint
    prompt = [1, 5, 9, 200, 17]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert generate(a, [prompt], params) == generate(b, [prompt], params)


def test_tokenizer_json_loads_through_tokenizers(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "llama")
    engine = LLMEngine.load(str(tmp_path))
    ids = engine.tokenizer.encode("the cat sat on the mat")
    assert ids[0] == 1 and len(ids) == 7  # BOS + six words
    assert engine.tokenizer.decode(ids) == "the cat sat on the mat"
    assert engine.tokenizer.eos_token_ids == (2,)


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "llama")
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(InvalidArgument, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        LLMEngine.load(str(tmp_path))


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "llama")

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)

    _rewrite(tmp_path, shrink)
    with pytest.raises(InvalidArgument, match=r"k_proj\.weight' has shape \[8, 64\], expected"):
        LLMEngine.load(str(tmp_path))


def test_unknown_rope_scaling_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgument, match="rope_scaling type 'yarn' is not supported"):
        LLMEngine.load(str(tmp_path))


def test_legacy_rope_fields_are_read(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 1234.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert LLMEngine.load(str(tmp_path)).config.rope_theta == 1234.0


def test_bad_model_and_device_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="preset"):
        LLMEngine.load("no-such-model")
    with pytest.raises(InvalidArgument, match=r"config\.json"):
        LLMEngine.load(str(tmp_path))
    with pytest.raises(InvalidArgument, match="device"):
        LLMEngine.load("tiny", device="tpu:0")
    with pytest.raises(InvalidArgument, match="dtype"):
        LLMEngine.load("tiny", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="CUDA"):
            LLMEngine.load("tiny", device="cuda:0")
    with pytest.raises(InvalidArgument, match="npu"):
        LLMEngine.load("tiny", device="npu:0")
