"""What the engine returns per request."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[float] = field(default_factory=list)  # of each generated token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    new_text: list[str] = field(default_factory=list)  # per completion, the text added by this step

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def snapshot(self) -> RequestOutput:
        """A copy that later engine steps leave alone: they append to each completion's lists in place.
        The prompt ids (never changed after admission) and each step's top-logprob rows are shared.
        copy.deepcopy did the same at ~100 us per request per step (64 streams: ~7 ms a step)."""
        outputs = [replace(o, token_ids=list(o.token_ids), logprobs=list(o.logprobs), top_logprobs=list(o.top_logprobs))
                   for o in self.outputs]  # fmt: skip
        return replace(self, outputs=outputs, new_text=list(self.new_text))
