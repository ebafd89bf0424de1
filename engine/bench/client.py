"""One streaming completion request, timed on the client: TTFT, inter-token gaps, end to end."""

from __future__ import annotations

import json
import time

import httpx

from engine.bench.records import RequestRecord


def _error_message(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


async def send_request(
    client: httpx.AsyncClient, url: str, payload: dict, headers: dict[str, str], sent_at: float
) -> RequestRecord:
    """POST a `stream: true` completion to `url` and time its server-sent events."""
    prompt_tokens = len(payload["prompt"])
    started = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    chunks, completion_tokens = 0, None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                return RequestRecord(False, prompt_tokens, sent_at=sent_at,
                                     error=_error_message(response.status_code, await response.aread()))  # fmt: skip
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return RequestRecord(False, prompt_tokens, sent_at=sent_at, error=event["error"].get("message"))
                if event.get("usage"):
                    completion_tokens = event["usage"]["completion_tokens"]
                if event.get("choices"):  # one chunk per engine step: one new token
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    first, last = first or now, now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return RequestRecord(False, prompt_tokens, sent_at=sent_at, error=f"{type(error).__name__}: {error}")
    ended = time.perf_counter()
    if first is None:
        return RequestRecord(False, prompt_tokens, sent_at=sent_at, error="the stream ended without a token")
    output_tokens = completion_tokens if completion_tokens is not None else chunks
    return RequestRecord(True, prompt_tokens, output_tokens, sent_at, first - started, ended - started, gaps)
