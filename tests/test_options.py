"""The option groups commands share: declared once, shown as before, received as one typed value."""

from __future__ import annotations

import inspect
import math

import pytest

from clipcli.commands import options as opt
from clipcli.errors import InputError
from clipcli.images.decode import DEFAULT_MAX_PIXELS, ImageOptions
from clipcli.images.limits import DEFAULT_MAX_MEGAPIXELS
from clipcli.models import ModelOptions


def test_model_options_carry_the_precision_by_name() -> None:
    assert opt.model_options("tiny-shapes", "cpu", opt.PrecisionChoice.INT8) == ModelOptions(
        "tiny-shapes", "cpu", "int8"
    )
    assert opt.model_options(None, "auto", "fp32") == ModelOptions(None, "auto", "fp32")


def test_image_options_turn_megapixels_into_a_pixel_limit() -> None:
    assert opt.image_options() == ImageOptions(max_pixels=DEFAULT_MAX_PIXELS)
    assert int(DEFAULT_MAX_MEGAPIXELS * 1_000_000) == DEFAULT_MAX_PIXELS
    assert opt.image_options(8, 2, True, 0.0, opt.DecodeChoice.GPU) == ImageOptions(8, 2, True, None, "gpu")
    assert opt.image_options(max_megapixels=math.inf).max_pixels is None
    with pytest.raises(InputError, match="--max-megapixels nan"):
        opt.image_options(max_megapixels=math.nan)


def test_a_grouped_command_shows_each_option_and_receives_one_value() -> None:
    seen: dict[str, object] = {}

    @opt.grouped(models=opt.MODEL_OPTIONS, images=opt.IMAGE_OPTIONS.without("exact"))
    def command(first: opt.Inputs, *, models: ModelOptions, images: ImageOptions, last: bool = False) -> None:
        seen.update(models=models, images=images, first=first, last=last)

    names = list(inspect.signature(command).parameters)
    assert names == [
        "first", "model", "device", "precision", "batch_size", "workers", "max_megapixels", "every", "frames",
        "scene_threshold", "last",
    ]  # fmt: skip
    command(
        first=["a"], model="m", device="cpu", precision=opt.PrecisionChoice.FP32, batch_size=4, workers=1,
        max_megapixels=1.0, every=2.0, frames=opt.FramesChoice.EVERY, scene_threshold=0.08, last=True,
    )  # fmt: skip
    assert seen == {
        "models": ModelOptions("m", "cpu", "fp32"),
        "images": ImageOptions(4, 1, False, 1_000_000),
        "first": ["a"],
        "last": True,
    }
