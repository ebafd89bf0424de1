"""The offline entry point: `LLM(model).generate(prompts, SamplingParams(...))`.

With `tensor_parallel_size` > 1 the engine has worker processes: `shutdown()` (or a `with LLM(...)`
block, or garbage collection) stops them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from types import TracebackType

from tqdm.auto import tqdm

from engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, QuantConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams


class LLM:
    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        device: str = "auto",
        quantization: str | None = None,
        quant: QuantConfig | None = None,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_cpu_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: str = "auto",
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        enable_chunked_prefill: bool = True,
        seed: int = 0,
        enforce_eager: bool = False,
        load_format: str = "auto",
        collective_timeout_s: float = 300.0,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype, device=device, quantization=quantization,
                              quant=quant or QuantConfig(), max_model_len=max_model_len, seed=seed,
                              enforce_eager=enforce_eager, load_format=load_format),
            cache=CacheConfig(block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching, num_cpu_blocks=num_cpu_blocks,
                              kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      enable_chunked_prefill=enable_chunked_prefill),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                    collective_timeout_s=collective_timeout_s),
        )  # fmt: skip
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)  # absent when the constructor failed
        if engine is not None:
            engine.shutdown()

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt (text, or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p in zip(request_ids, prompts, params_list, strict=True):
            self.engine.add_request(request_id, prompt, p)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="Generating", disable=not progress) as bar:
            while len(finished) < len(prompts):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update()
        return [finished[request_id] for request_id in request_ids]
