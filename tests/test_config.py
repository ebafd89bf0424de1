"""The frozen configuration tree validates its values and round-trips the quantization recipe."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import CacheConfig, CalibrationConfig, EngineConfig, ModelConfig, QuantConfig, ServerConfig
from engine.errors import ConfigError


def test_configs_are_frozen() -> None:
    config = EngineConfig(model=ModelConfig(model="facebook/opt-13b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.dtype = "float32"  # type: ignore[misc]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: QuantConfig(level="O4"), "quantization level"),
        (lambda: QuantConfig(alpha=1.5), "alpha"),
        (lambda: QuantConfig(weight_granularity="per_group"), "weight granularity"),
        (lambda: CalibrationConfig("x", num_samples=0), "num_samples"),
        (lambda: ModelConfig(model="m", dtype="float8"), "dtype"),
        (lambda: ModelConfig(model="m", quantization="int4"), "quantization"),
        (lambda: CacheConfig(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (lambda: CacheConfig(kv_cache_dtype="fp8"), "kv_cache_dtype must be one of auto, int8"),
        (lambda: ServerConfig(port=70000), "port"),
    ],
)
def test_invalid_values_are_rejected(build, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_levels_map_to_activation_quantization() -> None:
    assert QuantConfig(level="O1").activation_quant == "per_token"
    assert QuantConfig(level="O2").activation_quant == "per_tensor_dynamic"
    assert QuantConfig(level="O3").activation_quant == "per_tensor_static"
    assert not QuantConfig(level="O1", alpha=None).needs_calibration
    assert QuantConfig(level="O3", alpha=None).needs_calibration


def test_quant_config_round_trips_through_a_dict() -> None:
    quant = QuantConfig(level="O3", alpha=0.8, weight_granularity="per_tensor",
                        calibration=CalibrationConfig("pile.jsonl", 512, 512))  # fmt: skip
    assert QuantConfig.from_dict(quant.to_dict()) == quant
    with pytest.raises(ConfigError, match="unknown"):
        QuantConfig.from_dict({**quant.to_dict(), "bits": 4})


def test_api_key_is_not_in_the_repr() -> None:
    assert "secret" not in repr(ServerConfig(api_key="secret"))
