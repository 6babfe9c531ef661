"""Elastic pods: the global batches, an exact resume and validation do not depend on how many processes
(and devices) run the job.

Multi-process runs go through tests/support/elastic_worker.py in subprocesses (gloo collectives on localhost), like
tests/e2e/test_parallel_multiprocess.py: one 2 processes x 2 devices launch (batches, an interrupted and an
uninterrupted train(), validation, a run on data with a record that does not decode) and one 4 x 1 launch
(batches); 1 x 4 runs in this process.
"""
import os
import re
import shutil
import struct

import jax
import numpy as np
import pytest

from tests.support import process_group
from tests.support.elastic_worker import BATCH, STEPS, STOP_AT, TOTAL, elastic_config, recording_train

TIMEOUT_S = 150  # processes start, compile and talk over gloo on 2 shared cores (the 2 x 2 launch: ~50 s in CI)


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def elastic_data(tmp_path_factory):
    """6 identities x 6 images in 5 shards (36 records; 8 streams of 4-5 records: 4 steps of 8 per epoch) and a
    10-pair verification .bin."""
    from data_pipeline.synthetic import write_synthetic_dataset, write_verification_bin
    d = tmp_path_factory.mktemp("elastic")
    write_synthetic_dataset(str(d), num_identities=6, images_per_identity=6, seed=0, num_shards=5,
                            show_progress=False)
    write_verification_bin(str(d / "tiny_val.bin"), num_identities=4, num_pairs=10, seed=0)
    return str(d)


