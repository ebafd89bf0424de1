"""The frozen configuration tree, built once (by the CLI or the `LLM` constructor) and passed down.

Values found at run time (the number of KV blocks, the resolved model directory) are returned by the
code that finds them, never written back here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.errors import ConfigError

QuantLevel = Literal["O1", "O2", "O3"]
WeightGranularity = Literal["per_channel", "per_tensor"]
ActivationQuant = Literal["per_token", "per_tensor_dynamic", "per_tensor_static"]
DType = Literal["auto", "float16", "bfloat16", "float32"]
LoadFormat = Literal["auto", "random"]
KVCacheDType = Literal["auto", "int8"]

QUANT_LEVELS: tuple[str, ...] = ("O1", "O2", "O3")
WEIGHT_GRANULARITIES: tuple[str, ...] = ("per_channel", "per_tensor")
DTYPES: tuple[str, ...] = ("auto", "float16", "bfloat16", "float32")
LOAD_FORMATS: tuple[str, ...] = ("auto", "random")
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "int8")

# SmoothQuant paper, Table 2: how activations are quantized at each level.
ACTIVATION_QUANT_BY_LEVEL: dict[str, ActivationQuant] = {
    "O1": "per_token",
    "O2": "per_tensor_dynamic",
    "O3": "per_tensor_static",
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class CalibrationConfig:
    """Where activation statistics came from; recorded in every W8A8 checkpoint."""

    dataset: str
    num_samples: int = 128
    seq_len: int = 512

    def __post_init__(self) -> None:
        _require(bool(self.dataset), "calibration dataset name must not be empty")
        _require(self.num_samples >= 1, f"calibration num_samples must be >= 1, got {self.num_samples}")
        _require(self.seq_len >= 2, f"calibration seq_len must be >= 2, got {self.seq_len}")


@dataclass(frozen=True)
class QuantConfig:
    """How a model is (or was) turned into W8A8.

    `alpha=None` means naive W8A8: quantized without smoothing (the baseline SmoothQuant beats).
    """

    level: QuantLevel = "O1"
    alpha: float | None = 0.5
    weight_granularity: WeightGranularity = "per_channel"
    calibration: CalibrationConfig | None = None

    def __post_init__(self) -> None:
        _require(self.level in QUANT_LEVELS, f"quantization level must be one of {QUANT_LEVELS}, got {self.level!r}")
        _require(
            self.weight_granularity in WEIGHT_GRANULARITIES,
            f"weight granularity must be one of {WEIGHT_GRANULARITIES}, got {self.weight_granularity!r}",
        )
        if self.alpha is not None:
            _require(0.0 <= self.alpha <= 1.0, f"smoothing alpha must be in [0, 1], got {self.alpha}")

    @property
    def activation_quant(self) -> ActivationQuant:
        return ACTIVATION_QUANT_BY_LEVEL[self.level]

    @property
    def smoothed(self) -> bool:
        return self.alpha is not None

    @property
    def needs_calibration(self) -> bool:
        """Smoothing needs per-channel statistics; O3 needs static per-tensor scales."""
        return self.smoothed or self.level == "O3"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        _require(not unknown, f"unknown quantization config keys: {sorted(unknown)}")
        calibration = data.get("calibration")
        return cls(
            **{k: v for k, v in data.items() if k != "calibration"},
            calibration=CalibrationConfig(**calibration) if calibration else None,
        )


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how to run it.

    `model` is a local directory or a Hugging Face hub name (e.g. `facebook/opt-13b`).
    `quantization`: None runs the checkpoint as stored (a W8A8 checkpoint runs W8A8; an FP16 one runs
    FP16); "w8a8" additionally asks for W8A8 and, for an FP16 checkpoint, quantizes it in memory with
    `quant`.
    `load_format="random"` reads no weights: random ones (W8A8 layout with `quantization="w8a8"`, not
    calibrated) for benchmarking; `model` may then also be `random:<shape>` (e.g. `random:opt-175b`).
    """

    model: str
    tokenizer: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    quantization: Literal["w8a8"] | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    max_model_len: int | None = None
    seed: int = 0
    revision: str | None = None
    # Run every step eagerly; otherwise decode steps on a GPU replay captured CUDA graphs.
    enforce_eager: bool = False
    load_format: LoadFormat = "auto"

    def __post_init__(self) -> None:
        _require(bool(self.model), "model must name a directory or a hub model")
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.quantization in (None, "w8a8"), f"quantization must be None or 'w8a8', got {self.quantization!r}")
        _require(
            self.load_format in LOAD_FORMATS, f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}"
        )
        if self.max_model_len is not None:
            _require(self.max_model_len >= 1, f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    num_cpu_blocks: int | None = None  # KV blocks when running on the CPU (no memory profiling there)
    # "auto": keys and values in the model's dtype; "int8": quantized per (token, head), half the bytes
    # (twice the tokens in the same memory, half the bytes for decode attention to read).
    kv_cache_dtype: KVCacheDType = "auto"

    def __post_init__(self) -> None:
        _require(self.block_size in (8, 16, 32), f"block_size must be 8, 16 or 32, got {self.block_size}")
        _require(
            0.0 < self.gpu_memory_utilization <= 1.0,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _require(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}",
        )

    @property
    def quantized_kv(self) -> bool:
        return self.kv_cache_dtype == "int8"


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1")
        _require(self.collective_timeout_s > 0, f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # never printed with the config
    served_model_name: str | None = None
    max_queued_requests: int = 1024
    max_queued_tokens: int | None = None
    metrics_public: bool = False
    cors_origins: tuple[str, ...] = ()
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        _require(self.max_queued_requests >= 1, "max_queued_requests must be >= 1")
        _require(self.max_queued_tokens is None or self.max_queued_tokens >= 1, "max_queued_tokens must be >= 1")
        _require(self.shutdown_timeout_s >= 0, "shutdown_timeout_s must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
