"""Find, read and stream an OPT checkpoint into a model, one shard at a time.

The model is built on the meta device, given uninitialized storage on the target device, and then
filled tensor by tensor as each shard is read, so the weights never exist twice in memory. A W8A8
checkpoint (one with `quant_config.json`) gets its int8 layer layout before the weights arrive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engine.config import ModelConfig, QuantConfig
from engine.errors import ModelLoadError
from engine.models.opt import OPTArchitecture, OPTForCausalLM

logger = logging.getLogger(__name__)

QUANT_CONFIG_FILE = "quant_config.json"
QUANT_FORMAT = "smoothserve-w8a8"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    model: OPTForCausalLM
    arch: OPTArchitecture
    quant: QuantConfig | None  # set when the checkpoint is W8A8
    model_dir: Path
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # half precision where it is fast; CPUs compute float32 best
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def resolve_model_dir(name: str, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face hub name, downloaded (or found in the cache)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path {name} is a file, not a directory")
    if name.startswith((".", "/", "~")) or not _HUB_NAME.match(name):
        raise ModelLoadError(f"model directory not found: {name}")
    return _download_from_hub(name, revision)


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download

    try:  # a copy already in the local Hugging Face cache needs no network
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"model {repo_id!r} is not a local directory, not in the Hugging Face cache, and could not be fetched "
            "from the Hugging Face hub (HF_HUB_OFFLINE is set); download it first and pass its directory"
        )
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.txt", weights]))
    except Exception as error:  # network, auth, unknown repo: all mean "cannot get it"
        raise ModelLoadError(
            f"model {repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}); download it first and pass its directory"
        ) from None


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} {path} must hold a JSON object")
    return data


def read_architecture(model_dir: Path) -> OPTArchitecture:
    return OPTArchitecture.from_hf_config(read_json(model_dir / "config.json", "model config"))


def read_quant_config(model_dir: Path) -> QuantConfig | None:
    path = model_dir / QUANT_CONFIG_FILE
    if not path.exists():
        return None
    data = read_json(path, "quantization config")
    if data.pop("format", None) != QUANT_FORMAT:
        raise ModelLoadError(f"{path} is not a smoothserve W8A8 quantization config")
    data.pop("version", None)
    try:
        return QuantConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"invalid quantization config {path}: {error}") from None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files in load order: an index's shards, else every safetensors or .bin file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = model_dir / index_name
        if index_path.exists():
            weight_map = read_json(index_path, "checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"checkpoint index {index_path} has no weight_map")
            shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [p.name for p in shards if not p.exists()]
            if missing:
                raise ModelLoadError(f"checkpoint index {index_path.name} names missing shards: {missing}")
            return shards
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return found
    raise ModelLoadError(f"no weights in {model_dir} (expected *.safetensors or pytorch_model*.bin)")


def iterate_checkpoint(files: list[Path], desc: str = "Loading weights") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) for every tensor, reading one shard at a time."""
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc=desc) as bar:
        for path in files:
            reader = _read_safetensors if path.suffix == ".safetensors" else _read_torch_bin
            for name, tensor in reader(path):
                yield name, tensor
                bar.update(tensor.numel() * tensor.element_size())


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                yield name, shard.get_tensor(name)
    except ModelLoadError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise ModelLoadError(f"cannot read safetensors file {path.name}: {error}") from None


def _read_torch_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot read PyTorch weight file {path.name}: {error}") from None
    names = list(state)
    for name in names:
        yield name, state.pop(name)  # drop our reference as we go


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def empty_model(arch: OPTArchitecture, quant: QuantConfig | None, dtype: torch.dtype) -> OPTForCausalLM:
    """The model's module tree on the meta device (no storage), in W8A8 layout if `quant` is set."""
    from engine.quant.quantize import apply_w8a8_layout

    with torch.device("meta"), default_dtype(dtype):
        model = OPTForCausalLM(arch)
        if quant is not None:
            apply_w8a8_layout(model, quant)
    return model


def load_model(config: ModelConfig) -> LoadedModel:
    """Read config.json (and quant_config.json), build the model, and stream the weights into it."""
    model_dir = resolve_model_dir(config.model, config.revision)
    arch = read_architecture(model_dir)
    quant = read_quant_config(model_dir)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    files = checkpoint_files(model_dir)

    model = empty_model(arch, quant, dtype).to_empty(device=device)
    written = model.load_weights(iterate_checkpoint(files))
    missing = model.missing_weights(written)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint in {model_dir} lacks {len(missing)} tensors: {shown}")
    model.eval()
    logger.info("loaded %s (%s, %s, %s)", model_dir, "W8A8 " + quant.level if quant else "float", dtype, device)
    return LoadedModel(model=model, arch=arch, quant=quant, model_dir=model_dir, device=device, dtype=dtype)
