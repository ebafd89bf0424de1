"""The engine end to end on the CPU: greedy output equals transformers' generate, however requests are
batched, chunked, preempted or share a prefix; aborts and stop conditions free everything."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTForCausalLM as HFOPTForCausalLM

from engine import LLM, SamplingParams
from engine.tiny_model import shipped_corpus, split_corpus

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    _, heldout = split_corpus(shipped_corpus())
    lines = [line for line in heldout.splitlines() if line.strip()]
    # 8 prompts of different lengths; two share a long prefix.
    chosen = [lines[0], lines[3] + "\n" + lines[4], lines[10][:5], " ".join(lines[20:26]), lines[30], "O",
              lines[40] + "\n" + lines[41] + "\n" + lines[42]]  # fmt: skip
    chosen.append(chosen[3] + " and yet")
    return chosen


@pytest.fixture(scope="module")
def hf_greedy(trained_outlier_model_dir, prompts):
    model = HFOPTForCausalLM.from_pretrained(str(trained_outlier_model_dir), dtype=torch.float32).eval()
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(trained_outlier_model_dir)
    results = []
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prompt)]])
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=1)  # fmt: skip
        results.append(out[0, ids.shape[1] :].tolist())
    return results


def make_llm(model_dir, **kwargs) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", **kwargs)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _agreement(outputs, reference: list[list[int]]) -> float:
    """Position-wise share of generated tokens equal to the reference's (every run has MAX_TOKENS)."""
    same = sum(
        a == b
        for o, ref in zip(outputs, reference, strict=True)
        for a, b in zip(o.outputs[0].token_ids, ref, strict=True)
    )
    return same / (len(reference) * MAX_TOKENS)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 16},  # chunked prefill splits every long prompt
        {"num_cpu_blocks": 12, "block_size": 8, "max_num_batched_tokens": 32},  # 96 tokens of KV: preemption
        {"enable_prefix_caching": False, "max_num_seqs": 3},
    ],
    ids=["plain", "chunked-prefill", "preemption", "no-prefix-cache"],
)
def test_greedy_output_equals_transformers(trained_outlier_model_dir, prompts, hf_greedy, engine_kwargs) -> None:
    llm = make_llm(trained_outlier_model_dir, **engine_kwargs)
    outputs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy
    stats = llm.engine.stats()
    if engine_kwargs.get("num_cpu_blocks"):
        assert stats.num_preemptions > 0
    assert stats.kv_cache_usage == 0.0 or llm.engine.scheduler.blocks.enable_prefix_caching
    assert llm.engine.scheduler.blocks.num_free_blocks == llm.engine.scheduler.blocks.num_blocks


def test_requests_arriving_at_different_steps_and_sharing_a_prefix(trained_outlier_model_dir, prompts, hf_greedy):
    llm = make_llm(trained_outlier_model_dir, max_num_batched_tokens=24)
    engine = llm.engine
    finished = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:  # a new request every other step
            index, prompt = pending.pop(0)
            engine.add_request(str(index), prompt, GREEDY)
        for output in engine.step():
            if output.finished:
                finished[int(output.request_id)] = output.outputs[0].token_ids
        step += 1
    assert [finished[i] for i in range(len(prompts))] == hf_greedy
    assert engine.stats().prefix_cache_hits > 0  # the last prompt extends the fourth


def test_w8a8_engine_tracks_the_float_engine(trained_outlier_model_dir, prompts, hf_greedy) -> None:
    from engine.config import QuantConfig

    llm = make_llm(trained_outlier_model_dir, quantization="w8a8", quant=QuantConfig(level="O1", alpha=0.5))
    outputs = llm.generate(prompts, GREEDY)
    assert _agreement(outputs, hf_greedy) >= 0.9


@pytest.mark.parametrize(
    "engine_kwargs",
    [{}, {"max_num_batched_tokens": 16, "num_cpu_blocks": 12, "block_size": 8}],
    ids=["plain", "chunked-prefill-and-preemption"],
)
def test_int8_kv_cache_engine_tracks_transformers(trained_outlier_model_dir, prompts, hf_greedy, engine_kwargs) -> None:
    """Keys and values stored as int8 (per token and head): decode, chunked prefill over an int8 prefix and
    recompute after preemption all read the quantized cache."""
    llm = make_llm(trained_outlier_model_dir, kv_cache_dtype="int8", **engine_kwargs)
    assert llm.engine.runner.kv_caches[0].keys.dtype == torch.int8
    outputs = llm.generate(prompts, GREEDY)
    assert _agreement(outputs, hf_greedy) >= 0.9
    assert llm.engine.scheduler.blocks.num_free_blocks == llm.engine.scheduler.blocks.num_blocks


def test_abort_frees_every_block(trained_outlier_model_dir, prompts) -> None:
    llm = make_llm(trained_outlier_model_dir, max_num_batched_tokens=8)
    engine = llm.engine
    for index, prompt in enumerate(prompts[:4]):
        engine.add_request(str(index), prompt, SamplingParams(max_tokens=50))
    engine.step()  # request 0 mid-prefill
    for _ in range(12):
        engine.step()
    for index in range(4):
        aborted = engine.abort_request(str(index))
        assert aborted is not None and all(o.finish_reason in ("abort", "stop", "length") for o in aborted.outputs)
    blocks = engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and all(b.ref_count == 0 for b in blocks.blocks)
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_stop_strings_max_tokens_and_n(trained_outlier_model_dir) -> None:
    llm = make_llm(trained_outlier_model_dir)
    free_run = llm.generate("KING RICHARD:\n", GREEDY)[0].outputs[0]
    stop = free_run.text[5:8]
    stopped = llm.generate("KING RICHARD:\n", SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=[stop]))
    output = stopped[0].outputs[0]
    assert output.finish_reason == "stop" and output.text == free_run.text[: free_run.text.find(stop)]
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == MAX_TOKENS
    several = llm.generate("The", SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5))[0]
    again = llm.generate("The", SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5))[0]
    assert [o.token_ids for o in several.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in several.outputs}) > 1


def test_prompt_too_long_for_the_context_is_refused(trained_outlier_model_dir) -> None:
    llm = make_llm(trained_outlier_model_dir, max_model_len=32)
    with pytest.raises(ValueError, match="maximum context length is 32"):
        llm.generate("word " * 40, SamplingParams(max_tokens=4))
