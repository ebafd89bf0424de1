"""Incremental detokenization: whole characters only, and nothing that may start a stop string."""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import load_tokenizer


def feed(detokenizer: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    pieces, stopped = [], False
    for end in range(1, len(ids) + 1):
        new, stopped = detokenizer.update(ids[:end])
        pieces.append(new)
        if stopped:
            break
    return pieces, stopped


def test_never_releases_half_a_character(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    text = "naïve café ✓ done"
    ids = tokenizer.encode(text)
    pieces, _ = feed(IncrementalDetokenizer(tokenizer, ()), ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_holds_back_a_possible_stop_string_and_cuts_at_it(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer.encode("To be, or not to be: that is the question")
    pieces, stopped = feed(IncrementalDetokenizer(tokenizer, ("not to",)), ids)
    assert stopped and "".join(pieces) == "To be, or "
    assert not any("not" in piece for piece in pieces)


def test_final_update_releases_what_was_held(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer.encode("ends with no")
    detokenizer = IncrementalDetokenizer(tokenizer, ("not",))
    pieces, stopped = feed(detokenizer, ids)
    assert not stopped and not "".join(pieces).endswith("no")
    new, stopped = detokenizer.update(ids, final=True)
    assert not stopped and "".join(pieces) + new == detokenizer.text == "ends with no"
