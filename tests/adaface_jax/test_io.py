"""The file layer: canonical paths and refused URLs; the one atomic writer (all or nothing, with the permissions a
plain open() would give); outputs replace only earlier outputs; the same operations on a bucket."""
import os
import stat

import pytest

from adaface_jax import io


def test_written_file_has_umask_permissions_not_mkstemp_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = io.write_text(str(tmp_path / "table.md"), "| a |\n")
    plain = tmp_path / "plain.md"
    plain.write_text("x")
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode) == 0o666 & ~mask


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "result.json"
    io.write_json(str(path), {"old": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_write(str(path), "w") as f:
            f.write('{"new": ')
            raise RuntimeError("killed half-way")
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"old":1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


# ------------------------------------------------------------------------------------ paths

@pytest.mark.parametrize("typed,canonical", [
    ("gs://b/x/", "gs://b/x"), ("gs://b", "gs://b"), ("GS://b/a//c", "gs://b/a/c"), ("a:b", None), ("~/x", None)])
def test_paths_are_canonical(typed, canonical, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = io.check_path(typed, "--out")
    assert got == (canonical or os.path.abspath(os.path.expanduser(typed)))
    assert io.is_remote(got) == (canonical is not None)


@pytest.mark.parametrize("typed,reason", [
    ("gs:/b/x", "not a valid URL (expected gs://BUCKET/PATH, with two slashes)"),
    ("gs:b/x", "not a valid URL"), ("gs:///x", "not a valid URL"), ("gs://", "no bucket"),
    ("s4://b/x", "unsupported URL scheme 's4:'"), ("http://host/x", "unsupported URL scheme 'http:'")])
def test_urls_the_layer_cannot_serve_are_refused_naming_them(typed, reason, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(io.InputError) as e:
        io.check_path(typed, "--workdir")
    assert str(e.value).startswith(f"--workdir {typed}: ") and reason in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no local folder named after a scheme


def test_url_joins_and_splits():
    assert io.join("gs://b", "x", "y.json") == "gs://b/x/y.json"
    assert io.dirname("gs://b/x/y.json") == "gs://b/x" and io.dirname("gs://b/x") == "gs://b"
    assert io.dirname("gs://b") == "gs://b" and io.basename("gs://b/x/y.json") == "y.json"


# ------------------------------------------------------------------------------------ outputs replace outputs only

def test_an_output_replaces_only_an_earlier_output_of_its_kind(tmp_path):
    import numpy as np  # noqa: PLC0415
    earlier = tmp_path / "feats.npz"
    np.savez(earlier, x=np.zeros(2))
    assert io.check_output_file(str(earlier), "--out", (".npz",)) == str(earlier)
    assert io.check_output_file(str(tmp_path / "new.npz"), "--out", (".npz",))
    photo = tmp_path / "img1.jpeg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 a photo")
    with pytest.raises(io.InputError, match=r"img1.jpeg: expected a file name ending in \.npz"):
        io.check_output_file(str(photo), "--out", (".npz",))
    disguised = tmp_path / "notes.npz"
    disguised.write_text("my notes")
    with pytest.raises(io.InputError, match="exists and is not an earlier .npz output; refusing to replace it"):
        io.check_output_file(str(disguised), "--out", (".npz",))
    notjson = tmp_path / "results.json"
    notjson.write_text("{ half")
    with pytest.raises(io.InputError, match="not an earlier .json output"):
        io.check_output_file(str(notjson), "--out", (".json",))
    assert photo.read_bytes() == b"\xff\xd8\xff\xe0 a photo" and disguised.read_text() == "my notes"


# ------------------------------------------------------------------------------------ the same on a bucket

def test_the_layer_on_a_bucket(gcs_bucket, tmp_path):
    """Against the loopback Cloud Storage server: an atomic write is one upload of the whole file (a failed one
    leaves the earlier object), listings, walk, copy both ways, local copies and removal."""
    root = io.join(gcs_bucket, "run")
    io.write_json(io.join(root, "a.json"), {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_write(io.join(root, "a.json"), "w") as f:
            f.write('{"v": 2')
            raise RuntimeError("killed half-way")
    assert io.read_text(io.join(root, "a.json")).replace("\n", "").replace(" ", "") == '{"v":1}'
    io.write_bytes(io.join(root, "sub", "b.bin"), b"\x80" + bytes(range(200)))
    assert io.isdir(root) and io.isdir(io.join(root, "sub")) and not io.isfile(io.join(root, "sub"))
    assert io.isfile(io.join(root, "a.json")) and io.getsize(io.join(root, "sub", "b.bin")) == 201
    assert io.listdir(root) == ["a.json", "sub"] and io.glob(root, "*.json") == [io.join(root, "a.json")]
    assert [(f, d, n) for f, d, n in io.walk(root)] == [(root, ["sub"], ["a.json"]),
                                                        (io.join(root, "sub"), [], ["b.bin"])]
    local = tmp_path / "b.bin"
    io.copy(io.join(root, "sub", "b.bin"), str(local))
    io.copy(str(local), io.join(root, "c.bin"))
    with io.local_copy(io.join(root, "c.bin")) as path:
        assert not io.is_remote(path) and open(path, "rb").read() == local.read_bytes()
    assert not os.path.exists(path)
    io.write_text(io.join(root, "a.bin"), "text")
    with pytest.raises(io.InputError, match="not an earlier .bin output"):
        io.check_output_file(io.join(root, "a.bin"), "--out", (".bin",))
    io.remove(io.join(root, "c.bin"))
    io.rmtree(io.join(root, "sub"))
    assert io.listdir(root) == ["a.bin", "a.json"]
