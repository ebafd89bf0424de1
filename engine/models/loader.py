"""Find, read and stream an OPT checkpoint into a model, one shard at a time.

The model is built on the meta device, given uninitialized storage on the target device, and then
filled tensor by tensor as each shard is read, so the weights never exist twice in memory. A W8A8
checkpoint (one with `quant_config.json`) gets its int8 layer layout before the weights arrive.

Under tensor parallelism each rank builds its share of the model (`Shard`) and reads only its slice of
every safetensors tensor. `load_format="random"` reads no weights at all: the model (W8A8 layout too)
is filled with random values on its device, to benchmark shapes without a checkpoint; the model is then
a directory or hub name with a config.json, or `random:<shape>` with a shape of
`engine.models.shapes.OPT_SHAPES` (e.g. `random:opt-175b`, which needs `ModelConfig.tokenizer`).
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
from engine.distributed.sharding import EVERYTHING, UNSHARDED, Shard
from engine.errors import ModelLoadError
from engine.models.opt import OPTArchitecture, OPTForCausalLM, TensorSource

logger = logging.getLogger(__name__)

QUANT_CONFIG_FILE = "quant_config.json"
QUANT_FORMAT = "smoothserve-w8a8"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RANDOM_SHAPE_PREFIX = "random:"
# Random W8A8 weights: int8 uniform in [-127, 127] (std ~73) times this scale has the std (0.02) of OPT's
# initialization; static activation scales fit LayerNorm outputs of magnitude ~5.
RANDOM_WEIGHT_STD = 0.02
RANDOM_INT8_WEIGHT_SCALE = RANDOM_WEIGHT_STD / 73.3
RANDOM_ACTIVATION_SCALE = 5.0 / 127


@dataclass(frozen=True)
class LoadedModel:
    model: OPTForCausalLM
    arch: OPTArchitecture
    quant: QuantConfig | None  # set when the checkpoint is W8A8
    model_dir: Path | None  # None only for a `random:<shape>` model
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


def resolve_model_dir(name: str, revision: str | None = None, weights: bool = True) -> Path:
    """A local directory as is; otherwise a Hugging Face hub name, downloaded (or found in the cache).
    `weights=False` fetches the configuration and tokenizer files only (random weights need no more)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path {name} is a file, not a directory")
    if name.startswith((".", "/", "~")) or not _HUB_NAME.match(name):
        raise ModelLoadError(f"model directory not found: {name}")
    return _download_from_hub(name, revision, weights)


def _download_from_hub(repo_id: str, revision: str | None, weights: bool) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download

    try:  # a copy already in the local Hugging Face cache needs no network
        cached = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        # (a cached copy made for random weights holds no weight files: fetch them now)
        if not weights or any(cached.glob("*.safetensors")) or any(cached.glob("*.bin")):
            return cached
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"model {repo_id!r} is not a local directory, not in the Hugging Face cache, and could not be fetched "
            "from the Hugging Face hub (HF_HUB_OFFLINE is set); download it first and pass its directory"
        )
    try:
        patterns = ["*.json", "*.txt"]
        if weights:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            patterns.append("*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin")
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
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


def iterate_checkpoint(files: list[Path], desc: str = "Loading weights") -> Iterator[tuple[str, TensorSource]]:
    """Yield (name, tensor source) for every tensor, one shard file at a time; a safetensors tensor is read
    when indexed, and only the part indexed (a tensor-parallel rank's slice)."""
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc=desc) as bar:
        for path in files:
            reader = _read_safetensors if path.suffix == ".safetensors" else _read_torch_bin
            yield from reader(path)
            bar.update(path.stat().st_size)


class _SafetensorsTensor:
    """One tensor of an open safetensors file; indexing reads just that part from the file."""

    def __init__(self, handle: Any, name: str, path: Path) -> None:
        self._handle, self._name, self._path = handle, name, path
        self.shape = tuple(handle.get_slice(name).get_shape())

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        try:
            if index == EVERYTHING:
                return self._handle.get_tensor(self._name)
            return self._handle.get_slice(self._name)[index]
        except Exception as error:
            raise ModelLoadError(f"cannot read {self._name} from safetensors file {self._path.name}: {error}") from None


