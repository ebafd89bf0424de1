"""Tensor parallelism on the CPU (gloo): sharded layers add up to the unsharded ones, a rank reads only its
slice of the checkpoint, TP=2 generates what TP=1 does, and worker processes never outlive the engine.

W8A8 and the row-parallel layers (out_proj, fc2): with dynamic activation scales (O1 per token, O2 per
tensor) each rank quantizes its own shard of the input features with its own scale, as TensorRT-LLM
does; that saves an all-reduce(max) per layer, and a scale over fewer features is, if anything, finer.
So TP=2 differs from TP=1 at O1/O2 by quantization noise: the greedy tokens agree, and TP=2 is as close
to the float model as TP=1 is. With static scales (O3), and for the float model, every rank quantizes
exactly as TP=1 does, int32 accumulation is exact, and the logits agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.config import ModelConfig, QuantConfig
from engine.distributed.sharding import Shard
from engine.distributed.worker import rank_device
from engine.errors import ConfigError, WorkerFailedError
from engine.layers.attention import AttentionMetadata
from engine.models.loader import load_model
from engine.models.opt import OPTForCausalLM
from tests.conftest import free_port, load_cpu

PROMPTS = ["KING RICHARD:\nNow is the winter", "O", "To be, or not to be, that is the question:"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
FLOAT32_ATOL = 1e-4  # logits of magnitude ~1-10 after a few float32 reductions in another order
# An untrained model's logits are nearly flat (std ~0.2), so quantization noise would decide greedy ties.
# Scaling the tied embedding spreads them (std ~2) as a trained model's are, in no time.
PEAKED_EMBEDDING_SCALE = 8.0


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return f"pid {pid}"


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.fixture(scope="module")
def peaked_model_dir(tiny_outlier_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-peaked")
    for path in tiny_outlier_model_dir.glob("*.json"):  # config and tokenizer
        (out / path.name).write_bytes(path.read_bytes())
    weights = load_file(str(tiny_outlier_model_dir / "model.safetensors"))
    weights["model.decoder.embed_tokens.weight"] *= PEAKED_EMBEDDING_SCALE
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():  # OPT initializes biases to zero; the row-parallel ones must count
        if name.endswith(("proj.bias", "fc1.bias", "fc2.bias")):
            tensor.normal_(0.0, 0.1, generator=generator)
    save_file(weights, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def w8a8_dirs(peaked_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Smoothed W8A8 checkpoints of the peaked model: O1 (dynamic per-token) and O3 (static) activation
    scales with per-channel weight scales, and O3 with per-tensor weight scales."""
    from engine.quant.calibrate import calibrate
    from engine.quant.checkpoint import save_w8a8
    from engine.quant.data import token_windows
    from engine.quant.quantize import smoothquant
    from engine.tiny_model import shipped_corpus
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(peaked_model_dir)
    windows = token_windows(tokenizer, [shipped_corpus()[:20_000]], 8, 64).token_ids
    stats = calibrate(load_cpu(peaked_model_dir).model, windows, progress=False)
    dirs = {}
    for name, quant in (("O1", QuantConfig(level="O1")), ("O3", QuantConfig(level="O3")),
                        ("O3-per-tensor", QuantConfig(level="O3", weight_granularity="per_tensor"))):  # fmt: skip
        model = load_cpu(peaked_model_dir).model
        smoothquant(model, quant, stats)
        dirs[name] = save_w8a8(model, quant, tmp_path_factory.mktemp(f"w8a8-{name}"), peaked_model_dir)
    return dirs


# --------------------------------------------------------------------------------------------------
# Sharding math, in one process: with no process group the model's all-reduce is the identity, so a
# rank's module returns its partial result and the test adds them up.


@pytest.mark.parametrize("variant", ["float", "O3", "O3-per-tensor"])
def test_sharded_layers_add_up_to_the_unsharded_layer(peaked_model_dir, w8a8_dirs, variant) -> None:
    model_dir = peaked_model_dir if variant == "float" else w8a8_dirs[variant]
    config = ModelConfig(model=str(model_dir), device="cpu", dtype="float32")
    full = load_model(config).model
    ranks = [load_model(config, Shard(rank, 2)).model for rank in range(2)]
    assert ranks[0].decoder.layers[0].self_attn.attn.num_heads == full.arch.num_heads // 2
    x = torch.randn(7, full.arch.hidden_size, generator=torch.Generator().manual_seed(0))
    metadata = AttentionMetadata.no_cache([3, 4])
    for index, layer in enumerate(full.decoder.layers):
        rank_layers = [model.decoder.layers[index] for model in ranks]
        attention = layer.self_attn(layer.self_attn_layer_norm(x), metadata)
        summed = sum(r.self_attn(r.self_attn_layer_norm(x), metadata) for r in rank_layers)
        torch.testing.assert_close(summed, attention, atol=1e-5, rtol=1e-5)
        mlp = layer.mlp(layer.final_layer_norm(x))
        torch.testing.assert_close(sum(r.mlp(r.final_layer_norm(x)) for r in rank_layers), mlp, atol=1e-5, rtol=1e-5)
    ids = torch.arange(0, full.arch.vocab_size, 97)
    embedded = sum(model.decoder.embed_tokens(ids) for model in ranks)
    assert torch.equal(embedded, full.decoder.embed_tokens(ids))  # each token's row lives on exactly one rank


