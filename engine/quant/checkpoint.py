"""Save a W8A8 model: safetensors shards of its state dict, the OPT config.json, the tokenizer files,
and `quant_config.json` (level, alpha, granularity, calibration set). `engine.models.loader.load_model`
reads it back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.config import QuantConfig
from engine.errors import ModelLoadError
from engine.models.loader import QUANT_CONFIG_FILE, QUANT_FORMAT
from engine.models.opt import OPTForCausalLM

QUANT_FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def _shard(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_w8a8(
    model: OPTForCausalLM,
    quant: QuantConfig,
    out_dir: str | Path,
    source_dir: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the checkpoint; shards are copied to the CPU one at a time."""
    out, source = Path(out_dir), Path(source_dir)
    if out.resolve() == source.resolve():
        raise ModelLoadError("the output directory must differ from the source model directory")
    out.mkdir(parents=True, exist_ok=True)
    # Weights left by an earlier save would be read beside (or instead of) the new ones.
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json"), *out.glob("pytorch_model*.bin*")]:
        stale.unlink()
    shutil.copyfile(source / "config.json", out / "config.json")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)

    shards = _shard(model.state_dict(), max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for shard, file_name in zip(shards, names, strict=True):
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, str(out / file_name))
    if len(shards) > 1:
        weight_map = {key: file_name for shard, file_name in zip(shards, names, strict=True) for key in shard}
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    record = {"format": QUANT_FORMAT, "version": QUANT_FORMAT_VERSION, **quant.to_dict()}
    (out / QUANT_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out
