"""The Ray timeline: busy fractions of overlapping stage spans per GPU."""

from __future__ import annotations

import pytest

from qrobust.tools.ray_timeline import busy_fractions


def test_overlapping_spans_on_one_gpu_count_once_and_gaps_not_at_all():
    spans = [
        {"gpus": ("0",), "start": 0.0, "end": 4.0},
        {"gpus": ("0",), "start": 2.0, "end": 6.0},  # overlaps the first: 0..6 busy
        {"gpus": ("1",), "start": 8.0, "end": 10.0},
        {"gpus": ("cpu",), "start": 0.0, "end": 10.0},
    ]
    assert busy_fractions(spans) == pytest.approx({"0": 0.6, "1": 0.2, "cpu": 1.0})


def test_no_spans_no_fractions():
    assert busy_fractions([]) == {}
