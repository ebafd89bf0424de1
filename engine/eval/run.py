"""One evaluation task on one model: LAMBADA accuracy or perplexity, with latency and model size."""

from __future__ import annotations

import torch
from torch import nn

from engine.eval.lambada import LambadaSample, evaluate_lambada, prepare_lambada
from engine.eval.perplexity import score_stream
from engine.eval.report import EvalRow
from engine.eval.settings import EvalSettings
from engine.models.opt import OPTForCausalLM
from engine.tokenizer import Tokenizer

TaskInputs = list[LambadaSample] | torch.Tensor


def prepare_inputs(settings: EvalSettings, tokenizer: Tokenizer, texts: list[str]) -> TaskInputs:
    """Token ids for the task, made once and shared by every variant."""
    if settings.task == "lambada":
        return prepare_lambada(tokenizer, texts)
    # Texts of a .jsonl or a data set are paragraphs: keep them apart as wikitext does.
    ids = [tokenizer.bos_token_id, *tokenizer.encode("\n\n".join(texts))]
    return torch.tensor(ids[: settings.limit_tokens] if settings.limit_tokens else ids)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of the state dict, tied tensors once."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in model.state_dict().values():
        seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def model_size_gb(model: OPTForCausalLM) -> float:
    """`model_bytes` in GB (10^9)."""
    return model_bytes(model) / 1e9


def evaluate_model(model: OPTForCausalLM, inputs: TaskInputs, settings: EvalSettings, variant: str) -> EvalRow:
    max_positions = model.arch.max_position_embeddings
    size = model_size_gb(model)
    if settings.task == "lambada":
        assert isinstance(inputs, list)
        result = evaluate_lambada(model, inputs, max_positions, progress=settings.progress)
        metrics = {"last_token_accuracy": result.last_token_accuracy, "last_word_accuracy": result.last_word_accuracy}
        return EvalRow(variant, size, result.num_samples, result.latency_ms, metrics)
    assert isinstance(inputs, torch.Tensor)
    window = min(settings.window, max_positions)
    scored = score_stream(model, inputs, window, settings.stride, progress=settings.progress)
    return EvalRow(variant, size, scored.num_windows, scored.latency_ms,
                   {"perplexity": scored.perplexity, "tokens": scored.num_tokens, "window": window})  # fmt: skip
