"""`adaface-jax synthesize`: the stored images are the renderer's, bad counts are one line, and only an earlier
verification .bin is replaced."""
import os

import numpy as np
import pytest

from adaface_jax.cli import main
from tests.support.cli_fixtures import fail, ok
from data_pipeline.manifest import read_manifest
from tests.support.datasets import manifest_json as _manifest
from tests.support.datasets import stored_examples as _examples


def test_synthesize_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synthesize", str(out), "--identities", "3", "--images-per-identity", "2", "--val-identities", "4",
                 "--val-pairs", "6", "--workers", "0"]) == 0
    m = _manifest(out)
    assert m["num_images"] == 6 and m["num_classes"] == 3 and m["class_counts"] == [2, 2, 2]
    from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
    from data_pipeline.synthetic import encode, render  # noqa: PLC0415
    ex = _examples(out)
    # each stored image is identity `label`'s rendering (default seed 0), image k of that identity
    for data, label in ex.values():
        assert any(data == encode(render(0, label, k)[0]) for k in range(2)), label
    images, issame = load_bin(str(out / "synthetic_val.bin"))
    assert images.shape == (12, 112, 112, 3) and len(issame) == 6 and int(np.sum(issame)) == 3
    assert np.load(out / "synthetic_val.quality.npy").shape == (12,)


@pytest.mark.parametrize("args,needle", [(["--identities", "0"], "identities is 0"),
                                         (["--identities", "-3"], "identities is -3"),
                                         (["--images-per-identity", "0"], "images per identity is 0"),
                                         (["--severity", "2"], "severity 2.0"),
                                         (["--severity", "nan"], "severity nan"),
                                         (["--val-identities", "1"], "--val-identities 1")])
def test_synthesize_bad_counts(tmp_path, capsys, args, needle):
    out = tmp_path / "syn"
    fail(capsys, ["synthesize", str(out), "--identities", "2", "--images-per-identity", "1", *args], needle)
    assert not os.path.exists(out)


def test_synthesize_replaces_only_an_earlier_verification_bin(tmp_path, capsys):
    out = tmp_path / "syn"
    out.mkdir()
    notes = out / "val.bin"
    notes.write_text("my notes, not a pickle")
    argv = ["synthesize", str(out), "--identities", "2", "--images-per-identity", "1", "--val-identities", "2",
            "--val-pairs", "2", "--val-name", "val.bin"]
    fail(capsys, argv, str(notes), "not an earlier .bin output")
    assert notes.read_text() == "my notes, not a pickle" and sorted(os.listdir(out)) == ["val.bin"]
    notes.unlink()
    first = ok(capsys, argv)
    assert first["verification"]["bin"] == str(notes) and read_manifest(str(out))["verification"]["bin"] == "val.bin"
    ok(capsys, argv)  # the same source again: the earlier .bin is replaced
    fail(capsys, argv[:-1] + ["val.txt"], "--val-name", "ending in .bin")
