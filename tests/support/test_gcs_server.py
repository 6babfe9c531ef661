"""Self-tests of the loopback Cloud Storage server (tests/support/gcs_server.py) through the real clients: tf.io.gfile and
TFRecordDataset (through the CONNECT/TLS proxy), etils.epath, tensorstore and orbax's CheckpointManager, and
google-cloud-storage; a child process; and the guard that nothing asked to leave loopback."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

# TF's file systems are set up here, before the gcs_server fixture sets the environment (as in the suite, where
# other tests import TF first): the server must work all the same.
assert not tf.io.gfile.exists(os.path.join(os.path.dirname(__file__), "no-such-file"))

from tests.support.gcs_server import KNOWN_REFUSED, SERVED_TARGETS, GcsServer, activity_between  # noqa: E402
from tests.support import REPO


def _blob(n, seed=0):
    return np.random.default_rng(seed).bytes(n)


@pytest.fixture(autouse=True)
def _stays_on_loopback(request):
    """During each test that uses the server: every CONNECT was to a served host, nothing was refused, nothing
    asked the GCE metadata server, no handler failed."""
    if "gcs_server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("gcs_server")
    before = server.log(requests=0)
    yield
    if getattr(request.function, "expects_refusals", False):
        return
    new = activity_between(before, server.log(requests=0))
    assert new["connects"] <= SERVED_TARGETS | set(KNOWN_REFUSED), new
    assert [r for r in new["refused"] if r["target"] not in KNOWN_REFUSED] == [], new
    assert new["metadata"] == [] and new["errors"] == [], new


def test_gfile_files_and_folders(gcs_bucket, gcs_server):
    gfile = tf.io.gfile
    big = _blob(6 * 2**20 + 7)  # several MB: a resumable upload whose PUT is chunked
    with gfile.GFile(f"{gcs_bucket}/data/big.bin", "wb") as f:
        f.write(big)
    with gfile.GFile(f"{gcs_bucket}/data/empty.bin", "wb") as f:
        f.write(b"")  # a zero-byte object
    with gfile.GFile(f"{gcs_bucket}/data/sub/note.txt", "w") as f:
        f.write("hello\n")

    with gfile.GFile(f"{gcs_bucket}/data/big.bin", "rb") as f:
        assert f.read() == big
    with gfile.GFile(f"{gcs_bucket}/data/big.bin", "rb") as f:  # a ranged read
        f.seek(3 * 2**20)
        assert f.read(1000) == big[3 * 2**20:3 * 2**20 + 1000]
    with gfile.GFile(f"{gcs_bucket}/data/empty.bin", "rb") as f:
        assert f.read() == b""
    assert gfile.stat(f"{gcs_bucket}/data/big.bin").length == len(big)
    assert gfile.stat(f"{gcs_bucket}/data/empty.bin").length == 0
    assert gfile.exists(f"{gcs_bucket}/data/big.bin") and not gfile.exists(f"{gcs_bucket}/data/nope.bin")
    assert gfile.isdir(f"{gcs_bucket}/data") and gfile.isdir(f"{gcs_bucket}/data/sub")
    assert not gfile.isdir(f"{gcs_bucket}/data/big.bin") and not gfile.isdir(f"{gcs_bucket}/nothing")
    assert sorted(gfile.listdir(f"{gcs_bucket}/data")) == ["big.bin", "empty.bin", "sub/"]
    assert sorted(gfile.glob(f"{gcs_bucket}/data/*.bin")) == [f"{gcs_bucket}/data/big.bin",
                                                             f"{gcs_bucket}/data/empty.bin"]
    assert gfile.glob(f"{gcs_bucket}/*/sub/*.txt") == [f"{gcs_bucket}/data/sub/note.txt"]

    gfile.makedirs(f"{gcs_bucket}/made/deeper")
    assert gfile.isdir(f"{gcs_bucket}/made/deeper")
    assert gfile.listdir(f"{gcs_bucket}/made") == ["deeper/"]

    gfile.rename(f"{gcs_bucket}/data/big.bin", f"{gcs_bucket}/moved/big.bin")  # copy (rewriteTo) + delete
    assert not gfile.exists(f"{gcs_bucket}/data/big.bin")
    with gfile.GFile(f"{gcs_bucket}/moved/big.bin", "rb") as f:
        assert f.read() == big
    gfile.remove(f"{gcs_bucket}/data/sub/note.txt")
    assert not gfile.exists(f"{gcs_bucket}/data/sub/note.txt")
    assert sorted(gfile.listdir(f"{gcs_bucket}/data")) == ["empty.bin"]

    # TF came through the proxy (the tunnel's host on each request), with the URL paths the module docstring
    # names; its resumable upload PUT is chunked (bug 1: the bytes above would carry the chunk framing).
    name = gcs_bucket[len("gs://"):]
    tunnelled = [r for r in gcs_server.log()["requests"] if r["host"] != "local"]
    assert any(r["host"] == "www.googleapis.com" and r["method"] == "PUT" and r.get("transfer_encoding") == "chunked"
               and r["path"].startswith(f"/upload/storage/v1/b/{name}/o?uploadType=resumable") for r in tunnelled)
    assert any(r["host"] == "storage.googleapis.com" and r["method"] == "GET" and r["status"] == 206
               and r["path"].startswith(f"/{name}/") for r in tunnelled)
    assert any(r["host"] == "www.googleapis.com" and r["method"] == "POST" and "/rewriteTo/" in r["path"]
               for r in tunnelled)


def test_tfrecord_dataset(gcs_bucket):
    path = f"{gcs_bucket}/records/part-0.tfrecord"
    records = [f"record {i} ".encode() * (i + 1) for i in range(50)]
    with tf.io.TFRecordWriter(path) as writer:
        for r in records:
            writer.write(r)
    got = [bytes(x.numpy()) for x in tf.data.TFRecordDataset(tf.io.gfile.glob(f"{gcs_bucket}/records/*.tfrecord"))]
    assert got == records


def test_epath(gcs_bucket):
    from etils import epath  # noqa: PLC0415

    root = epath.Path(gcs_bucket) / "ep"
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "a" / "x.bin").write_bytes(b"\x00\x01payload")
    (root / "a" / "y.txt").write_text("why")
    (root / "b" / "z.bin").write_bytes(b"")
    assert (root / "a" / "x.bin").read_bytes() == b"\x00\x01payload"
    assert (root / "a" / "y.txt").read_text() == "why"
    assert (root / "b" / "z.bin").read_bytes() == b""
    assert root.is_dir() and (root / "a").is_dir() and not (root / "a" / "x.bin").is_dir()
    assert (root / "a" / "x.bin").exists() and not (root / "a" / "none").exists()
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
    assert sorted(p.name for p in (root / "a").iterdir()) == ["x.bin", "y.txt"]
    assert sorted(str(p) for p in root.glob("*/*.bin")) == [f"{gcs_bucket}/ep/a/x.bin", f"{gcs_bucket}/ep/b/z.bin"]
    (root / "a" / "y.txt").unlink()
    assert not (root / "a" / "y.txt").exists()
    root.rmtree()
    assert not root.exists() and not (root / "a" / "x.bin").exists()


def test_tensorstore_generations_and_ranges(gcs_bucket):
    """Bugs 3 and 4 seen from tensorstore's kvstore: conditional reads (304 -> 'unchanged', 412) and listing
    with a key range (startOffset/endOffset)."""
    import tensorstore as ts  # noqa: PLC0415

    kv = ts.KvStore.open({"driver": "gcs", "bucket": gcs_bucket[len("gs://"):], "path": "kv/"}).result()
    stamp = kv.write("k1", b"one").result()
    read = kv.read("k1").result()
    assert read.state == "value" and read.value == b"one" and read.stamp.generation == stamp.generation
    assert kv.read("k1", if_not_equal=stamp.generation).result().state == "unspecified"  # 304: unchanged
    assert kv.read("k1", byte_range=slice(1, 3)).result().value == b"ne"
    second = kv.write("k1", b"two", if_equal=stamp.generation).result()
    assert second.generation != stamp.generation and kv.read("k1").result().value == b"two"
    stale = kv.write("k1", b"three", if_equal=stamp.generation).result()  # 412: not written
    assert stale.generation != second.generation and kv.read("k1").result().value == b"two"
    for key in ("a", "b1", "b2", "c", "d"):
        kv.write(key, key.encode()).result()
    assert sorted(kv.list(ts.KvStore.KeyRange(b"b", b"d")).result()) == [b"b1", b"b2", b"c"]
    assert sorted(kv.list().result()) == [b"a", b"b1", b"b2", b"c", b"d", b"k1"]
    kv.write("c", None).result()
    assert kv.read("c").result().state == "missing"


def test_orbax_checkpoint_manager(gcs_bucket):
    """Save and restore a small pytree (one array sharded over 2 devices) to gs://.../run/checkpoints, several
    times in a row: OCDBT manifest reads are conditional, so a missing x-goog-generation or ignored
    ifGenerationNotMatch shows up here."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    devices = jax.devices()
    assert len(devices) >= 2
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices[:2]), ("d",)),
                                          jax.sharding.PartitionSpec("d"))
    directory = f"{gcs_bucket}/run/checkpoints"

    def tree(step):
        return {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4) * step, sharding),
                "b": jnp.full((5,), step, jnp.float32), "step": jnp.asarray(step, jnp.int32)}

    def restore_and_check(manager, step):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree(step))
        got = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        for key, want in tree(step).items():
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want))
        assert got["w"].sharding.is_equivalent_to(sharding, 2)

    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, args=ocp.args.StandardSave(tree(step)))
            manager.wait_until_finished()
            restore_and_check(manager, step)
        assert manager.all_steps() == [3, 4]
    with ocp.CheckpointManager(directory) as reopened:
        assert reopened.all_steps() == [3, 4] and reopened.latest_step() == 4
        restore_and_check(reopened, 3)
        restore_and_check(reopened, 4)
    assert sorted(tf.io.gfile.listdir(directory)) == ["3/", "4/"]


