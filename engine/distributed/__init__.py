"""Tensor parallelism: one process per GPU, heads and FFN split across them (Megatron-LM style).

parallel_state  the process group and the collectives the model calls (no-ops at world size 1)
sharding        which part of every checkpoint tensor a rank holds (`Shard`, `checkpoint_pieces`)
layers          the vocabulary-parallel embedding (and tied LM head)
executor        rank 0's side: spawn the other ranks, send them each step, stop them
worker          the loop of ranks 1..N-1
"""
