"""LAMBADA: predict the end of a passage from the rest of it, with no KV cache, one passage at a time.

Two accuracies from one forward pass over BOS + the passage:
- last token (the SmoothQuant demo's protocol): the argmax at the second-to-last position is the
  passage's last token;
- last word (GPT-2 / lm-evaluation-harness): greedy decoding after the context (the passage up to
  its last space) reproduces every token of " " + the last word. With teacher forcing this is: the
  argmax at each of the word's positions is the word's token there.
When tokenizing the context and the word apart differs from tokenizing the whole passage (a BPE merge
across the boundary), the last word gets its own forward pass. Latency is that of the first pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engine.eval.timing import timed
from engine.models.opt import OPTForCausalLM
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class LambadaSample:
    token_ids: list[int]  # BOS + the whole passage
    context_ids: list[int]  # BOS + the passage up to its last space
    word_ids: list[int]  # " " + the last word

    @property
    def word_shares_pass(self) -> bool:
        return self.context_ids + self.word_ids == self.token_ids


@dataclass(frozen=True)
class LambadaResult:
    num_samples: int
    last_token_hits: int
    last_word_hits: int
    seconds: float  # in the timed forward passes, one per sample

    @property
    def last_token_accuracy(self) -> float:
        return self.last_token_hits / self.num_samples

    @property
    def last_word_accuracy(self) -> float:
        return self.last_word_hits / self.num_samples

    @property
    def latency_ms(self) -> float:
        return 1000 * self.seconds / self.num_samples


def prepare_lambada(tokenizer: Tokenizer, texts: list[str]) -> list[LambadaSample]:
    samples = []
    for text in texts:
        text = text.rstrip()
        context, space, word = text.rpartition(" ")
        bos = [tokenizer.bos_token_id]
        samples.append(
            LambadaSample(
                token_ids=bos + tokenizer.encode(text),
                context_ids=bos + (tokenizer.encode(context) if context else []),
                word_ids=tokenizer.encode(space + word),
            )
        )
    return samples


def _greedy_matches(logits: torch.Tensor, context_len: int, word_ids: list[int]) -> bool:
    """logits [L, vocab] of context + word: does the argmax predict each word token from what precedes it?"""
    predicted = logits[context_len - 1 : context_len - 1 + len(word_ids)].argmax(-1)
    return predicted.tolist() == word_ids


@torch.no_grad()
def evaluate_lambada(
    model: OPTForCausalLM, samples: list[LambadaSample], max_len: int, progress: bool = False
) -> LambadaResult:
    """Both accuracies and the mean forward latency over `samples`; passages longer than `max_len`
    tokens (the model's positions) keep their last `max_len` tokens."""
    if not samples:
        raise ValueError("LAMBADA needs at least one sample")
    device = model.device
    token_hits = word_hits = 0
    seconds = 0.0
    for sample in tqdm(samples, desc="LAMBADA", unit="sample", disable=not progress):
        ids = torch.tensor(sample.token_ids[-max_len:], device=device)
        logits, elapsed = timed(device, lambda ids=ids: model.score(ids[None])[0])  # [L, vocab]
        seconds += elapsed
        token_hits += int(logits[-2].argmax().item() == sample.token_ids[-1])
        if sample.word_shares_pass:
            context_len = len(sample.context_ids) - (len(sample.token_ids) - len(ids))
        else:
            joined = (sample.context_ids + sample.word_ids)[-max_len:]
            context_len = len(joined) - len(sample.word_ids)
            logits = model.score(torch.tensor(joined, device=device)[None])[0]
        word_hits += int(context_len >= 1 and _greedy_matches(logits, context_len, sample.word_ids))
    return LambadaResult(len(samples), token_hits, word_hits, seconds)
