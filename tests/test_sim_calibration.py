"""The default timing reproduces the published vLLM figure it is calibrated to (calibration.py)."""

from __future__ import annotations

import pytest

from gateway.sim.calibration import PUBLISHED_TPOT, PUBLISHED_TTFT_C1, PUBLISHED_TTFT_PROMPT_TOKENS, SimConfig


def test_decode_steps_match_the_published_tpot_at_the_calibration_points() -> None:
    config = SimConfig()
    for concurrency, tpot in PUBLISHED_TPOT:
        tolerance = 0.02 if concurrency in (1, 16) else 0.15  # 4 is off the fitted line
        assert config.step_seconds(0, concurrency) == pytest.approx(tpot, rel=tolerance)


def test_single_request_ttft_matches_the_published_figure() -> None:
    config = SimConfig()
    assert config.step_seconds(PUBLISHED_TTFT_PROMPT_TOKENS, 1) == pytest.approx(PUBLISHED_TTFT_C1, rel=0.02)
