"""Test-only fault injection for `smoothserve serve`, switched on by environment variables.

The lifecycle tests run the real `smoothserve serve` in a subprocess, where they cannot monkeypatch the
engine; these variables let them make it slow or make it fail. Never set them in production: the
server logs a warning whenever one is active.

    SMOOTHSERVE_TEST_STEP_DELAY_S=0.02    sleep this long before every engine step (streams that last)
    SMOOTHSERVE_TEST_FAIL_AFTER_STEPS=3   the engine step raises after 3 good steps (an engine failure)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput

logger = logging.getLogger("smoothserve.server")

STEP_DELAY_ENV = "SMOOTHSERVE_TEST_STEP_DELAY_S"
FAIL_AFTER_ENV = "SMOOTHSERVE_TEST_FAIL_AFTER_STEPS"


class InjectedFailure(RuntimeError):
    """The engine failure asked for by SMOOTHSERVE_TEST_FAIL_AFTER_STEPS."""


def install_faults(engine: LLMEngine, environ: Mapping[str, str] = os.environ) -> None:
    """Wrap `engine.step` as the environment asks; without the variables, leave the engine alone."""
    delay = float(environ.get(STEP_DELAY_ENV) or 0)
    fail_after = int(environ[FAIL_AFTER_ENV]) if environ.get(FAIL_AFTER_ENV) else None
    if not delay and fail_after is None:
        return
    logger.warning("TEST FAULT INJECTION ACTIVE (%s=%s, %s=%s): not for production",
                   STEP_DELAY_ENV, delay, FAIL_AFTER_ENV, fail_after)  # fmt: skip
    real_step = engine.step
    steps = 0

    def step() -> list[RequestOutput]:
        nonlocal steps
        time.sleep(delay)
        if fail_after is not None and steps >= fail_after:
            raise InjectedFailure(f"injected engine failure after {steps} steps")
        steps += 1
        return real_step()

    engine.step = step  # type: ignore[method-assign]
