"""quantize -> save -> load gives back the same int8 weights, scales and logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.config import CalibrationConfig, QuantConfig
from engine.layers.layernorm import QuantizingLayerNorm
from engine.layers.linear import W8A8Linear
from engine.quant.calibrate import calibrate
from engine.quant.checkpoint import save_w8a8
from engine.quant.quantize import smoothquant
from tests.conftest import load_cpu


@pytest.fixture(scope="module")
def float_model_and_stats(tiny_outlier_model_dir):
    loaded = load_cpu(tiny_outlier_model_dir)
    ids = torch.randint(4, loaded.arch.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return loaded, calibrate(loaded.model, ids, progress=False)


@pytest.mark.parametrize(
    "quant",
    [
        QuantConfig(level="O1", alpha=0.5, weight_granularity="per_channel"),
        QuantConfig(level="O2", alpha=None, weight_granularity="per_tensor"),
        QuantConfig(level="O3", alpha=0.5, weight_granularity="per_tensor"),
    ],
    ids=lambda q: f"{q.level}-{q.alpha}-{q.weight_granularity}",
)
@pytest.mark.parametrize("max_shard_bytes", [None, 400_000], ids=["one-file", "sharded"])
def test_round_trip_is_bit_identical(float_model_and_stats, tmp_path, quant: QuantConfig, max_shard_bytes) -> None:
    loaded, stats = float_model_and_stats
    quant = QuantConfig(**{**quant.__dict__, "calibration": CalibrationConfig("calib.jsonl", 4, 32)})
    model = copy.deepcopy(loaded.model)
    smoothquant(model, quant, stats)
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    out = save_w8a8(model, quant, tmp_path / "w8a8", loaded.model_dir, **kwargs)
    assert len(list(out.glob("*.safetensors"))) == (1 if max_shard_bytes is None else 3) or max_shard_bytes

    reloaded = load_cpu(out)
    assert reloaded.quant == quant
    original, restored = model.state_dict(), reloaded.model.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    assert any(t.dtype == torch.int8 for t in restored.values())
    assert isinstance(reloaded.model.decoder.layers[0].fc1, W8A8Linear)
    assert isinstance(reloaded.model.decoder.layers[0].final_layer_norm, QuantizingLayerNorm)
    ids = torch.randint(4, loaded.arch.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(reloaded.model.score(ids), model.score(ids))


def test_quant_config_records_the_recipe(float_model_and_stats, tmp_path) -> None:
    loaded, stats = float_model_and_stats
    quant = QuantConfig(level="O3", alpha=0.5, calibration=CalibrationConfig("pile-val.jsonl", 512, 512))
    model = copy.deepcopy(loaded.model)
    smoothquant(model, quant, stats)
    out = save_w8a8(model, quant, tmp_path / "w8a8", loaded.model_dir)
    record = json.loads((out / "quant_config.json").read_text())
    assert record["format"] == "smoothserve-w8a8"
    assert record["level"] == "O3" and record["alpha"] == 0.5 and record["weight_granularity"] == "per_channel"
    assert record["calibration"] == {"dataset": "pile-val.jsonl", "num_samples": 512, "seq_len": 512}
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()


def test_w8a8_checkpoint_is_about_half_the_float16_size(float_model_and_stats, tmp_path) -> None:
    loaded, stats = float_model_and_stats
    fp16 = copy.deepcopy(loaded.model).half()
    quantized = copy.deepcopy(fp16)
    smoothquant(quantized, QuantConfig(level="O1"), stats)
    linear_bytes = lambda m: sum(  # noqa: E731
        t.numel() * t.element_size() for n, t in m.state_dict().items() if ".layers." in n
    )
    assert 0.45 < linear_bytes(quantized) / linear_bytes(fp16) < 0.56
