"""The tokenizer of a model directory (or hub name), through transformers' AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

from engine.errors import ModelLoadError


class Tokenizer:
    """What smoothserve needs of a tokenizer: text <-> ids without special tokens, and BOS/EOS ids.

    OPT inputs start with BOS (`</s>`, which is also EOS); callers add it where a sequence starts.
    """

    def __init__(self, hf_tokenizer) -> None:  # a transformers PreTrainedTokenizerBase
        self.hf = hf_tokenizer
        if hf_tokenizer.bos_token_id is None or hf_tokenizer.eos_token_id is None:
            raise ModelLoadError("the tokenizer defines no BOS or EOS token")
        self.bos_token_id: int = int(hf_tokenizer.bos_token_id)
        self.eos_token_id: int = int(hf_tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path_or_name))
    except Exception as error:
        raise ModelLoadError(f"cannot load a tokenizer from {path_or_name} ({type(error).__name__})") from None
    # The engine enforces the model's context length; the tokenizer's own limit only adds warnings.
    hf_tokenizer.model_max_length = 1 << 62
    return Tokenizer(hf_tokenizer)


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    """The token ids the model sees: a text gets OPT's BOS token in front; token ids are taken as given."""
    if isinstance(prompt, str):
        prompt.encode("utf-8")  # UnicodeEncodeError (a ValueError) for lone surrogates
        return [tokenizer.bos_token_id, *tokenizer.encode(prompt)]
    return list(prompt)
