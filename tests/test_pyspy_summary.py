"""The py-spy raw-recording summary used on the serving benchmark's profiles."""

from __future__ import annotations

from benchmarks.pyspy_summary import summarize

RAW = """\
thread (1): engine;run (server/engine_client.py:190);step (engine/llm_engine.py:200);sample (engine/sampling.py:140) 30
thread (1): engine;run (server/engine_client.py:195);step (engine/llm_engine.py:201);sync (torch/cuda/s.py:9) 50
thread (2): MainThread;select (selectors.py:468) 15
thread (2): MainThread;write (asyncio/selector_events.py:1057) 5
"""


def test_threads_functions_and_innermost_frames() -> None:
    text = summarize(RAW.splitlines(), frames=5)
    assert text.splitlines()[0] == "100 samples"
    engine = text.split("thread (1): engine: 80 samples (80.0 %)")[1].split("thread (2)")[0]
    # Lines of one function merge (run at :190 and :195); innermost frames keep their lines.
    assert "100.0 %  run (server/engine_client.py)" in engine
    assert " 62.5 %  sync (torch/cuda/s.py)" in engine
    assert " 62.5 %  sync (torch/cuda/s.py:9)" in engine.split("innermost:")[1]
    assert "thread (2): MainThread: 20 samples (20.0 %)" in text


def test_match_keeps_only_the_named_frames() -> None:
    text = summarize(RAW.splitlines(), frames=5, match=("engine/",))
    assert "step (engine/llm_engine.py)" in text and "run (server/engine_client.py)" not in text.split("innermost")[0]
