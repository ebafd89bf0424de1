"""How the decode step is cut into CUDA-graph pieces: every layer once, in order, the first piece alone."""

from __future__ import annotations

import pytest

from engine.model_runner import layer_pieces


@pytest.mark.parametrize("num_layers", [1, 2, 9, 10, 40, 48, 96])
@pytest.mark.parametrize("piece_layers", [1, 3, 8])
def test_pieces_cover_every_layer_once_in_order(num_layers: int, piece_layers: int) -> None:
    pieces = layer_pieces(num_layers, piece_layers)
    assert [layer for piece in pieces for layer in piece] == list(range(num_layers))
    assert len(pieces[0]) == 1  # the GPU waits only for the launch of one layer's graph
    assert all(1 <= len(piece) <= piece_layers for piece in pieces[1:])


def test_an_opt_30b_step_is_a_few_pieces() -> None:
    assert [len(piece) for piece in layer_pieces(48, 8)] == [1, 8, 8, 8, 8, 8, 7]


def test_no_piece_size_is_one_graph_per_step() -> None:
    assert layer_pieces(40, None) == [range(40)]
