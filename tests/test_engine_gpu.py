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
# Log-probability gap between a run's two best tokens under which either is a correct greedy choice for a
# model within quantization noise of it. The tiny trained model is flat (loss ~3.8): measured on the CPU,
# 6 of 96 greedy positions have a top-2 gap under 0.05 and 13 under 0.1, while W8A8 moves logits by ~0.03.
NEAR_TIE = 0.1


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


def _tokens_and_margins(llm: LLM, texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
    outputs = [o.outputs[0] for o in llm.generate(texts, params)]
    return [o.token_ids for o in outputs], [[top[0][1] - top[1][1] for top in o.top_logprobs] for o in outputs]


def _agreement_beyond_ties(test: list[list[int]], reference: list[list[int]], margins: list[list[float]]):
    """(agreement, tokens compared) of two greedy runs. A run that first departs from the reference at one
    of the reference's near-ties stops being compared there (both continuations are right for a model
    within quantization noise); a departure at a clear choice counts every later token as a mismatch."""
    matched = compared = 0
    for row, ref_row, gaps in zip(test, reference, margins, strict=True):
        for position, (token, ref_token) in enumerate(zip(row, ref_row, strict=True)):
            if token != ref_token:
                if gaps[position] >= NEAR_TIE:
                    compared += len(ref_row) - position
                break
            matched += 1
            compared += 1
    return matched / max(compared, 1), compared


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def fp16_graph_run(trained_outlier_model_dir, prompts) -> tuple[list[list[int]], list[list[float]]]:  # noqa: F811
    llm = _gpu_llm(trained_outlier_model_dir)
    assert llm.engine.runner.graphs is not None
    run = _tokens_and_margins(llm, prompts)
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    return run


@pytest.fixture(scope="module")
def fp16_graph_tokens(fp16_graph_run) -> list[list[int]]:
    return fp16_graph_run[0]


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
def test_w8a8_engine_tracks_the_fp16_engine(trained_outlier_model_dir, prompts, fp16_graph_run, level) -> None:  # noqa: F811
    llm = _gpu_llm(trained_outlier_model_dir, quantization="w8a8", quant=QuantConfig(level=level, alpha=0.5))
    tokens = _tokens(llm, prompts)
    agreement, compared = _agreement_beyond_ties(tokens, *fp16_graph_run)
    print(f"W8A8 {level} vs FP16 greedy agreement on the GPU: {agreement:.3f} over {compared} tokens "
          f"(position-wise, ties and all: {_agreement(tokens, fp16_graph_run[0]):.3f})")  # fmt: skip
    assert agreement >= 0.95
    assert compared >= len(prompts) * MAX_TOKENS // 2, "near-ties excluded most of the comparison"


def test_w8a8_cuda_graphs_give_the_eager_tokens(trained_outlier_model_dir, prompts) -> None:  # noqa: F811
    quant = QuantConfig(level="O1", alpha=0.5)
    graphs = _tokens(_gpu_llm(trained_outlier_model_dir, quantization="w8a8", quant=quant), prompts)
    eager = _tokens(_gpu_llm(trained_outlier_model_dir, quantization="w8a8", quant=quant, enforce_eager=True), prompts)
    print(f"W8A8 O1 graphs vs eager agreement: {_agreement(graphs, eager):.3f}")
    assert graphs == eager


@pytest.mark.parametrize("quantized_weights", [False, True], ids=["fp16", "w8a8-O3"])
def test_int8_kv_cache_engine_tracks_the_fp16_engine(trained_outlier_model_dir, prompts, fp16_graph_run,  # noqa: F811
                                                      quantized_weights) -> None:  # fmt: skip
    kwargs: dict = {"kv_cache_dtype": "int8"}
    if quantized_weights:
        kwargs |= {"quantization": "w8a8", "quant": QuantConfig(level="O3", alpha=0.5)}
    graphs = _tokens(_gpu_llm(trained_outlier_model_dir, **kwargs), prompts)
    eager = _tokens(_gpu_llm(trained_outlier_model_dir, enforce_eager=True, **kwargs), prompts)
    assert graphs == eager
    agreement, compared = _agreement_beyond_ties(graphs, *fp16_graph_run)
    print(f"int8 KV ({'W8A8 O3' if quantized_weights else 'FP16'} weights) vs FP16 engine: {agreement:.3f} "
          f"over {compared} tokens")  # fmt: skip
    assert agreement >= 0.95
    assert compared >= len(prompts) * MAX_TOKENS // 2, "near-ties excluded most of the comparison"


@pytest.mark.parametrize("level", ["O1", "O3"])
def test_w8a8_kernels_give_the_reference_tokens(trained_outlier_model_dir, prompts, level, monkeypatch) -> None:  # noqa: F811
    """The compiled ops against engine/ops.py's references in the same engine on the same GPU: any
    difference beyond rounding is a kernel or integration bug, not quantization noise."""
    from engine import ops

    kwargs = {"quantization": "w8a8", "quant": QuantConfig(level=level, alpha=0.5), "enforce_eager": True}
    compiled = _tokens(_gpu_llm(trained_outlier_model_dir, **kwargs), prompts)
    monkeypatch.setattr(ops, "EXTENSION_LOADED", False)
    reference, margins = _tokens_and_margins(_gpu_llm(trained_outlier_model_dir, **kwargs), prompts)
    agreement, compared = _agreement_beyond_ties(compiled, reference, margins)
    print(f"W8A8 {level} compiled vs reference ops agreement on the GPU: {agreement:.3f} over {compared} tokens")
    assert agreement >= 0.95
    assert compared >= len(prompts) * MAX_TOKENS // 2, "near-ties excluded most of the comparison"