def run_workers(nproc, ndev, data_dir, out, mode):
    """tests/support/elastic_worker.py as ``nproc`` processes of ``ndev`` devices each."""
    process_group.run_workers("elastic_worker.py", nproc,
                             lambda pid, port: [pid, nproc, port, ndev, data_dir, out, mode], f"{nproc}x{ndev}",
                             timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def two_by_two(elastic_data, tmp_path_factory):
    """The 2 x 2 launch; its last run trains on OUT/bad_data: the dataset with record 1 of shard 2 cut short."""
    from tests.support.datasets import rewrite_shard, truncated
    out = str(tmp_path_factory.mktemp("two_by_two"))
    bad_data = os.path.join(out, "bad_data")
    shutil.copytree(elastic_data, bad_data)
    rewrite_shard(bad_data, 2, lambda recs: [(truncated(r[0]) if i == 1 else r[0], r[1], r[2])
                                             for i, r in enumerate(recs)])
    run_workers(2, 2, elastic_data, out, "train")
    return out


def _rows(out, name, nproc):
    """The global batches train() fed: each process's rows concatenated in process order (host_to_global)."""
    parts = [np.load(os.path.join(out, f"rows_{name}_{p}.npz")) for p in range(nproc)]
    return np.concatenate([p["images"] for p in parts], axis=1), np.concatenate([p["labels"] for p in parts], axis=1)


# ----------------------------------------------------------------------------------------- fast tests

def test_streams_cover_every_record_once_and_offsets_match_a_parse(elastic_data):
    from data_pipeline.input import (_piece_offsets, host_assignment, read_manifest, record_offsets, shard_paths,
                                     stream_layout)
    manifest = read_manifest(elastic_data)
    counts = [s["num_images"] for s in manifest["shards"]]
    layout = stream_layout(manifest, 8)
    flat = [sum(counts[:k]) + skip + i for pieces in layout for k, skip, take in pieces for i in range(take)]
    assert flat == list(range(36))  # contiguous ranges in stream order, each record once
    assert sorted(sum(t for _, _, t in p) for p in layout) == [4, 4, 4, 4, 5, 5, 5, 5]
    # 2 processes: contiguous blocks of streams, disjoint records, each exactly half
    a, b = host_assignment(manifest, 0, 2, 8, 8), host_assignment(manifest, 1, 2, 8, 8)
    assert a[1] == [0, 1, 2, 3] and b[1] == [4, 5, 6, 7] and a[2] == b[2] == 18
    # byte offsets from the length fields == offsets found by parsing every record (length + CRCs + data)
    path = shard_paths(elastic_data, manifest)[0]
    with open(path, "rb") as f:
        data = f.read()
    want, pos = [], 0
    while pos < len(data):
        want.append(pos)
        pos += 16 + struct.unpack("<Q", data[pos:pos + 8])[0]
    assert record_offsets(path, range(len(want))) == dict(enumerate(want))
    assert record_offsets(path, [len(want) + 3]) == {len(want) + 3: len(data)}  # past the end: empty piece
    assert layout[1][0] == (0, 4, 4)  # stream 1 = records 4..8, starting inside shard 0
    assert _piece_offsets(shard_paths(elastic_data, manifest), layout, range(8))[(0, 4)] == want[4] > 0


def test_io_amplification_stays_at_the_share(elastic_data):
    from data_pipeline.input import io_amplification
    n, per_shard = 5_822_653, (150 << 20) // 4500  # MS1MV2 in 150 MiB shards
    counts = [per_shard] * (n // per_shard) + [n % per_shard]
    ms1m = {"num_images": n, "shards": [{"num_images": c, "num_bytes": c * 4500} for c in counts]}
    for p in (1, 2, 4, 8):
        amp = io_amplification(ms1m, 64, 512, p)
        # each process reads its own records (n/p, +-1 record per stream) plus <= 256 KiB per piece read ahead
        pieces = 64 // p + 2 * (64 // p)  # generous: a stream covers <= 3 pieces here
        assert 1.0 <= amp <= (n / p * 4500 + pieces * (256 << 10) + 64 * 4500) / (n / p * 4500) <= 1.25


def test_a_process_count_that_does_not_divide_the_streams_is_refused(monkeypatch, elastic_data):
    from adaface_jax.train import loop
    from adaface_jax.train.config import check_config
    config = elastic_config(elastic_data)
    with pytest.raises(loop.ConfigError, match=r"config\.data\.num_streams=64.*8 input streams.*3 processes"):
        check_config(config, num_devices=1, process_count=3)
    check_config(config, num_devices=1, process_count=4)  # 4 divides 8
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    saved = {"data_layout": loop.data_layout(config)}
    config.data.num_streams = 4
    with pytest.raises(loop.ConfigError, match=r"^config\.data\.num_streams: .*streams=8 .* has 4"):
        loop.check_resume_layout(saved, config, "w", 2, 4)


def test_process_rows_are_contiguous_blocks_of_the_one_process_batch(elastic_data):
    """In-process: P configs of the pipeline, concatenated in process order, give the 1-process global batches
    (records, order and augmentation), and starting at step 3 gives step 3 of the run."""
    from data_pipeline.input import TrainInputConfig, make_train_iterator
    kw = dict(data_dir=elastic_data, global_batch_size=8, seed=2, image_size=16, shuffle_buffer=64,
              crop_prob=0.5, lowres_prob=0.5, photometric_prob=0.5)

    def global_batches(nproc, start=0, steps=5):
        its = [make_train_iterator(TrainInputConfig(process_index=p, process_count=nproc, **kw), start)
               for p in range(nproc)]
        out = []
        for _ in range(steps):
            parts = [next(it) for it in its]
            out.append({k: np.concatenate([b[k] for b in parts]) for k in ("image", "label")})
        return out

    one = global_batches(1)
    for nproc in (2, 8):
        for a, b in zip(one, global_batches(nproc)):
            np.testing.assert_array_equal(a["label"], b["label"])
            np.testing.assert_array_equal(a["image"], b["image"])
    resumed = global_batches(4, start=3, steps=2)
    for a, b in zip(one[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
    labels = np.concatenate([b["label"] for b in one[:4]])
    assert sorted(np.bincount(labels, minlength=6)) != [0] * 6 and len(labels) == 32  # one epoch: 32 of 36 images
    with pytest.raises(ValueError, match="num_streams"):
        next(make_train_iterator(TrainInputConfig(process_index=0, process_count=3, **kw)))


# ----------------------------------------------------------------------------------------- multi-process

@pytest.mark.slow
@pytest.mark.multiprocess
def test_global_batches_are_bit_identical_on_1x4_2x2_and_4x1(elastic_data, two_by_two, tmp_path):
    from adaface_jax.train.loop import make_input
    config = elastic_config(elastic_data)
    it = make_input(config, 0)  # 1 process (this one) x 4 devices: the process's rows are the global batch
    one = [next(it) for _ in range(STEPS)]
    run_workers(4, 1, elastic_data, str(tmp_path), "batches")
    for path in (os.path.join(two_by_two, "batches_2x2.npz"), str(tmp_path / "batches_4x1.npz")):
        with np.load(path) as got:
            for i, batch in enumerate(one):
                assert got[f"image_{i}"].shape == (BATCH, 16, 16, 3)
                np.testing.assert_array_equal(got[f"label_{i}"], batch["label"], err_msg=f"{path} step {i}")
                np.testing.assert_array_equal(got[f"image_{i}"], batch["image"], err_msg=f"{path} step {i}")
    assert not np.array_equal(one[0]["image"], one[1]["image"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_bad_record_on_one_process_stops_every_process(two_by_two):
    """One record does not decode, and only the process whose streams hold it decodes it: with
    data.max_bad_records=0 both processes stop with the same error (the count is summed over processes), where a
    process stopping alone would leave the other in the next step's collectives."""
    messages = [open(os.path.join(two_by_two, f"bad_{pid}.txt")).read() for pid in range(2)]
    assert messages[0] == messages[1], messages
    data = re.escape(os.path.join(two_by_two, "bad_data"))
    assert re.match(rf"1 records of {data} failed to decode by step [1-4], more than "
                    r"config.data.max_bad_records=0", messages[0]), messages[0]


def test_2x2_run_resumed_as_1x4_continues_with_the_same_batches(elastic_data, two_by_two, tmp_path):
    from adaface_jax.train import loop
    images_b, labels_b = _rows(two_by_two, "b", 2)  # uninterrupted 2 x 2 run, TOTAL steps
    images_a, labels_a = _rows(two_by_two, "a", 2)  # the interrupted one, STOP_AT steps
    assert images_b.shape == (TOTAL, BATCH, 16, 16, 3) and images_a.shape[0] == STOP_AT
    np.testing.assert_array_equal(images_a, images_b[:STOP_AT])
    workdir = str(tmp_path / "run_a")
    shutil.copytree(os.path.join(two_by_two, "run_a"), workdir)
    changed = elastic_config(elastic_data, total_steps=TOTAL)
    changed.data.num_streams = 4  # another data order: refused before anything is built
    with pytest.raises(loop.ConfigError, match=r"^config\.data\.num_streams: "):
        loop.train(changed, workdir, devices=jax.devices()[:4])
    rows, summary, state = recording_train(elastic_config(elastic_data, total_steps=TOTAL), workdir,
                                            jax.devices()[:4])
    assert summary["step"] == TOTAL and len(rows) == TOTAL - STOP_AT
    for i, (images, labels) in enumerate(rows):  # steps STOP_AT+1 .. TOTAL: nothing repeated, nothing skipped
        np.testing.assert_array_equal(labels, labels_b[STOP_AT + i], err_msg=f"step {STOP_AT + i + 1}")
        np.testing.assert_array_equal(images, images_b[STOP_AT + i], err_msg=f"step {STOP_AT + i + 1}")
    items = {jax.tree_util.keystr(p): np.asarray(v)
             for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.checkpoint_items()))}
    with np.load(os.path.join(two_by_two, "final_b.npz")) as want:
        assert set(want.files) == set(items)
        for k in want.files:
            # only the float reduction order differs (2 x 2 devices over gloo vs 4 devices in one process)
            atol = 5e-5 * max(1.0, float(np.abs(want[k]).max())) if k.startswith("['opt_state']") else 5e-5
            np.testing.assert_allclose(items[k], want[k], atol=atol, rtol=1e-5, err_msg=k)
    assert int(items["['step']"]) == TOTAL


@pytest.mark.slow
@pytest.mark.multiprocess
def test_validation_over_two_processes_gives_the_single_process_accuracy(elastic_data, two_by_two):
    """The worker's validate() (each process embeds half of the .bin, features gathered) against the 10-fold
    accuracy of flip-fused features computed here in one process, directly with module.apply."""
    from adaface_jax.models import TinyBackbone
    from data_pipeline.bin_reader import load_bin
    from evaluation.verification import evaluate
    module = TinyBackbone(embedding_size=16, dtype=jax.numpy.float32)
    template = module.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
    with np.load(os.path.join(two_by_two, "val.npz")) as got:
        leaves = [got[f"v{i:03d}"] for i in range(len(jax.tree_util.tree_leaves(template)))]
        acc = float(got["acc"])
    variables = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
    images, issame = load_bin(os.path.join(elastic_data, "tiny_val.bin"))
    x = (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.5
    e, n = module.apply(variables, x, train=False)
    ef, nf = module.apply(variables, x[:, :, ::-1], train=False)
    v = np.asarray(e, np.float64) * np.asarray(n) + np.asarray(ef, np.float64) * np.asarray(nf)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    want = float(np.mean(evaluate(v, np.asarray(issame, bool), nrof_folds=10)[2]))
    assert acc == want
    import json
    with open(os.path.join(two_by_two, "run_b", "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert any("val/tiny_val_acc" in r for r in logged)  # validation ran inside the 2-process loop
