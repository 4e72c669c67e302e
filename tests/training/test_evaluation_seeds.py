"""The evaluation's held-out noise seeds are a fixed range that no training run of the recipe and no tuning used."""

import re
from pathlib import Path

from training.evaluate import HELD_OUT_SEED, TUNING_SEED, eval_captions
from training.train import training_seeds

MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"


def recipe_seeds() -> set[int]:
    """--seed of every training.train call of `make train-model` (0 where a call gives none)."""
    recipe = MAKEFILE.read_text().split("train-model:", 1)[1].split("\n\n", 1)[0]
    calls = [call for call in recipe.split("$(BIN)/python -m training.train")[1:]]
    assert calls, "make train-model runs training.train"
    return {int(m.group(1)) if (m := re.search(r"--seed (\d+)", call)) else 0 for call in calls}


def test_held_out_seeds_are_not_training_or_tuning_seeds():
    count = len(eval_captions("full"))
    held_out = set(range(HELD_OUT_SEED, HELD_OUT_SEED + count))
    tuning = set(range(TUNING_SEED, TUNING_SEED + count))
    used = set().union(*(training_seeds(seed) for seed in recipe_seeds()))
    assert 0 in recipe_seeds() and len(recipe_seeds()) >= 2
    assert not held_out & used
    assert not held_out & tuning
