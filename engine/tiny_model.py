"""`smoothserve make-tiny-model`: a real Hugging Face OPT directory made offline from a seed.

It holds config.json, model.safetensors and a byte-level BPE tokenizer trained on the corpus the
project ships (Shakespeare, public domain). Random weights give nearly flat next-token
distributions, so `train_steps` runs a short CPU training to make predictions peaked like a real
model's. `outliers` plants outlier input channels the way real OPT models have them, without
changing the function: channel j of a LayerNorm's weight and bias is multiplied by c_j and column j
of the Linears it feeds is divided by c_j.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.errors import ConfigError
from engine.models.shapes import OPT_SHAPES, OPTShape

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in OPT's tokenizer
CORPUS_RESOURCE = "tinyshakespeare.txt"
HELDOUT_FRACTION = 0.1
# Real OPT models carry a handful of outlier channels at roughly 20-100x the median magnitude.
OUTLIER_FACTOR_RANGE = (20.0, 100.0)


@dataclass(frozen=True)
class TinyModelSpec:
    shape: OPTShape
    seed: int = 0
    tokenizer_vocab_size: int = 2048
    train_steps: int = 0
    train_seq_len: int = 128
    train_batch_size: int = 16
    learning_rate: float = 3e-3
    outliers: bool = False
    num_outlier_channels: int | None = None  # None: hidden_size // 32, between 2 and 8
    dtype: str = "float32"
    corpus: Path | None = None  # None: the shipped corpus


def shipped_corpus() -> str:
    return resources.files("engine.data").joinpath(CORPUS_RESOURCE).read_text(encoding="utf-8")


def split_corpus(text: str) -> tuple[str, str]:
    """(training text, held-out text): the last 10%, cut at a line break, is never trained on."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELDOUT_FRACTION))) + 1
    return text[:cut], text[cut:]


def resolve_shape(name: str, overrides: dict[str, object]) -> OPTShape:
    if name not in OPT_SHAPES:
        raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(OPT_SHAPES)}")
    shape = replace(OPT_SHAPES[name], **{k: v for k, v in overrides.items() if v is not None})
    if shape.hidden_size % shape.num_heads:
        raise ConfigError(f"hidden size {shape.hidden_size} is not divisible by {shape.num_heads} heads")
    return shape


def train_tokenizer(text: str, vocab_size: int, out_dir: Path):
    """Train a byte-level BPE (GPT-2 style, like OPT's) and save it in transformers' format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    bos = SPECIAL_TOKENS.index("</s>")
    # OPT's tokenizer starts every input with </s>.
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def _train(model, token_ids: torch.Tensor, spec: TinyModelSpec) -> float:
    """A short language-modeling run on random windows of the corpus; returns the last loss."""
    generator = torch.Generator().manual_seed(spec.seed)
    body = min(spec.train_seq_len, model.config.max_position_embeddings) - 1
    bos = torch.full((spec.train_batch_size, 1), model.config.bos_token_id, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.train_steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.train_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    loss_value = float("nan")
    with tqdm(range(spec.train_steps), desc="Training tiny model", unit="step") as steps:
        for _ in steps:
            starts = torch.randint(0, len(token_ids) - body, (spec.train_batch_size,), generator=generator)
            batch = torch.cat([bos, torch.stack([token_ids[s : s + body] for s in starts.tolist()])], dim=1)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_value = loss.item()
            steps.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


@torch.no_grad()
def plant_outliers(model, spec: TinyModelSpec) -> dict[str, list[float]]:
    """Scale a few LayerNorm output channels up by c_j and the columns that read them down by c_j.

    The same channels in every layer, as in real OPT models. Returns {channel: [c_j per layer]}.
    """
    config = model.config
    if not config.do_layer_norm_before:
        raise ConfigError("--outliers needs a pre-LN shape: in post-LN OPT the LayerNorm output is the residual")
    hidden = config.hidden_size
    count = spec.num_outlier_channels or min(8, max(2, hidden // 32))
    rng = random.Random(spec.seed + 1)
    channels = sorted(rng.sample(range(hidden), count))
    planted: dict[str, list[float]] = {str(c): [] for c in channels}
    for layer in model.model.decoder.layers:
        attn = layer.self_attn
        for norm, linears in (
            (layer.self_attn_layer_norm, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (layer.final_layer_norm, (layer.fc1,)),
        ):
            for channel in channels:
                factor = rng.uniform(*OUTLIER_FACTOR_RANGE)
                norm.weight[channel] *= factor
                norm.bias[channel] *= factor
                for linear in linears:
                    linear.weight[:, channel] /= factor
                planted[str(channel)].append(round(factor, 3))
    return planted


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec) -> Path:
    """Write an HF-format OPT directory; returns it. Deterministic for a given spec."""
    from transformers import OPTConfig, OPTForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = spec.corpus.read_text(encoding="utf-8") if spec.corpus else shipped_corpus()
    train_text, _ = split_corpus(text)
    if not train_text.strip():
        raise ConfigError("the training corpus is empty")
    tokenizer = train_tokenizer(text, spec.tokenizer_vocab_size, out)

    torch.manual_seed(spec.seed)
    config = OPTConfig(**spec.shape.to_hf_config(len(tokenizer)))
    model = OPTForCausalLM(config)
    info: dict[str, object] = {"seed": spec.seed, "train_steps": spec.train_steps}
    if spec.train_steps > 0:
        ids = torch.tensor(tokenizer.encode(train_text, add_special_tokens=False), dtype=torch.long)
        info["final_train_loss"] = round(_train(model, ids, spec), 4)
    if spec.outliers:
        info["outlier_channels"] = plant_outliers(model, spec)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    model.to(dtype).save_pretrained(str(out), safe_serialization=True)
    (out / "tiny_model.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("wrote %s (%s)", out, info)
    return out
