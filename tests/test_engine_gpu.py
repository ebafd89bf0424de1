"""The engine on a GPU: CUDA graphs change nothing, FP16 tracks the float32 reference, and W8A8 tracks
FP16 on a model with outlier channels. Skipped without CUDA."""

from __future__ import annotations

import gc

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import QuantConfig
from tests.test_engine import MAX_TOKENS, hf_greedy, prompts  # noqa: F401  (fixtures)

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Each engine sizes its KV cache from free memory: the previous test's engine must be gone."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _gpu_llm(model_dir, **kwargs) -> LLM:
    gc.collect()
    torch.cuda.empty_cache()
    return LLM(str(model_dir), device="cuda", dtype="float16", gpu_memory_utilization=0.3, **kwargs)


def _tokens(llm: LLM, texts: list[str]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(texts, GREEDY)]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def fp16_graph_tokens(trained_outlier_model_dir, prompts) -> list[list[int]]:  # noqa: F811
    llm = _gpu_llm(trained_outlier_model_dir)
    assert llm.engine.runner.graphs is not None
    tokens = _tokens(llm, prompts)
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    return tokens


def test_cuda_graphs_give_the_eager_tokens(trained_outlier_model_dir, prompts, fp16_graph_tokens) -> None:  # noqa: F811
    eager = _gpu_llm(trained_outlier_model_dir, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    assert _tokens(eager, prompts) == fp16_graph_tokens


def test_chunked_prefill_and_mixed_steps_on_the_gpu(trained_outlier_model_dir, prompts, fp16_graph_tokens) -> None:  # noqa: F811
    llm = _gpu_llm(trained_outlier_model_dir, max_num_batched_tokens=16)  # prompts split; decodes ride along
    assert _agreement(_tokens(llm, prompts), fp16_graph_tokens) >= 0.95


def test_fp16_engine_tracks_the_float32_reference(prompts, hf_greedy, fp16_graph_tokens) -> None:  # noqa: F811
    assert _agreement(fp16_graph_tokens, hf_greedy) >= 0.95


@pytest.mark.parametrize("level", ["O1", "O3"])
def test_w8a8_engine_tracks_the_fp16_engine(trained_outlier_model_dir, prompts, fp16_graph_tokens, level) -> None:  # noqa: F811
    llm = _gpu_llm(trained_outlier_model_dir, quantization="w8a8", quant=QuantConfig(level=level, alpha=0.5))
    agreement = _agreement(_tokens(llm, prompts), fp16_graph_tokens)
    print(f"W8A8 {level} vs FP16 greedy agreement on the GPU: {agreement:.3f}")
    assert agreement >= 0.95


def test_w8a8_cuda_graphs_give_the_eager_tokens(trained_outlier_model_dir, prompts) -> None:  # noqa: F811
    quant = QuantConfig(level="O1", alpha=0.5)
    graphs = _tokens(_gpu_llm(trained_outlier_model_dir, quantization="w8a8", quant=quant), prompts)
    eager = _tokens(_gpu_llm(trained_outlier_model_dir, quantization="w8a8", quant=quant, enforce_eager=True), prompts)
    print(f"W8A8 O1 graphs vs eager agreement: {_agreement(graphs, eager):.3f}")
    assert graphs == eager


@pytest.mark.parametrize("level", ["O1", "O3"])
def test_w8a8_kernels_give_the_reference_tokens(trained_outlier_model_dir, prompts, level, monkeypatch) -> None:  # noqa: F811
    """The compiled ops against engine/ops.py's references in the same engine on the same GPU: any
    difference beyond rounding is a kernel or integration bug, not quantization noise."""
    from engine import ops

    quant = QuantConfig(level=level, alpha=0.5)
    compiled = _tokens(_gpu_llm(trained_outlier_model_dir, quantization="w8a8", quant=quant, enforce_eager=True), prompts)
    monkeypatch.setattr(ops, "EXTENSION_LOADED", False)
    reference = _tokens(_gpu_llm(trained_outlier_model_dir, quantization="w8a8", quant=quant, enforce_eager=True), prompts)
    agreement = _agreement(compiled, reference)
    print(f"W8A8 {level} compiled vs reference ops agreement on the GPU: {agreement:.3f}")
    assert agreement >= 0.95
