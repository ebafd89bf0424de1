"""Programmatic dependent launch changes when our kernels start, never what they compute.

With PDL each kernel may be scheduled while the one before it drains and waits (griddepcontrol.wait)
before touching memory. A kernel that read or wrote too early would race with its predecessor: results
would differ from run to run and from a run without PDL. The chain below is a decoder layer at OPT-13B
width, four times over, built from the ops the model uses (LayerNorm-quantize, the GEMMs in their decode
and prefill configurations, the KV write, decode attention, static quantization), run eagerly and as a
replayed CUDA graph. SMOOTHSERVE_PDL is read once per process, so each setting runs in its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[1]

CHAIN = r"""
import sys
import torch
from engine import ops

tokens = int(sys.argv[2])
torch.manual_seed(0)
dev, half = "cuda", torch.float16
hidden, heads, ffn, ctx, block = 5120, 40, 20480, 512, 16
head_dim = hidden // heads


def weight(n, k):
    q, s = ops.quantize_weight(torch.randn(n, k, device=dev, dtype=half) * 0.02, "per_channel")
    return q, s, torch.randn(n, device=dev, dtype=half) * 0.01


qkv, out_proj, fc1, fc2 = weight(3 * hidden, hidden), weight(hidden, hidden), weight(ffn, hidden), weight(hidden, ffn)
ln = [(1 + 0.1 * torch.randn(hidden, device=dev, dtype=half), 0.1 * torch.randn(hidden, device=dev, dtype=half))
      for _ in range(2)]
scale_in, scale_attn, scale_fc2 = (torch.tensor([s], device=dev) for s in (0.03, 0.01, 0.05))
blocks_per_seq = (ctx + 1 + block - 1) // block
num_blocks = tokens * blocks_per_seq
key_cache = torch.randn(num_blocks, block, heads, head_dim, device=dev, dtype=half)
value_cache = torch.randn_like(key_cache)
tables = torch.arange(num_blocks, device=dev, dtype=torch.int32).view(tokens, blocks_per_seq)
lens = torch.full((tokens,), ctx + 1, device=dev, dtype=torch.int32)
slots = (tables[:, ctx // block].long() * block + ctx % block)
x0 = torch.randn(tokens, hidden, device=dev, dtype=half)
residual0 = torch.randn(tokens, hidden, device=dev, dtype=half)


def layer(x, residual):
    qx, residual = ops.add_layernorm_quant(x, residual, *ln[0], 1e-5, "per_tensor_static", scale_in)
    q, k, v = ops.w8a8_gemm(qx.data, qkv[0], qx.scale, qkv[1], qkv[2]).chunk(3, dim=-1)
    shape = (tokens, heads, head_dim)
    ops.write_kv_cache(k.view(shape), v.view(shape), key_cache, value_cache, slots)
    attn = ops.paged_attention_decode(q.view(shape), key_cache, value_cache, tables, lens, head_dim**-0.5)
    qa = ops.quantize_static(attn.reshape(tokens, hidden), scale_attn)
    update = ops.w8a8_gemm(qa.data, out_proj[0], qa.scale, out_proj[1], out_proj[2])
    qx, residual = ops.add_layernorm_quant(update, residual, *ln[1], 1e-5, "per_tensor_static", scale_in)
    h = ops.w8a8_gemm_int8_out(qx.data, fc1[0], qx.scale, fc1[1], fc1[2], relu=True, out_scale=scale_fc2)
    return ops.w8a8_gemm(h, fc2[0], scale_fc2, fc2[1], fc2[2]), residual


def forward():
    x, residual = x0, residual0
    for _ in range(4):
        x, residual = layer(x, residual)
    return torch.cat([x, residual])


eager = forward().clone()
stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(stream):
    forward()  # warm-up outside the capture
torch.cuda.current_stream().wait_stream(stream)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = forward()
replays = []
for _ in range(3):
    graph.replay()
    replays.append(captured.clone())
torch.cuda.synchronize()
torch.save({"eager": eager.cpu(), "replays": [r.cpu() for r in replays]}, sys.argv[1])
"""


def _run_chain(tmp_path: Path, pdl: bool, tokens: int) -> dict:
    out = tmp_path / f"chain-{'pdl' if pdl else 'nopdl'}-{tokens}.pt"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "SMOOTHSERVE_PDL": "1" if pdl else "0", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", CHAIN, str(out), str(tokens)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("tokens", [1, 64])  # the decode GEMMs (swapped, narrow and stream-K) and wider ones
def test_kernels_give_the_same_bits_with_and_without_pdl(tmp_path, tokens) -> None:
    with_pdl, without = _run_chain(tmp_path, True, tokens), _run_chain(tmp_path, False, tokens)
    reference = without["eager"]
    assert torch.isfinite(reference).all() and reference.abs().max() > 0
    for run in (with_pdl, without):
        assert torch.equal(run["eager"], reference)
        for replay in run["replays"]:
            assert torch.equal(replay, reference)
