"""benchmarks/bench_engine.py's GPU arms (a)-(e), run at toy scale on the tiny model on the CPU, so the script a
GPU session runs (benchmarks/gpu_session.sh) is known to work before a card is at hand."""

from __future__ import annotations

import json

from benchmarks import bench_engine

ARGS = "--tiny --device cpu --requests 2 --max-steps 3 --static-batch 2 --static-steps 2 --unet-repeats 1"


def test_gpu_arms_run_on_the_tiny_model(capsys):
    result = bench_engine.main(ARGS.split())
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == result  # one JSON line, last
    assert [line.split(":")[0] for line in printed if line.startswith("# arm")] == [
        "# arm engine warm-up",
        "# arm pipeline warm-up s",
        *(f"# arm {name}" for name in ("a", "b", "c", "d16", "d32", "engine alone", "e")),
    ]
    rates = result["images_per_s"]
    assert set(rates) == {
        "a_pipeline_compiled_one_at_a_time",
        "b_pipeline_compiled_static_batch",
        "c_engine_identical_in_flight",
        "d_engine_mixed_16_in_flight",
        "d_engine_mixed_32_in_flight",
        "engine_one_at_a_time",
        "e_bare_unet_bound",
    }
    assert all(value > 0 for value in rates.values())
    assert set(result["ratios"]) == {"c_over_b", "c_over_e", "d16_over_a", "d32_over_a", "alone_over_a"}
    c_over_b = rates["c_engine_identical_in_flight"] / rates["b_pipeline_compiled_static_batch"]
    assert abs(result["ratios"]["c_over_b"] - c_over_b) <= 0.01 * c_over_b + 0.005
    assert result["compile"] == "off" and result["buckets"] == []  # the CPU default: eager, no padding
    assert 0 < result["vae_decode_share_of_c"] < 1 and result["warm_up_s"]["engine"] >= 0


def test_warm_up_only_times_a_workers_start_and_nothing_else(capsys):
    """gpu_session.sh's restart stage: the engine's warm-up alone (on the CPU, eager: one call per part)."""
    result = bench_engine.main("--tiny --device cpu --warm-up-only".split())
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == result
    assert [line.split(":")[0] for line in printed if line.startswith("# arm")] == ["# arm engine warm-up"]
    assert set(result["warm_up_s"]) == {"backbone_s", "decode_s", "total_s"} and result["compile"] is None
