"""benchmarks/bench_samplers.py --sensitivity, on the tiny model: the figures tests/gpu's sampler bounds rest on."""

from __future__ import annotations

from benchmarks.bench_samplers import sensitivity


def test_sensitivity_measures_each_sampler_three_ways_and_another_noise_for_scale(tiny_model_path):
    figures = sensitivity(tiny_model_path, samplers=("ddim", "plms"))
    ways = ("guided at every step", "guided over 0-1", "guided over 0-1, another noise", "unguided")
    assert set(figures) == {f"{sampler} {way}" for sampler in ("ddim", "plms") for way in ways}
    # a 1e-6 change of the starting noise barely moves DDIM's picture (or not at all); another noise moves it
    assert all(figures[f"ddim {way}"] in ("identical",) or figures[f"ddim {way}"] > 60 for way in ways[:2] + ways[3:])
    assert figures["ddim guided over 0-1, another noise"] < 40
