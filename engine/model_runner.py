"""The model runner: the one place where the scheduler's lists become tensors.

It owns the KV cache tensors (one `PagedKVCache` per layer: keys and values [num_blocks, block_size,
heads, head_dim], int8 with per-row scales under kv_cache_dtype="int8") and turns a `SchedulerOutput`
into the flattened batch: input ids, positions, cache slots, block tables, context lengths. It returns
the logits of the sequences that sample this step.

Under tensor parallelism rank 0's runner flattens the step and hands the host-side batch (`StepBatch`,
plain lists) to `publish`, which sends it to the other ranks; every rank then runs the same forward
(`run`) on its share of the model, and rank 0 samples.

On a GPU, decode-only steps replay CUDA graphs captured once per batch-size bucket: a decode step of a
large model launches hundreds of small kernels, and replaying them as one graph removes the CPU launch
cost that otherwise dominates at small batch sizes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import ops
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.layers.attention import AttentionMetadata, PagedKVCache
from engine.models.opt import OPTForCausalLM
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

DEFAULT_CPU_BLOCKS = 512
# Decode batch sizes captured as CUDA graphs; a batch runs in the smallest bucket that holds it.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, *range(16, 257, 16))


@dataclass(frozen=True)
class ModelOutput:
    seq_ids: list[str]  # the sequences that sample, in row order
    logits: torch.Tensor  # [len(seq_ids), vocab]


def kv_bytes_per_block(model: OPTForCausalLM, cache: CacheConfig, dtype: torch.dtype) -> int:
    attn = model.decoder.layers[0].self_attn.attn  # this rank's heads under tensor parallelism
    per_layer = PagedKVCache.bytes_per_token(attn.num_heads, attn.head_dim, dtype, cache.quantized_kv)
    return model.arch.num_layers * per_layer * cache.block_size


@torch.no_grad()
def profile_activation_bytes(model: OPTForCausalLM, scheduler: SchedulerConfig, max_model_len: int) -> int:
    """Peak GPU memory of the largest step the scheduler may run (a full token budget of prefill, then the
    logits of as many sequences as may sample), measured by running it on dummy tokens."""
    device = model.device
    tokens = scheduler.max_num_batched_tokens
    lens = [max_model_len] * (tokens // max_model_len) + ([tokens % max_model_len] if tokens % max_model_len else [])
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden = model(input_ids, positions, AttentionMetadata.no_cache(lens))
    model.compute_logits(hidden[: min(scheduler.max_num_seqs, tokens)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del input_ids, positions, hidden
    torch.cuda.empty_cache()
    return peak


def determine_num_blocks(
    model: OPTForCausalLM,
    cache: CacheConfig,
    device: torch.device,
    dtype: torch.dtype,
    activation_bytes: int = 0,
) -> int:
    """KV blocks to allocate: a fixed count on the CPU; on a GPU, what `gpu_memory_utilization` of the
    device leaves after the weights (everything allocated now) and the profiled activation peak."""
    if device.type != "cuda":
        return cache.num_cpu_blocks or DEFAULT_CPU_BLOCKS
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = cache.gpu_memory_utilization * total - used - activation_bytes
    per_block = kv_bytes_per_block(model, cache, dtype)
    num_blocks = int(budget // per_block)
    logger.info(
        "GPU memory: %.2f GiB total, %.2f GiB in use (weights), %.2f GiB activation peak, %.2f GiB for the KV cache",
        total / 2**30, used / 2**30, activation_bytes / 2**30, max(num_blocks, 0) * per_block / 2**30,
    )  # fmt: skip
    if num_blocks < 1:
        raise RuntimeError("no GPU memory left for the KV cache; raise gpu_memory_utilization or use a smaller model")
    return num_blocks


def kv_cache_blocks(model: OPTForCausalLM, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                    max_model_len: int) -> int:  # fmt: skip
    """This rank's KV block budget (the activation peak profiled on a GPU); under tensor parallelism every
    rank runs this together (the profiling forward has collectives) and the engine takes the minimum."""
    activation_bytes = 0
    if device.type == "cuda":
        activation_bytes = profile_activation_bytes(model, config.scheduler, max_model_len)
    return determine_num_blocks(model, config.cache, device, dtype, activation_bytes)


@dataclass
class StepBatch:
    """The flattened step, on the host (plain lists: cheap to send to the other tensor-parallel ranks).
    Decodes first, then prefill chunks."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens already cached per sequence
    block_tables: list[list[int]]
    sample_rows: list[int]
    sample_ids: list[str]
    num_decodes: int

    @property
    def decode_only(self) -> bool:
        return self.num_decodes == len(self.seq_lens)

    @property
    def decode_lens(self) -> list[int]:
        return [context + 1 for context in self.context_lens[: self.num_decodes]]


