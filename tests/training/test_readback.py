import numpy as np
import pytest

from training.readback import read_back
from training.shapes import ShapesWorld


def test_read_back_is_right_on_generated_pictures():
    pixels, scenes = ShapesWorld(11).batch(120)
    for picture, scene in zip(pixels, scenes):
        result = read_back(picture)
        assert result.matches(scene.colour, scene.shape, scene.background) == {
            "colour": True,
            "shape": True,
            "background": True,
        }, (scene, result)


def test_read_back_takes_float_pictures_and_pil_images():
    picture, scene = ShapesWorld(2).sample(colour="yellow", shape="circle", background="white")
    as_float = np.asarray(picture).astype(np.float32) / 255
    assert read_back(as_float) == read_back(picture)
    assert read_back(picture).colour == "yellow"


def test_plain_background_has_no_shape():
    result = read_back(np.zeros((64, 64, 3), np.uint8))
    assert (result.background, result.colour, result.shape) == ("black", None, None)


def test_read_back_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="picture must be"):
        read_back(np.zeros((64, 64), np.uint8))
