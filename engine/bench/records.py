"""What one benchmark request saw, measured on the client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestRecord:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    sent_at: float = 0.0  # seconds from the start of its load
    ttft: float | None = None  # seconds from sending to the first streamed token
    e2e: float | None = None  # seconds from sending to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between consecutive streamed chunks
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)