def test_the_vocabulary_is_padded_to_a_multiple_of_the_ranks_and_padding_is_dropped(tiny_outlier_model_dir) -> None:
    loaded = load_cpu(tiny_outlier_model_dir)
    odd = replace(loaded.arch, vocab_size=loaded.arch.vocab_size - 1)
    weights = dict(loaded.model.state_dict())
    weights["decoder.embed_tokens.weight"] = weights["decoder.embed_tokens.weight"][: odd.vocab_size]
    full = OPTForCausalLM(odd)
    full.load_weights(weights.items())
    ranks = [OPTForCausalLM(odd, Shard(rank, 2)) for rank in range(2)]
    for model in ranks:
        assert model.missing_weights(model.load_weights(weights.items())) == []  # padding counts as written
    last_rank = ranks[1].decoder.embed_tokens
    assert last_rank.num_embeddings == (odd.vocab_size + 1) // 2 and not last_rank.weight[-1].any()
    hidden = torch.randn(5, odd.hidden_size)
    local = [F.linear(hidden, model.decoder.embed_tokens.weight) for model in ranks]  # each rank's logits
    torch.testing.assert_close(torch.cat(local, dim=-1)[:, : odd.vocab_size], full.compute_logits(hidden))
    ids = torch.tensor([0, odd.vocab_size // 2, odd.vocab_size - 1])
    assert torch.equal(sum(model.decoder.embed_tokens(ids) for model in ranks), full.decoder.embed_tokens(ids))


def test_heads_or_ffn_not_divisible_by_the_ranks_is_a_clear_error(tiny_outlier_model_dir) -> None:
    arch = load_cpu(tiny_outlier_model_dir).arch  # 4 heads, FFN 512
    with pytest.raises(ConfigError, match=r"attention heads \(4\) is not divisible by the tensor-parallel size 3"):
        OPTForCausalLM(arch, Shard(0, 3))
    with pytest.raises(ConfigError, match=r"ffn_dim\) \(510\) is not divisible by the tensor-parallel size 4"):
        OPTForCausalLM(replace(arch, ffn_dim=510), Shard(0, 4))


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_more_ranks_than_gpus_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"tensor_parallel_size 2 needs 2 GPUs, but \d are visible"):
        rank_device("cuda", 0, 2)


def test_a_whole_model_runs_no_collectives_beside_a_tensor_parallel_engine(tiny_outlier_model_dir) -> None:
    ids = torch.tensor([[2, 100, 200, 300]])
    model = load_cpu(tiny_outlier_model_dir).model
    expected = model.score(ids)
    # The engine's process group is process-wide: were the whole model's all-reduces real, they would wait for
    # rank 1 (which runs nothing) until the timeout.
    with LLM(str(tiny_outlier_model_dir), device="cpu", dtype="float32", tensor_parallel_size=2,
             num_cpu_blocks=16, collective_timeout_s=5) as llm:  # fmt: skip
        torch.testing.assert_close(model.score(ids), expected)
        assert llm.generate("Hello", SamplingParams(max_tokens=2))[0].outputs[0].token_ids  # still in step


def test_a_rank_reads_only_its_slice_of_a_safetensors_checkpoint(tiny_outlier_model_dir, monkeypatch) -> None:
    import safetensors

    real_open = safetensors.safe_open
    with real_open(str(tiny_outlier_model_dir / "model.safetensors"), framework="pt") as f:
        sizes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
    read: dict[str, int] = {}  # elements read from the file, per tensor

    class SliceSpy:
        def __init__(self, inner, name: str) -> None:
            self.inner, self.name = inner, name

        def get_shape(self) -> list[int]:
            return self.inner.get_shape()

        def __getitem__(self, index):
            tensor = self.inner[index]
            read[self.name] = read.get(self.name, 0) + tensor.numel()
            return tensor

    class OpenSpy:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.handle.keys()

        def get_slice(self, name: str) -> SliceSpy:
            return SliceSpy(self.handle.get_slice(name), name)

        def get_tensor(self, name: str) -> torch.Tensor:
            tensor = self.handle.get_tensor(name)
            read[name] = read.get(name, 0) + tensor.numel()
            return tensor

    monkeypatch.setattr(safetensors, "safe_open", OpenSpy)
    load_model(ModelConfig(model=str(tiny_outlier_model_dir), device="cpu", dtype="float32"), Shard(1, 2))
    split = ("q_proj.", "k_proj.", "v_proj.", "fc1.", "out_proj.weight", "fc2.weight", "embed_tokens.")
    numel = {name: torch.Size(shape).numel() for name, shape in sizes.items()}
    for name in sizes:
        if any(part in name for part in split):
            assert read[name] == numel[name] // 2, name
    # rank 1 of 2 adds no row-parallel bias (rank 0 does): it reads nothing of it
    assert all(name not in read for name in sizes if name.endswith(("out_proj.bias", "fc2.bias")))
    assert sum(read.values()) < 0.55 * sum(numel.values())


# --------------------------------------------------------------------------------------------------
# The engine with two ranks (ranks 1.. are processes, gloo on the CPU)


def _generate(model_dir: Path, tensor_parallel_size: int, **kwargs) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of PROMPTS and the logits of every step (chunked prefill mixes prefill with decodes)."""
    llm = LLM(str(model_dir), device="cpu", dtype="float32", tensor_parallel_size=tensor_parallel_size,
              num_cpu_blocks=64, max_num_batched_tokens=8, **kwargs)  # fmt: skip
    logits: list[torch.Tensor] = []
    execute = llm.engine.runner.execute

    def recording(*args):
        output = execute(*args)
        logits.append(output.logits.clone())
        return output

    llm.engine.runner.execute = recording
    with llm:
        tokens = [output.outputs[0].token_ids for output in llm.generate(PROMPTS, GREEDY)]
    return tokens, logits


def test_two_ranks_generate_what_one_does_float(peaked_model_dir) -> None:
    tokens, logits = _generate(peaked_model_dir, 1)
    tp_tokens, tp_logits = _generate(peaked_model_dir, 2)
    assert tp_tokens == tokens
    assert len(tp_logits) == len(logits)
    for tp_step, step in zip(tp_logits, logits, strict=True):
        torch.testing.assert_close(tp_step, step, atol=FLOAT32_ATOL, rtol=0)


def test_two_ranks_generate_what_one_does_with_an_int8_kv_cache(peaked_model_dir) -> None:
    """Each rank keeps its heads' int8 rows and per-head scales: the same numbers one rank keeps."""
    tokens, logits = _generate(peaked_model_dir, 1, kv_cache_dtype="int8")
    tp_tokens, tp_logits = _generate(peaked_model_dir, 2, kv_cache_dtype="int8")
    assert tp_tokens == tokens
    for tp_step, step in zip(tp_logits, logits, strict=True):
        torch.testing.assert_close(tp_step, step, atol=FLOAT32_ATOL, rtol=0)


@pytest.mark.parametrize("level", ["O1", "O3"])
def test_two_ranks_generate_what_one_does_w8a8(peaked_model_dir, w8a8_dirs, level) -> None:
    tokens, logits = _generate(w8a8_dirs[level], 1)
    tp_tokens, tp_logits = _generate(w8a8_dirs[level], 2)
    assert tp_tokens == tokens
    assert [t.shape for t in tp_logits] == [t.shape for t in logits]
    rows = torch.cat([(tp - one).abs().amax(dim=-1) for tp, one in zip(tp_logits, logits, strict=True)])
    if level == "O3":
        # Static scales: each layer matches TP=1 to float32 rounding (test_sharded_layers_add_up_...). End to
        # end, a rounding difference could still tip one int8 rounding in a later layer (an element within
        # ~1e-7 of a .5 boundary): rare, and that row would then differ by quantization noise only.
        assert (rows <= FLOAT32_ATOL).float().mean() >= 0.9, rows
    # Same inputs in every run until the first sampled token: TP=2 W8A8 is as close to the float model as
    # TP=1 W8A8 is (O1: each rank's per-token scales cover only its half of out_proj's and fc2's inputs).
    _, float_logits = _generate(peaked_model_dir, 1)
    first = next(i for i, step in enumerate(logits) if step.numel())
    tp1_error = (logits[first] - float_logits[first]).abs().max()
    tp2_error = (tp_logits[first] - float_logits[first]).abs().max()
    assert tp2_error <= 1.25 * tp1_error, (tp2_error, tp1_error)


def test_a_killed_rank_fails_the_next_step_and_no_process_remains(tiny_outlier_model_dir) -> None:
    llm = LLM(str(tiny_outlier_model_dir), device="cpu", dtype="float32", tensor_parallel_size=2,
              num_cpu_blocks=64, collective_timeout_s=20)  # fmt: skip
    engine = llm.engine
    engine.add_request("a", "Hello", SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    worker = engine.executor.workers[0].process
    os.kill(worker.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerFailedError, match=r"rank 1 \(pid \d+\) exited with code -9"):
        engine.step()
    assert time.monotonic() - started < 20
    assert not _running(worker.pid)
    with pytest.raises(WorkerFailedError):  # the engine stays failed
        engine.step()
    llm.shutdown()


def test_a_hung_rank_times_out_instead_of_hanging(tiny_outlier_model_dir) -> None:
    timeout_s = 3.0
    llm = LLM(str(tiny_outlier_model_dir), device="cpu", dtype="float32", tensor_parallel_size=2,
              num_cpu_blocks=64, collective_timeout_s=timeout_s)  # fmt: skip
    engine = llm.engine
    engine.add_request("a", "Hello", SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    worker = engine.executor.workers[0].process
    os.kill(worker.pid, signal.SIGSTOP)  # alive, but never joins the next collective
    started = time.monotonic()
    with pytest.raises(WorkerFailedError, match=r"rank 1 \(pid \d+\) did not respond"):
        engine.step()
    assert timeout_s <= time.monotonic() - started < timeout_s + 10
    assert not _running(worker.pid)  # killed, though stopped


def test_shutdown_and_garbage_collection_stop_every_rank(tiny_outlier_model_dir) -> None:
    import gc

    with LLM(str(tiny_outlier_model_dir), device="cpu", dtype="float32", tensor_parallel_size=2,
             num_cpu_blocks=64) as llm:  # fmt: skip
        pids = [worker.process.pid for worker in llm.engine.executor.workers]
        assert all(_running(pid) for pid in pids)
        assert llm.generate("Hello", SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    assert not any(_running(pid) for pid in pids)
    del llm
    llm = LLM(str(tiny_outlier_model_dir), device="cpu", dtype="float32", tensor_parallel_size=2,
              num_cpu_blocks=64)  # fmt: skip
    pids = [worker.process.pid for worker in llm.engine.executor.workers]
    del llm
    gc.collect()
    assert not any(_running(pid) for pid in pids)


def test_random_weights_need_no_checkpoint(tiny_outlier_model_dir, tmp_path) -> None:
    shapes_only = tmp_path / "shapes-only"
    shapes_only.mkdir()
    for path in tiny_outlier_model_dir.glob("*.json"):  # config and tokenizer, no weights
        (shapes_only / path.name).write_bytes(path.read_bytes())
    with LLM(str(shapes_only), device="cpu", dtype="float32", load_format="random", quantization="w8a8",
             quant=QuantConfig(level="O3")) as llm:  # fmt: skip
        qkv = llm.engine.model.decoder.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == torch.int8 and qkv.weight.abs().max() > 100  # int8 range used, no calibration
        output = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0]
        assert len(output.token_ids) == 3
    with pytest.raises(Exception, match="unknown random model shape 'random:opt-9b'"):
        load_model(ModelConfig(model="random:opt-9b", load_format="random", device="cpu"))


def test_serve_with_two_ranks_answers_a_completion(tiny_outlier_model_dir, tmp_path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "engine.cli", "serve", "--model", str(tiny_outlier_model_dir), "--port", str(port),
               "--device", "cpu", "--dtype", "float32", "--num-cpu-blocks", "64", "--max-model-len", "128",
               "--served-model-name", "tiny", "--tensor-parallel-size", "2"]  # fmt: skip
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        workers = _children(server.pid)
        assert workers, "rank 1 runs in a child process of the server"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text()
        # The children include multiprocessing's resource tracker, which exits on its own once the server's
        # end of its pipe closes: give every child a moment, then none may be left.
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in workers), [_cmdline(pid) for pid in workers if _running(pid)]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_ranks_exit_when_the_engine_process_is_killed(tiny_outlier_model_dir) -> None:
    script = "\n".join([
        "import sys, time",
        "from engine import LLM",
        "llm = LLM(sys.argv[1], device='cpu', dtype='float32', tensor_parallel_size=2, num_cpu_blocks=16)",
        "print(*[w.process.pid for w in llm.engine.executor.workers], flush=True)",
        "time.sleep(120)",
    ])  # fmt: skip
    engine = subprocess.Popen([sys.executable, "-c", script, str(tiny_outlier_model_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        workers = [int(pid) for pid in engine.stdout.readline().split()]
        assert workers and all(_running(pid) for pid in workers)
    finally:
        engine.kill()  # SIGKILL: no atexit, no finalizer
        engine.wait()
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in workers)
