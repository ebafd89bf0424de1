"""Checkpoint formats and layouts the loader accepts, and the errors it gives for broken ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import ModelLoadError
from engine.models.loader import checkpoint_files, resolve_model_dir
from tests.conftest import load_cpu


def _copy_metadata(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copyfile(path, target / path.name)
    return target


def _logits(model_dir: Path) -> torch.Tensor:
    ids = torch.arange(4, 40).reshape(2, 18)
    return load_cpu(model_dir).model.score(ids)


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors")), _logits(tiny_model_dir)


def test_sharded_safetensors_with_index(tiny_model_dir, reference, tmp_path) -> None:
    tensors, expected = reference
    target = _copy_metadata(tiny_model_dir, tmp_path / "sharded")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file_name, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(target / file_name))
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [p.name for p in checkpoint_files(target)] == list(halves)
    assert torch.equal(_logits(target), expected)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_with_original_opt_names(tiny_model_dir, reference, tmp_path, sharded: bool) -> None:
    tensors, expected = reference
    target = _copy_metadata(tiny_model_dir, tmp_path / "bin")
    # The original OPT .bin files name tensors without the "model." prefix.
    renamed = {k.removeprefix("model."): v.clone() for k, v in tensors.items()}
    if not sharded:
        torch.save(renamed, target / "pytorch_model.bin")
    else:
        names = sorted(renamed)
        parts = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
        for file_name, keys in parts.items():
            torch.save({k: renamed[k] for k in keys}, target / file_name)
        weight_map = {k: f for f, keys in parts.items() for k in keys}
        (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(_logits(target), expected)


def test_float16_checkpoint_loads_into_float32_model(tiny_model_dir, reference, tmp_path) -> None:
    tensors, _ = reference
    target = _copy_metadata(tiny_model_dir, tmp_path / "fp16")
    save_file({k: v.half() for k, v in tensors.items()}, str(target / "model.safetensors"))
    loaded = load_cpu(target)
    assert loaded.dtype == torch.float32
    embed = loaded.model.decoder.embed_tokens.weight
    assert torch.equal(embed, tensors["model.decoder.embed_tokens.weight"].half().float())


def test_missing_tensor_is_named(tiny_model_dir, reference, tmp_path) -> None:
    tensors, _ = reference
    target = _copy_metadata(tiny_model_dir, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if "layers.2.fc2.bias" not in k}, str(target / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors: decoder\.layers\.2\.fc2\.bias"):
        load_cpu(target)


def test_wrong_shape_is_named(tiny_model_dir, reference, tmp_path) -> None:
    tensors, _ = reference
    target = _copy_metadata(tiny_model_dir, tmp_path / "shape")
    bad = dict(tensors)
    bad["model.decoder.layers.0.fc1.weight"] = torch.zeros(3, 3)
    save_file(bad, str(target / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"fc1\.weight.*shape \(3, 3\)"):
        load_cpu(target)


def test_unknown_tensor_is_rejected(tiny_model_dir, reference, tmp_path) -> None:
    tensors, _ = reference
    target = _copy_metadata(tiny_model_dir, tmp_path / "extra")
    save_file({**tensors, "model.decoder.layers.0.rotary.inv_freq": torch.ones(4)}, str(target / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="does not belong"):
        load_cpu(target)


def test_directory_without_weights(tiny_model_dir, tmp_path) -> None:
    target = _copy_metadata(tiny_model_dir, tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="no weights"):
        load_cpu(target)


def test_model_names(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"model directory not found: \./nowhere"):
        resolve_model_dir("./nowhere")
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_dir(str(tmp_path / "absent"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_dir(str(tmp_path / "file"))


def test_hub_name_offline_gives_a_clear_error(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="could not be fetched from the Hugging Face hub"):
        resolve_model_dir("facebook/opt-125m-smoothserve-test-absent")


def test_hub_download_fetches_weights_only_when_needed(monkeypatch, tmp_path) -> None:
    """Random weights need config and tokenizer files only; a cached copy without weights (from a random
    run) does not satisfy a real load, which then downloads them."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    config_only = tmp_path / "snapshot"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    calls: list[dict] = []

    def fake_snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None):
        calls.append({"local_files_only": local_files_only, "allow_patterns": allow_patterns})
        return str(config_only)

    class FakeApi:
        def list_repo_files(self, repo_id, revision=None):
            return ["config.json", "model.safetensors"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert resolve_model_dir("facebook/opt-13b", weights=False) == config_only
    assert calls == [{"local_files_only": True, "allow_patterns": None}]  # the cached configs serve
    calls.clear()
    resolve_model_dir("facebook/opt-13b")
    assert calls[-1] == {"local_files_only": False, "allow_patterns": ["*.json", "*.txt", "*.safetensors"]}


def test_shards_are_read_one_at_a_time(tiny_model_dir, reference, tmp_path) -> None:
    """The second shard is not opened before the first one's tensors have been consumed."""
    from engine.models.loader import iterate_checkpoint

    tensors, _ = reference
    first = tmp_path / "model-00001-of-00002.safetensors"
    second = tmp_path / "model-00002-of-00002.safetensors"
    save_file(tensors, str(first))
    second.write_bytes(b"not a safetensors file")
    stream = iterate_checkpoint([first, second])
    consumed = [next(stream) for _ in range(len(tensors))]
    assert {name for name, _ in consumed} == set(tensors)
    with pytest.raises(ModelLoadError, match="cannot read safetensors file model-00002"):
        next(stream)
