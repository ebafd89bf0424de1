"""The engine: requests in, one step at a time, outputs out.

    step() = schedule -> run the model -> sample -> postprocess (detokenize, stop, free)

The HTTP server drives `add_request`, `abort_request` and `step` from its engine thread; the offline
`LLM` class drives them in a loop.

With `tensor_parallel_size` N > 1 this process is rank 0: it also starts ranks 1..N-1
(`engine.distributed.executor`), runs its share of the model, and samples. A failed rank makes `step`
raise `WorkerFailedError` (and every later `step` too); `shutdown` stops the other ranks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine.config import CalibrationConfig, EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.distributed.executor import TensorParallelExecutor
from engine.distributed.worker import max_model_len
from engine.errors import ConfigError, WorkerFailedError
from engine.kv_cache.block_manager import BlockManager
from engine.model_runner import ModelRunner, kv_cache_blocks
from engine.models.loader import LoadedModel, load_model
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling import SamplerOutput, SamplingParams, SamplingRow, sample
from engine.scheduler import Scheduler, SchedulerStats
from engine.sequence import Sequence, SequenceStatus
from engine.tokenizer import Tokenizer, encode_prompt, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepTiming:
    """Where one step's wall time went, on the host. On a GPU, `forward` is issuing the model's kernels
    (a graph replay is quick; an eager step issues hundreds) and `sample` includes waiting for the GPU
    to finish them, at its first read of a result: a `forward` close to the whole step means the step
    is bound by the host, not the GPU. (No synchronization is added to measure it.)"""

    KINDS = ("decode_graph", "eager")  # a replayed CUDA graph, or kernels issued one by one
    PHASES = ("schedule", "forward", "sample", "postprocess")

    kind: str
    num_tokens: int
    schedule_s: float
    forward_s: float
    sample_s: float
    postprocess_s: float

    def phase_seconds(self) -> dict[str, float]:
        return {phase: getattr(self, f"{phase}_s") for phase in self.PHASES}


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    outputs: list[CompletionOutput]
    generators: list[torch.Generator | None] = field(default_factory=list)


def quantize_in_memory(loaded: LoadedModel, config: EngineConfig, tokenizer: Tokenizer) -> None:
    """W8A8 from an FP16 checkpoint at load time; smoothing and O3 calibrate on the shipped corpus."""
    from engine.quant.calibrate import calibrate
    from engine.quant.data import token_windows
    from engine.quant.quantize import smoothquant
    from engine.tiny_model import CORPUS_RESOURCE, shipped_corpus, split_corpus

    quant = config.model.quant
    stats = None
    if quant.needs_calibration:
        seq_len = min(512, loaded.arch.max_position_embeddings)
        windows = token_windows(tokenizer, [split_corpus(shipped_corpus())[0]], 64, seq_len).token_ids
        logger.info("calibrating on %d x %d tokens of the shipped %s", len(windows), seq_len, CORPUS_RESOURCE)
        stats = calibrate(loaded.model, windows, progress=False)
        quant = type(quant)(
            **{**quant.__dict__, "calibration": CalibrationConfig(CORPUS_RESOURCE, len(windows), seq_len)}
        )
    smoothquant(loaded.model, quant, stats)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.requests: dict[str, _Request] = {}
        self.failure: WorkerFailedError | None = None
        self.last_step_timing: StepTiming | None = None  # of the last step, if it ran the model
        self.last_step_request_ids: tuple[str, ...] = ()  # the requests the last step scheduled
        parallel = config.parallel.tensor_parallel_size > 1
        self.executor = TensorParallelExecutor(config) if parallel else None
        try:
            self._start(config)
        except BaseException:
            self.shutdown()  # no rank outlives a failed start
            raise

    def _start(self, config: EngineConfig) -> None:
        executor = self.executor
        loaded = load_model(config.model, executor.shard, executor.device) if executor else load_model(config.model)
        if executor:
            executor.collect("loading the model")
        tokenizer_dir = config.model.tokenizer or loaded.model_dir
        if tokenizer_dir is None:
            raise ConfigError(f"{config.model.model!r} has no tokenizer files; name a tokenizer (a model directory)")
        self.tokenizer = load_tokenizer(tokenizer_dir)
        if config.model.quantization == "w8a8" and loaded.quant is None:
            if executor:
                raise ConfigError(
                    "in-memory W8A8 quantization calibrates the whole model in one process; for tensor "
                    "parallelism quantize first (smoothserve quantize) and serve the W8A8 checkpoint"
                )
            quantize_in_memory(loaded, config, self.tokenizer)
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.max_model_len = max_model_len(config, loaded.arch.max_position_embeddings)
        if executor:  # every rank sizes its cache at once (a GPU profiles with collectives); all take the least
            executor.send_all("kv_cache_blocks")
        num_blocks = kv_cache_blocks(self.model, config, self.device, self.dtype, self.max_model_len)
        if executor:
            num_blocks = min(num_blocks, *executor.collect("sizing the KV cache"))
            executor.send_all("build_runner", num_blocks)
        block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, block_manager)
        self.runner = ModelRunner(
            self.model, config.cache, num_blocks, self.device, self.dtype, max_model_len=self.max_model_len,
            max_num_seqs=config.scheduler.max_num_seqs, enforce_eager=config.model.enforce_eager,
            publish=executor.send_step if executor else None,
        )  # fmt: skip
        if executor:
            executor.collect("building the model runner")

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do at size 1); safe to call more than once."""
        if self.executor is not None:
            self.executor.shutdown()

    # ----------------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. Raises ValueError for an empty prompt or one that cannot fit the context.

        `prompt_token_ids`: a text prompt's `encode_prompt` ids, where the caller has them already (the
        server tokenizes off its event loop for admission; the engine thread need not do it again).
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = list(prompt_token_ids) if prompt_token_ids is not None else encode_prompt(self.tokenizer, prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        limit = min(self.max_model_len, self.scheduler.max_seq_len)
        if len(prompt_ids) + params.max_tokens > limit:
            raise ValueError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {len(prompt_ids)} "
                f"tokens and max_tokens asks for {params.max_tokens} more"
            )
        request = _Request(request_id, text, prompt_ids, params, [], [], [])
        for index in range(params.n):
            seq = Sequence(f"{request_id}#{index}", list(prompt_ids), data=request)
            request.seqs.append(seq)
            request.detokenizers.append(IncrementalDetokenizer(self.tokenizer, params.stop))
            request.outputs.append(CompletionOutput(index))
            seeded = params.seed is not None
            request.generators.append(
                torch.Generator(device=self.device).manual_seed(params.seed + index) if seeded else None
            )
        for seq in request.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; its KV blocks are free when this returns."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq, output in zip(request.seqs, request.outputs, strict=True):
            if not output.finished:
                self.scheduler.abort(seq.seq_id)
                output.finish_reason = SequenceStatus.FINISHED_ABORTED.value
        return self._output(request, [""] * len(request.outputs))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def step(self) -> list[RequestOutput]:
        if self.failure is not None:
            raise self.failure
        self.last_step_timing = None
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        self.last_step_request_ids = tuple(
            dict.fromkeys(self.scheduler.sequences[s.seq_id].data.request_id for s in scheduled.scheduled)
        )
        if scheduled.is_empty:
            return []
        scheduled_at = time.perf_counter()
        try:
            model_output = self.runner.execute(scheduled, self.scheduler.sequences)
            if self.executor is not None:
                self.executor.wait_step()
            issued_at = time.perf_counter()
        except Exception as error:
            if self.executor is None:
                raise
            # The ranks are out of step for good: stop them all, and fail this and every later step.
            if isinstance(error, WorkerFailedError):  # the executor saw it first and has stopped the ranks
                self.failure = error
                raise
            self.failure = self.executor.fail(error)
            raise self.failure from error
        sampled_at = issued_at
        outputs: list[RequestOutput] = []
        if not model_output.seq_ids:  # only prompt chunks that sample nothing yet
            self.scheduler.update(scheduled, {})
        else:
            seqs = [self.scheduler.sequences[seq_id] for seq_id in model_output.seq_ids]
            sampled = sample(model_output.logits, [self._sampling_row(seq) for seq in seqs])
            sampled_at = time.perf_counter()
            self.scheduler.update(scheduled, dict(zip(model_output.seq_ids, sampled.token_ids, strict=True)))
            outputs = self._postprocess(seqs, sampled)
        self.last_step_timing = StepTiming(
            kind=StepTiming.KINDS[0] if self.runner.last_step_used_graph else StepTiming.KINDS[1],
            num_tokens=scheduled.num_batched_tokens, schedule_s=scheduled_at - started,
            forward_s=issued_at - scheduled_at, sample_s=sampled_at - issued_at,
            postprocess_s=time.perf_counter() - sampled_at,
        )  # fmt: skip
        return outputs

    # ----------------------------------------------------------------------------------------------

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        request: _Request = seq.data
        index = request.seqs.index(seq)
        return SamplingRow(request.params, request.prompt_token_ids, seq.output_token_ids,
                           request.generators[index], self.tokenizer.eos_token_id)  # fmt: skip

    def _postprocess(self, seqs: list[Sequence], sampled: SamplerOutput) -> list[RequestOutput]:
        touched: dict[str, list[str]] = {}
        for row, seq in enumerate(seqs):
            request: _Request = seq.data
            index = request.seqs.index(seq)
            output, params = request.outputs[index], request.params
            token = seq.token_ids[-1]
            output.token_ids.append(token)
            output.logprobs.append(sampled.logprobs[row])
            if params.logprobs is not None:
                output.top_logprobs.append(sampled.top_logprobs[row])
            status = self._finish_status(seq, params, token)
            new_text, hit_stop = request.detokenizers[index].update(output.token_ids, final=status is not None)
            if hit_stop:
                status = SequenceStatus.FINISHED_STOPPED
            output.text += new_text
            if status is not None:
                output.finish_reason = status.value
                self.scheduler.finish(seq.seq_id, status)
            texts = touched.setdefault(request.request_id, [""] * len(request.outputs))
            texts[index] += new_text
        results = []
        for request_id, texts in touched.items():
            request = self.requests[request_id]
            result = self._output(request, texts)
            if result.finished:
                del self.requests[request_id]
            results.append(result)
        return results

    def _finish_status(self, seq: Sequence, params: SamplingParams, token: int) -> SequenceStatus | None:
        generated = len(seq.output_token_ids)
        if generated >= params.min_tokens and (
            token in params.stop_token_ids or (token == self.tokenizer.eos_token_id and not params.ignore_eos)
        ):
            return SequenceStatus.FINISHED_STOPPED
        if generated >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _output(request: _Request, new_text: list[str]) -> RequestOutput:
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, request.outputs, new_text)
