"""RequestOutput.snapshot: what the server hands to a stream must not change under later engine steps."""

from __future__ import annotations

from engine.outputs import CompletionOutput, RequestOutput


def test_snapshot_is_unaffected_by_later_steps() -> None:
    completion = CompletionOutput(0, "Hello", [5, 6], None, [-0.5, -0.25], [[(5, -0.5)], [(6, -0.25)]])
    live = RequestOutput("r", "prompt", [1, 2, 3], [completion], ["lo"])
    snap = live.snapshot()
    # What the engine does to its live output in the next step:
    completion.token_ids.append(7)
    completion.logprobs.append(-1.0)
    completion.top_logprobs.append([(7, -1.0)])
    completion.text += " world"
    completion.finish_reason = "length"
    live.new_text[0] = " world"
    assert snap.outputs[0] == CompletionOutput(0, "Hello", [5, 6], None, [-0.5, -0.25], [[(5, -0.5)], [(6, -0.25)]])
    assert snap.new_text == ["lo"] and not snap.finished and live.finished
    assert snap.prompt_token_ids == [1, 2, 3] and snap.request_id == "r"
