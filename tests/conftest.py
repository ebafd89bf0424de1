"""Shared fixtures: tiny OPT models made offline, once per test session."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars only clutter captured test output

from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.models.loader import LoadedModel, load_model
from engine.models.shapes import OPT_SHAPES
from engine.tiny_model import TinyModelSpec, make_tiny_model

# The fidelity tests need a model whose predictions are peaked: trained briefly on the shipped corpus.
TRAINED_STEPS = 600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _make(factory: pytest.TempPathFactory, name: str, spec: TinyModelSpec) -> Path:
    return make_tiny_model(factory.mktemp(name), spec)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pre-LN, random weights (untrained)."""
    return _make(tmp_path_factory, "tiny", TinyModelSpec(shape=OPT_SHAPES["tiny"], seed=0))


@pytest.fixture(scope="session")
def tiny_outlier_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same random weights as `tiny_model_dir`, with outlier channels planted."""
    return _make(tmp_path_factory, "tiny-outliers", TinyModelSpec(shape=OPT_SHAPES["tiny"], seed=0, outliers=True))


@pytest.fixture(scope="session")
def tiny_post_ln_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OPT-350m's layout: post-LN, 64-d token embeddings projected to 128-d hidden states."""
    return _make(tmp_path_factory, "tiny-post-ln", TinyModelSpec(shape=OPT_SHAPES["tiny-post-ln"], seed=1))


@pytest.fixture(scope="session")
def trained_outlier_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinyModelSpec(shape=OPT_SHAPES["tiny"], seed=0, train_steps=TRAINED_STEPS, outliers=True)
    return _make(tmp_path_factory, "tiny-trained-outliers", spec)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_cpu(model_dir: Path) -> LoadedModel:
    return load_model(ModelConfig(model=str(model_dir), device="cpu", dtype="float32"))