def test_google_cloud_storage_sees_what_the_others_wrote(gcs_bucket):
    import tensorstore as ts  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415
    from google.cloud import storage  # noqa: PLC0415

    bucket = gcs_bucket[len("gs://"):]
    written = {"tf/a.bin": _blob(3 * 2**20, 1), "tf/empty": b"", "epath/b.txt": b"bee",
               "ts/c": _blob(1000, 2)}
    with tf.io.gfile.GFile(f"{gcs_bucket}/tf/a.bin", "wb") as f:
        f.write(written["tf/a.bin"])
    with tf.io.gfile.GFile(f"{gcs_bucket}/tf/empty", "wb") as f:
        f.write(b"")
    (epath.Path(gcs_bucket) / "epath" / "b.txt").write_bytes(written["epath/b.txt"])
    ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result().write("ts/c", written["ts/c"]).result()

    client = storage.Client()
    blobs = {b.name: b for b in client.list_blobs(bucket)}
    assert {name: b.size for name, b in blobs.items()} == {name: len(v) for name, v in written.items()}
    for name, content in written.items():
        assert client.bucket(bucket).blob(name).download_as_bytes() == content
    assert [b.name for b in client.list_blobs(bucket, prefix="tf/")] == ["tf/a.bin", "tf/empty"]

    # and the other way: google-cloud-storage writes, TF and epath read
    client.bucket(bucket).blob("gcs/d.bin").upload_from_string(b"from google-cloud-storage")
    with tf.io.gfile.GFile(f"{gcs_bucket}/gcs/d.bin", "rb") as f:
        assert f.read() == b"from google-cloud-storage"
    assert (epath.Path(gcs_bucket) / "gcs" / "d.bin").read_bytes() == b"from google-cloud-storage"


