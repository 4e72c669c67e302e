"""benchmarks/bench_samplers.py --sensitivity, on the tiny model: the figure tests/gpu's sampler bounds rest on."""

from __future__ import annotations

from benchmarks.bench_samplers import sensitivity


def test_sensitivity_measures_each_sampler_guided_and_unguided(tiny_model_path):
    figures = sensitivity(tiny_model_path, samplers=("ddim", "plms"))
    assert set(figures) == {f"{s} guidance {g}" for s in ("ddim", "plms") for g in (7.5, 1.0)}
    # a 1e-6 change of the starting noise: DDIM's picture barely moves (or not at all), on any model
    assert all(figures[f"ddim guidance {g}"] == "identical" or figures[f"ddim guidance {g}"] > 60 for g in (7.5, 1.0))
