"""One process of the elastic-input tests: ``python elastic_worker.py PID NPROC PORT LOCAL_DEVICES DATA_DIR OUT MODE``.

MODE 'batches': the first STEPS global batches of make_input, assembled with parallel.host_to_global and gathered
to numpy on every process (process_allgather); process 0 writes OUT/batches_<NPROC>x<LOCAL_DEVICES>.npz.
MODE 'train' (also does 'batches'): train() to STOP_AT steps in OUT/run_a (a checkpoint there), train() to
TOTAL steps uninterrupted in OUT/run_b with validation in the loop; every process writes the local rows train()
fed (OUT/rows_{a,b}_<PID>.npz); then the loop's run_evaluators() on run_b's final state, and process 0 writes
the accuracies and the backbone variables (OUT/val.npz).
Then, if OUT/bad_data exists (DATA_DIR with a record that does not decode), train() on it with
data.max_bad_records=0: every process must stop with TooManyBadRecords (though only one decodes that record) and
writes its message to OUT/bad_<PID>.txt.
"""
import os
import sys
import time

STEPS = 3      # global batches compared across topologies
STOP_AT = 2    # the interrupted run stops (and checkpoints) here
TOTAL = 5      # steps of the uninterrupted run (4 steps per epoch: crosses an epoch)
BATCH = 8
LAGGARD_S = 4  # process 1 starts run_b this much later


def recording_train(config, workdir, devices=None):
    """``loop.train`` with every host-local batch it feeds recorded: (rows [(images, labels)], summary, state)."""
    from adaface_jax.train import loop

    rows, original = [], loop.make_input

    def recording(cfg, start):
        for batch in original(cfg, start):
            rows.append((batch["image"].copy(), batch["label"].copy()))
            yield batch

    loop.make_input = recording
    try:
        summary, state = loop.train(config, workdir, devices=devices)
    finally:
        loop.make_input = original
    return rows, summary, state


def elastic_config(data_dir, total_steps=TOTAL, eval_every=0):
    """Tiny arch, 16x16 inputs, augmentation on at high probabilities, 8 input streams of 1 row each."""
    from configs.common import get_base_config  # noqa: PLC0415
    c = get_base_config(arch="tiny", num_classes=6, data_dir=data_dir)
    c.seed = 5
    c.global_batch_size = BATCH
    c.total_steps = total_steps
    c.precision = "float32"
    c.model.embedding_size = 16
    c.data.image_size = 16
    c.data.num_streams = 64  # gcd with the batch: 8 streams
    c.data.crop_prob = c.data.lowres_prob = c.data.photometric_prob = 0.5
    c.lr, c.lr_milestones = 0.1, (1,)
    c.log_every = 1
    c.progress = False
    c.sample_grid = False
    c.evals.verification.every_epochs = eval_every
    c.evals.verification.sets = ("tiny_val",)
    c.evals.verification.batch_size = 8
    c.checkpoint.every_steps = 1
    c.checkpoint.async_save = False
    return c


def main():

    pid, nproc, port, ndev = (int(a) for a in sys.argv[1:5])
    data_dir, out, mode = sys.argv[5], sys.argv[6], sys.argv[7]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # A script, not a test module: the repository root makes `tests.support` importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

    import jax  # noqa: E402
    import numpy as np  # noqa: E402

    from adaface_jax import parallel  # noqa: E402

    if nproc > 1:
        parallel.initialize_distributed(f"localhost:{port}", nproc, pid, cpu_collectives="gloo")
    assert jax.device_count() == nproc * ndev, jax.devices()
    from jax.experimental import multihost_utils  # noqa: E402

    from adaface_jax.train import loop  # noqa: E402
    from adaface_jax.train.setup import build_backbone  # noqa: E402

    def gather_batches(config):
        mesh = parallel.make_mesh()
        it = loop.make_input(config, 0)
        got = {}
        for i in range(STEPS):
            batch = next(it)
            batch.pop("bad_records", None)
            g = parallel.host_to_global(batch, mesh)
            for k, v in g.items():
                got[f"{k}_{i}"] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
        if pid == 0:
            np.savez(os.path.join(out, f"batches_{nproc}x{ndev}.npz"), **got)


    def recorded_train(config, workdir, name):
        rows, summary, state = recording_train(config, workdir)
        np.savez(os.path.join(out, f"rows_{name}_{pid}.npz"), images=np.stack([r[0] for r in rows]),
                 labels=np.stack([r[1] for r in rows]))
        return summary, state


    config = elastic_config(data_dir)
    gather_batches(config)
    if mode == "train":
        a = elastic_config(data_dir, total_steps=STOP_AT)
        recorded_train(a, os.path.join(out, "run_a"), "a")
        b = elastic_config(data_dir, total_steps=TOTAL, eval_every=1)
        if pid == 1:
            # On a pod the processes reach train() at different times: here process 0 has created run_b's
            # checkpoint folder by the time process 1 looks for a run to resume (train() must not let them decide
            # differently, which deadlocked in their collectives).
            time.sleep(LAGGARD_S)
        summary, state = recorded_train(b, os.path.join(out, "run_b"), "b")
        trainer_model = build_backbone(b, 1)  # the eval-mode module (build_trainer's eval_model)
        from data_pipeline.bin_reader import load_bin  # noqa: E402
        from evaluation.evaluators import VerificationEvaluator  # noqa: E402
        images, issame = load_bin(os.path.join(data_dir, "tiny_val.bin"))
        evaluator = VerificationEvaluator({"tiny_val": (images, np.asarray(issame, bool))})
        val = loop.run_evaluators({"tiny_val": (evaluator, b.evals.verification)}, trainer_model, state,
                                  parallel.make_mesh(), b.cpu_convolutions)
        variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
        flat = {f"v{i:03d}": np.asarray(multihost_utils.process_allgather(v, tiled=True))
                for i, v in enumerate(jax.tree_util.tree_leaves(variables))}  # in tree order
        items = {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(v, tiled=True))
                 for p, v in jax.tree_util.tree_leaves_with_path(state.checkpoint_items())}
        if pid == 0:
            np.savez(os.path.join(out, "val.npz"), acc=np.float64(val["val/tiny_val_acc"]), **flat)
            np.savez(os.path.join(out, "final_b.npz"), **items)
        bad_data = os.path.join(out, "bad_data")
        if os.path.isdir(bad_data):
            c = elastic_config(bad_data, total_steps=4)
            c.data.max_bad_records = 0
            try:
                loop.train(c, os.path.join(out, "run_bad"))
            except loop.TooManyBadRecords as e:
                with open(os.path.join(out, f"bad_{pid}.txt"), "w") as f:
                    f.write(str(e))
    print(f"process {pid} done", flush=True)


if __name__ == "__main__":
    main()