def _read_safetensors(path: Path) -> Iterator[tuple[str, TensorSource]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                yield name, _SafetensorsTensor(shard, name, path)
    except ModelLoadError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise ModelLoadError(f"cannot read safetensors file {path.name}: {error}") from None


def _read_torch_bin(path: Path) -> Iterator[tuple[str, TensorSource]]:
    # A .bin file is a pickle, which cannot be read in parts: it is loaded whole (memory-mapped where the
    # format allows) and a tensor-parallel rank then copies only its slice of each tensor.
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


def empty_model(
    arch: OPTArchitecture, quant: QuantConfig | None, dtype: torch.dtype, shard: Shard = UNSHARDED
) -> OPTForCausalLM:
    """The model's module tree (this rank's share of it) on the meta device (no storage), in W8A8 layout
    if `quant` is set."""
    from engine.quant.quantize import apply_w8a8_layout

    with torch.device("meta"), default_dtype(dtype):
        model = OPTForCausalLM(arch, shard)
        if quant is not None:
            apply_w8a8_layout(model, quant)
    return model


@torch.no_grad()
def fill_random(model: OPTForCausalLM, seed: int) -> None:
    """Random weights of OPT's initialization scale (int8 ones with small scales in the W8A8 layout),
    generated on the model's device; LayerNorms are the identity. The same seed gives every
    tensor-parallel rank the same replicated tensors."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if tensor.dtype == torch.int8:
            tensor.random_(-127, 128, generator=generator)
        elif name.endswith("weight_scale"):
            tensor.fill_(RANDOM_INT8_WEIGHT_SCALE)
        elif name.endswith(("input_scale", "output_scale")):
            tensor.fill_(RANDOM_ACTIVATION_SCALE)
        elif "layer_norm" in name:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, RANDOM_WEIGHT_STD, generator=generator)


def _random_shape_architecture(name: str) -> OPTArchitecture:
    from engine.models.shapes import OPT_SHAPES

    shape = OPT_SHAPES.get(name[len(RANDOM_SHAPE_PREFIX) :])
    if shape is None or shape.vocab_size is None:
        named = ", ".join(RANDOM_SHAPE_PREFIX + k for k, v in OPT_SHAPES.items() if v.vocab_size)
        raise ModelLoadError(f"unknown random model shape {name!r}; choose one of {named}")
    return OPTArchitecture.from_hf_config(shape.to_hf_config(shape.vocab_size))


def load_model(config: ModelConfig, shard: Shard = UNSHARDED, device: torch.device | None = None) -> LoadedModel:
    """Read config.json (and quant_config.json), build the model (this rank's share of it, on `device`,
    by default the configured one), and stream the weights into it, or fill it at random."""
    from engine.quant.quantize import chain_static_requantization

    random_shape = config.model.startswith(RANDOM_SHAPE_PREFIX)
    if random_shape and config.load_format != "random":
        raise ModelLoadError(f"{config.model!r} names a shape, not weights: it needs load_format 'random'")
    weights = config.load_format != "random"
    model_dir = None if random_shape else resolve_model_dir(config.model, config.revision, weights=weights)
    arch = _random_shape_architecture(config.model) if model_dir is None else read_architecture(model_dir)
    quant = None if model_dir is None else read_quant_config(model_dir)
    device = device or resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    if config.load_format == "random":
        quant = config.quant if config.quantization == "w8a8" else quant
        model = empty_model(arch, quant, dtype, shard).to_empty(device=device)
        fill_random(model, config.seed)
        chain_static_requantization(model)
        model.eval()
        logger.info("random %s weights for %s (%s, %s)", "W8A8" if quant else "float", config.model, dtype, device)
        return LoadedModel(model=model, arch=arch, quant=quant, model_dir=model_dir, device=device, dtype=dtype)

    assert model_dir is not None
    files = checkpoint_files(model_dir)
    model = empty_model(arch, quant, dtype, shard).to_empty(device=device)
    written = model.load_weights(iterate_checkpoint(files))
    missing = model.missing_weights(written)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint in {model_dir} lacks {len(missing)} tensors: {shown}")
    chain_static_requantization(model)
    model.eval()
    logger.info("loaded %s (%s, %s, %s)", model_dir, "W8A8 " + quant.level if quant else "float", dtype, device)
    return LoadedModel(model=model, arch=arch, quant=quant, model_dir=model_dir, device=device, dtype=dtype)