def _padded_tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one host tensor, int32 [len(tables), widest table], short rows padded with block 0."""
    widest = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (widest - len(t)) for t in tables], dtype=torch.int32)


class _DecodeGraphs:
    """CUDA graphs of the decode step, one per batch bucket, sharing static input buffers and one memory pool.

    Padding rows (bucket size > batch) have slot -1 (no KV write) and length 0 (zero attention output);
    their results are never read.
    """

    def __init__(self, model: OPTForCausalLM, max_batch: int, max_blocks: int, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_batch]
        if not self.sizes or self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        largest = self.sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slots = torch.full((largest,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((largest, max_blocks), dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            seq_lens=(1,) * size,
            context_lens=(0,) * size,  # unused by decode rows; their lengths are on the device
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            num_decodes=size,
            decode_seq_lens=self.seq_lens[:size],
        )

    @torch.no_grad()
    def capture(self) -> None:
        # torch.cuda.graph captures on a stream of the *current* device and replay launches on the current
        # device's stream, while the ops run on their tensors' device: with the model on "cuda:1" (a
        # tensor-parallel rank) and device 0 current, the kernels would run eagerly beside an empty capture.
        # Capture and replay therefore pin the model's device.
        with torch.cuda.device(self.device):
            self._capture()

    def _capture(self) -> None:
        start = time.perf_counter()
        pool = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            args = (self.input_ids[:size], self.positions[:size], self._metadata(size))
            self.model(*args)  # warm-up: lazy initialisation must not happen inside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s, %.2f GiB",
                    len(self.graphs), self.max_batch, time.perf_counter() - start,
                    (torch.cuda.memory_reserved() - before) / 2**30)  # fmt: skip

    def run(self, batch: StepBatch) -> torch.Tensor:
        with torch.cuda.device(self.device):
            return self._run(batch)

    def _run(self, batch: StepBatch) -> torch.Tensor:
        count = len(batch.input_ids)
        size = next(b for b in self.sizes if b >= count)
        width = self.block_tables.shape[1]

        def host(values: list, dtype: torch.dtype, pad: int) -> torch.Tensor:
            return torch.tensor(values + [pad] * (size - count), dtype=dtype)

        self.input_ids[:size].copy_(host(batch.input_ids, torch.long, 0), non_blocking=True)
        self.positions[:size].copy_(host(batch.positions, torch.long, 0), non_blocking=True)
        self.slots[:size].copy_(host(batch.slots, torch.long, -1), non_blocking=True)
        self.seq_lens[:size].copy_(host(batch.decode_lens, torch.int32, 0), non_blocking=True)
        padded = torch.zeros((size, width), dtype=torch.int32)
        tables = _padded_tables(batch.block_tables)  # one conversion, not one per row: this is per step
        padded[:count, : tables.shape[1]] = tables
        self.block_tables[:size].copy_(padded, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:count]


class ModelRunner:
    def __init__(
        self,
        model: OPTForCausalLM,
        cache: CacheConfig,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        enforce_eager: bool = True,
        publish: Callable[[StepBatch], None] | None = None,
    ) -> None:
        self.model = model
        self.block_size = cache.block_size
        self.device = device
        self.publish = publish  # tensor parallelism: sends each step to the other ranks
        arch = model.arch
        attn = model.decoder.layers[0].self_attn.attn  # this rank's heads under tensor parallelism
        self.kv_caches: list[PagedKVCache] = []
        for layer in model.decoder.layers:
            kv = PagedKVCache.allocate(num_blocks, cache.block_size, attn.num_heads, attn.head_dim, dtype, device,
                                       quantized=cache.quantized_kv)  # fmt: skip
            layer.self_attn.attn.kv_cache = kv
            self.kv_caches.append(kv)
        gib = sum(kv.nbytes for kv in self.kv_caches) / 1024**3
        logger.info("KV cache: %d blocks of %d tokens, %s (%.2f GiB)", num_blocks, cache.block_size,
                    "int8" if cache.quantized_kv else str(dtype).removeprefix("torch."), gib)  # fmt: skip
        self.graphs: _DecodeGraphs | None = None
        self.last_step_used_graph = False
        if device.type == "cuda" and not enforce_eager and not ops.EXTENSION_LOADED:
            # The PyTorch references synchronize with the host (boolean-mask indexing), which graphs forbid.
            logger.warning("CUDA graphs need the compiled extension: decoding eagerly")
        elif device.type == "cuda" and not enforce_eager:
            max_len = max_model_len or arch.max_position_embeddings
            max_blocks = -(-max_len // cache.block_size)
            self.graphs = _DecodeGraphs(model, min(max_num_seqs, GRAPH_BATCH_SIZES[-1]), max_blocks, device)
            self.graphs.capture()

    def _flatten(self, output: SchedulerOutput, sequences: dict[str, Sequence]) -> StepBatch:
        # Decodes (one new token) first: the attention layer runs them as one batched kernel.
        scheduled: list[ScheduledSequence] = sorted(output.scheduled, key=lambda s: s.num_new_tokens != 1)
        batch = StepBatch(
            input_ids=[], positions=[], slots=[], seq_lens=[s.num_new_tokens for s in scheduled],
            context_lens=[s.num_computed_tokens for s in scheduled],
            block_tables=[list(s.block_table) for s in scheduled], sample_rows=[], sample_ids=[],
            num_decodes=sum(1 for s in scheduled if s.num_new_tokens == 1),
        )  # fmt: skip
        for s in scheduled:
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            batch.input_ids.extend(sequences[s.seq_id].token_ids[start:end])
            batch.positions.extend(range(start, end))
            batch.slots.extend(s.block_table[p // self.block_size] * self.block_size + p % self.block_size
                               for p in range(start, end))  # fmt: skip
            if s.samples:
                batch.sample_rows.append(len(batch.input_ids) - 1)
                batch.sample_ids.append(s.seq_id)
        return batch

    @torch.no_grad()
    def execute(self, output: SchedulerOutput, sequences: dict[str, Sequence]) -> ModelOutput:
        batch = self._flatten(output, sequences)
        if self.publish is not None:
            self.publish(batch)
        return ModelOutput(batch.sample_ids, self.run(batch))

    @torch.no_grad()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """The forward of one flattened step: the logits [len(sample_rows), vocab] of the sampling rows."""

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        # Every host-to-device copy before the forward: one after it would wait for the GPU mid-step (on rank 0,
        # inside the step's collectives, where `TensorParallelExecutor.wait_step` could not time it out).
        every_row = len(batch.sample_rows) == len(batch.input_ids)
        sample_rows = None if every_row else tensor(batch.sample_rows, torch.long)
        self.last_step_used_graph = (
            self.graphs is not None and batch.decode_only and len(batch.seq_lens) <= self.graphs.max_batch
        )
        if self.last_step_used_graph:
            hidden = self.graphs.run(batch)
        else:
            metadata = AttentionMetadata(
                seq_lens=tuple(batch.seq_lens),
                context_lens=tuple(batch.context_lens),
                slot_mapping=tensor(batch.slots, torch.long),
                block_tables=_padded_tables(batch.block_tables).to(self.device),
                num_decodes=batch.num_decodes,
                decode_seq_lens=tensor(batch.decode_lens, torch.int32) if batch.num_decodes else None,
            )
            hidden = self.model(tensor(batch.input_ids, torch.long), tensor(batch.positions, torch.long), metadata)
        sampled = hidden if sample_rows is None else hidden[sample_rows]
        return self.model.compute_logits(sampled)