def test_child_process_writes_with_gfile(gcs_server, gcs_bucket):
    code = textwrap.dedent(f"""
        import tensorflow as tf
        with tf.io.gfile.GFile("{gcs_bucket}/child/out.txt", "w") as f:
            f.write("written by the child")
        tf.io.gfile.makedirs("{gcs_bucket}/child/folder")
        print("OK", tf.io.gfile.listdir("{gcs_bucket}/child"))
    """)
    env = {**os.environ, **gcs_server.env, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    with tf.io.gfile.GFile(f"{gcs_bucket}/child/out.txt") as f:
        assert f.read() == "written by the child"
    assert sorted(tf.io.gfile.listdir(f"{gcs_bucket}/child")) == ["folder/", "out.txt"]


def test_proxy_refuses_other_hosts(gcs_server):
    """First the guard over everything the session did so far, then a CONNECT to another host or port and a plain
    proxy request are refused (403) and recorded."""
    before = gcs_server.log(requests=0)
    # KNOWN_REFUSED attempts were refused by the proxy (nothing was forwarded); any other host fails the guard.
    assert set(before["connects"]) <= SERVED_TARGETS | set(KNOWN_REFUSED), before["connects"]
    assert [r for r in before["refused"] if r["target"] not in KNOWN_REFUSED] == [], before["refused"]
    assert before["metadata"] == [] and before["errors"] == [], before

    import http.client  # noqa: PLC0415
    conn = http.client.HTTPConnection("127.0.0.1", gcs_server.port, timeout=10)
    conn.set_tunnel("example.com", 443)
    with pytest.raises(OSError, match="403"):
        conn.connect()
    conn.close()
    with socket.create_connection(("127.0.0.1", gcs_server.port), timeout=10) as s:
        s.sendall(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 403")
    with socket.create_connection(("127.0.0.1", gcs_server.port), timeout=10) as s:  # a served host, port 80
        s.sendall(b"CONNECT www.googleapis.com:80 HTTP/1.1\r\nHost: www.googleapis.com:80\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 403")
    new = activity_between(before, gcs_server.log(requests=0))
    assert [(r["kind"], r["target"]) for r in new["refused"]] == [
        ("CONNECT", "example.com:443"), ("absolute-form", "http://example.com/"), ("CONNECT", "www.googleapis.com:80")]
    assert new["connects"] == {"example.com:443", "www.googleapis.com:80"}


test_proxy_refuses_other_hosts.expects_refusals = True


def test_server_ends_by_itself():
    """A bounded lifetime, and the end of the process that started it, each stop the server; stop() cleans up."""
    server = GcsServer(lifetime_s=1.5).start()
    try:
        assert server.proc.wait(timeout=15) == 0
    finally:
        tmpdir = server.tmpdir
        server.stop()
    assert not os.path.exists(tmpdir)

    here = str(REPO)
    code = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {here!r})
        from tests.support.gcs_server import GcsServer
        s = GcsServer().start()
        print(json.dumps({{"pid": s.proc.pid, "port": s.port, "tmpdir": s.tmpdir}}), flush=True)
        os._exit(0)  # dies without stop()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 15
    while _alive(child["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child["pid"]), "the server outlived the process that started it"
    assert not os.path.exists(child["tmpdir"])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", child["port"]), timeout=2).close()


def _alive(pid):
    """Whether ``pid`` is still running (a zombie, reaped by nobody here, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
