"""Fixtures shared by the command tests: released-style ir_18 checkpoints (good, damaged, malicious) and their
converted directory, a random ir_18 converted with its PyTorch twin, real photos, and a small prepared dataset."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_jax.cli import main
from tests.support.datasets import write_small_dataset
from tests.support.torch_reference import build_backbone, randomize_, save_released


class RunsCode:
    """A pickle payload that would create ``sentinel`` if it ever ran."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A good released-style ir_18 .ckpt, its truncated copy, a text file, a malicious pickle, and a
    converted directory."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    backbone = randomize_(build_backbone("ir_18"), seed=1).eval()
    good = tmp / "good.ckpt"
    save_released(backbone.state_dict(), good)
    data = good.read_bytes()
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    evil = tmp / "evil.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "callbacks": RunsCode(tmp / "pwned")}, evil)
    converted = tmp / "converted"
    assert main(["convert", str(good), str(converted)]) == 0
    return dict(tmp=tmp, good=good, truncated=truncated, text=text, evil=evil, converted=converted,
                sentinel=tmp / "pwned")


@pytest.fixture(scope="session")
def converted_ir18(released, tmp_path_factory):
    """``released`` converted with `adaface-jax convert`, and its PyTorch model."""
    converted = tmp_path_factory.mktemp("ir18") / "converted"
    assert main(["convert", str(released["path"]), str(converted)]) == 0
    return str(converted), released["backbone"]


@pytest.fixture(scope="session")
def released(tmp_path_factory):
    """A random ir_18 saved in the released .ckpt layout, and the PyTorch model."""
    tmp = tmp_path_factory.mktemp("photos")
    backbone = randomize_(build_backbone("ir_18"), seed=3).eval()
    path = tmp / "model.ckpt"
    save_released(backbone.state_dict(), path)
    return dict(tmp=tmp, path=path, backbone=backbone)


@pytest.fixture(scope="session")
def photos(shared_data, released):
    """The three reference photos of the shared face data, and a blank image with no face."""
    paths = [str(shared_data / "adaface_test_images" / f"img{i}.jpeg") for i in (1, 2, 3)]
    blank = released["tmp"] / "blank.png"
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(blank)
    return paths, str(blank)


@pytest.fixture
def small_dataset(tmp_path):
    """4 identities x 4 JPEGs prepared into 2 shards; the dataset folder."""
    return write_small_dataset(tmp_path)
