"""The smoothserve OPT model computes what Hugging Face transformers' OPT computes."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTForCausalLM as HFOPTForCausalLM

from engine.layers.attention import AttentionMetadata
from engine.models.loader import empty_model
from engine.models.opt import OPTArchitecture
from engine.models.shapes import OPT_SHAPES
from tests.conftest import load_cpu


def _hf_logits(model_dir, input_ids: torch.Tensor) -> torch.Tensor:
    hf = HFOPTForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids).logits


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_outlier_model_dir", "tiny_post_ln_model_dir"])
def test_logits_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    loaded = load_cpu(model_dir)
    input_ids = torch.randint(4, loaded.arch.vocab_size, (3, 57), generator=torch.Generator().manual_seed(0))
    ours = loaded.model.score(input_ids)
    theirs = _hf_logits(model_dir, input_ids)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_post_ln_model_has_projections_and_no_final_layer_norm(tiny_post_ln_model_dir) -> None:
    loaded = load_cpu(tiny_post_ln_model_dir)
    decoder = loaded.model.decoder
    assert decoder.project_in.weight.shape == (128, 64)
    assert decoder.project_out.weight.shape == (64, 128)
    assert decoder.final_layer_norm is None
    assert not decoder.layers[0].pre_layer_norm


def test_ragged_batch_equals_separate_forwards(tiny_model_dir) -> None:
    model = load_cpu(tiny_model_dir).model
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(4, 2000, (n,), generator=generator) for n in (5, 17, 1, 9)]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])
    metadata = AttentionMetadata.no_cache([len(s) for s in sequences])
    with torch.no_grad():
        batched = model.compute_logits(model(torch.cat(sequences), positions, metadata))
    separate = torch.cat([model.score(s[None])[0] for s in sequences])
    assert torch.allclose(batched, separate, atol=1e-5)


def test_attention_metadata_rejects_mismatched_batch(tiny_model_dir) -> None:
    model = load_cpu(tiny_model_dir).model
    with pytest.raises(ValueError, match="tokens"):
        model(torch.tensor([5, 6, 7]), torch.arange(3), AttentionMetadata.no_cache([2]))


# Nominal sizes of the released models, in parameters.
NOMINAL_PARAMS = {
    "opt-125m": 125e6,
    "opt-350m": 331e6,
    "opt-1.3b": 1.3e9,
    "opt-2.7b": 2.7e9,
    "opt-6.7b": 6.7e9,
    "opt-13b": 13e9,
    "opt-30b": 30e9,
    "opt-66b": 66e9,
    "opt-175b": 175e9,
}


@pytest.mark.parametrize("name", list(NOMINAL_PARAMS))
def test_every_public_shape_builds_with_its_nominal_size(name: str) -> None:
    shape = OPT_SHAPES[name]
    arch = OPTArchitecture.from_hf_config(shape.to_hf_config(vocab_size=50272))
    model = empty_model(arch, quant=None, dtype=torch.float16)  # meta device: no memory
    num_params = sum(p.numel() for p in model.parameters())
    assert abs(num_params / NOMINAL_PARAMS[name] - 1) < 0.04
    assert (model.decoder.project_in is not None) == (name == "opt-350m")
