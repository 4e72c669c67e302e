import random

import numpy as np
import pytest

from training.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    ShapesWorld,
    all_captions,
    parse_caption,
    random_scene,
    render,
    training_caption,
)


def test_same_seed_same_pictures_and_scenes():
    pixels_a, scenes_a = ShapesWorld(7).batch(16)
    pixels_b, scenes_b = ShapesWorld(7).batch(16)
    assert scenes_a == scenes_b
    assert np.array_equal(pixels_a, pixels_b)
    pixels_c, _ = ShapesWorld(8).batch(16)
    assert not np.array_equal(pixels_a, pixels_c)


def test_grammar_counts_and_round_trip():
    with_size, without_size = all_captions(), all_captions(with_size=False)
    assert len(with_size) == len(SIZES) * len(COLOURS) * len(SHAPES) * len(BACKGROUNDS) == 108
    assert len(without_size) == 54
    assert len(set(with_size + without_size)) == 162
    assert "a large red circle on a white background" in with_size
    assert "a blue square on a gray background" in without_size
    for caption in with_size + without_size:
        words = parse_caption(caption)
        assert caption.split()[-2] == words["background"]


@pytest.mark.parametrize("caption", ["a red circle", "a huge red circle on a white background", ""])
def test_parse_caption_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(caption)


def test_scene_geometry_follows_shapes_md():
    rng = random.Random(3)
    for _ in range(500):
        scene = random_scene(rng)
        low, high = SIZES[scene.size]
        assert low <= scene.box <= high
        assert 0 <= scene.left <= 64 - scene.box and 0 <= scene.top <= 64 - scene.box


def test_picture_is_background_outside_the_box_and_colour_inside():
    scene = random_scene(random.Random(5), size="large", colour="purple", shape="square", background="gray")
    pixels = np.asarray(render(scene))
    assert pixels.shape == (64, 64, 3)
    inside = pixels[scene.top + 2 : scene.top + scene.box - 2, scene.left + 2 : scene.left + scene.box - 2]
    assert (inside == COLOURS["purple"]).all()
    outside = np.ones((64, 64), bool)
    outside[scene.top : scene.top + scene.box, scene.left : scene.left + scene.box] = False
    assert (pixels[outside] == BACKGROUNDS["gray"]).all()


def test_triangle_is_upright_base_at_the_bottom():
    scene = random_scene(random.Random(1), size="large", shape="triangle", colour="red", background="black")
    pixels = np.asarray(render(scene)).astype(int)
    shape_rows = pixels[scene.top : scene.top + scene.box].sum(axis=(1, 2))  # ink per row
    assert shape_rows[-2] > 3 * shape_rows[2]


def test_caption_dropout_rates():
    rng = random.Random(0)
    scene = random_scene(random.Random(0))
    captions = [training_caption(scene, rng) for _ in range(4000)]
    empty = sum(caption == "" for caption in captions) / len(captions)
    sizeless = sum(caption != "" and scene.size not in caption for caption in captions) / len(captions)
    assert 0.08 < empty < 0.12
    assert 0.24 < sizeless < 0.30  # 0.9 * 0.3
