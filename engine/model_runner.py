"""The model runner: the one place where the scheduler's lists become tensors.

It owns the KV cache tensors (one key and one value tensor per layer, [num_blocks, block_size, heads,
head_dim]) and turns a `SchedulerOutput` into the flattened batch: input ids, positions, cache slots,
block tables, context lengths. It returns the logits of the sequences that sample this step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import CacheConfig
from engine.layers.attention import AttentionMetadata
from engine.models.opt import OPTForCausalLM
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

DEFAULT_CPU_BLOCKS = 512


@dataclass(frozen=True)
class ModelOutput:
    seq_ids: list[str]  # the sequences that sample, in row order
    logits: torch.Tensor  # [len(seq_ids), vocab]


def kv_bytes_per_block(model: OPTForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    arch = model.arch
    per_token = 2 * arch.num_layers * arch.hidden_size * torch.tensor([], dtype=dtype).element_size()
    return per_token * block_size


def determine_num_blocks(model: OPTForCausalLM, cache: CacheConfig, device: torch.device, dtype: torch.dtype) -> int:
    """KV blocks to allocate: a fixed count on the CPU; on a GPU, what `gpu_memory_utilization` of the
    device leaves after the weights and an activation reserve."""
    if device.type != "cuda":
        return cache.num_cpu_blocks or DEFAULT_CPU_BLOCKS
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    # Activation peak not profiled yet: reserve a fixed 10% of the device for it.
    budget = cache.gpu_memory_utilization * total - used - 0.10 * total
    num_blocks = int(budget // kv_bytes_per_block(model, cache.block_size, dtype))
    if num_blocks < 1:
        raise RuntimeError("no GPU memory left for the KV cache; raise gpu_memory_utilization or use a smaller model")
    return num_blocks


class ModelRunner:
    def __init__(
        self, model: OPTForCausalLM, cache: CacheConfig, num_blocks: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.block_size = cache.block_size
        self.device = device
        arch = model.arch
        shape = (num_blocks, cache.block_size, arch.num_heads, arch.head_dim)
        self.kv_caches = []
        for layer in model.decoder.layers:
            keys = torch.zeros(shape, dtype=dtype, device=device)
            values = torch.zeros(shape, dtype=dtype, device=device)
            layer.self_attn.attn.kv_cache = (keys, values)
            self.kv_caches.append((keys, values))
        gib = 2 * len(self.kv_caches) * keys.numel() * keys.element_size() / 1024**3
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, cache.block_size, gib)

    @torch.no_grad()
    def execute(self, output: SchedulerOutput, sequences: dict[str, Sequence]) -> ModelOutput:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        for s in output.scheduled:
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            input_ids.extend(sequences[s.seq_id].token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(s.block_table[p // self.block_size] * self.block_size + p % self.block_size
                         for p in range(start, end))  # fmt: skip
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
                sample_ids.append(s.seq_id)
        widest = max(len(s.block_table) for s in output.scheduled)
        tables = [list(s.block_table) + [0] * (widest - len(s.block_table)) for s in output.scheduled]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        metadata = AttentionMetadata(
            seq_lens=tuple(s.num_new_tokens for s in output.scheduled),
            context_lens=tuple(s.num_computed_tokens for s in output.scheduled),
            slot_mapping=tensor(slots, torch.long),
            block_tables=tensor(tables, torch.int32),
        )
        hidden = self.model(tensor(input_ids, torch.long), tensor(positions, torch.long), metadata)
        logits = self.model.compute_logits(hidden[tensor(sample_rows, torch.long)])
        return ModelOutput(sample_ids, logits)
