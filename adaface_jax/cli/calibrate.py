"""``adaface-jax calibrate --checkpoint M --bin lfw.bin``: cosine thresholds at target false accept
rates, measured on a verification set and stored with the model (``compare`` then says "same person
at FAR=1e-4: yes/no"). The scoring is ``evaluation.calibration``. The model, the inputs and so the
stored thresholds file may be local or in a bucket (``gs://``)."""
from __future__ import annotations

from adaface_jax.cli import positive_int


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="the model: a converted directory, a training workdir or a PyTorch .ckpt; the thresholds "
                             "are stored with it")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--bin", help="a verification .bin (pairs of aligned faces with same/different labels)")
    src.add_argument("--features", help="an .npz with 'features' (2N, D) interleaved pair embeddings of this model and "
                                        "'issame' (N,)")
    parser.add_argument("--far", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5],
                        help="target false accept rates (default 1e-2 1e-3 1e-4 1e-5)")
    parser.add_argument("--flip-test", action="store_true",
                        help="embed with the flip test (use the same setting when comparing)")
    parser.add_argument("--folds", type=positive_int, default=10, help="folds for the held-out rates")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--no-store", action="store_true", help="print the thresholds without storing them")


def _read_features(path: str):
    import zipfile

    import numpy as np

    from adaface_jax import io
    from adaface_jax.errors import InputError

    if not io.isfile(path):
        raise InputError(f"--features {path}: no such file")
    try:
        z = np.load(io.readable(path), allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise InputError(f"--features {path}: a single .npy array, not an .npz with 'features' and 'issame'")
        with z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"--features {path}: not a readable .npz ({e})") from e
    for key in ("features", "issame"):
        if key not in arrays:
            raise InputError(f"--features {path}: missing array {key!r} (expected 'features' (2N, D) and 'issame' (N,))")
    feats, issame = arrays["features"], arrays["issame"]
    if feats.ndim != 2 or feats.shape[0] != 2 * issame.size:
        raise InputError(f"--features {path}: 'features' has shape {feats.shape}, expected (2N, D) for "
                         f"{issame.size} pairs")
    return feats, issame


def read_bin(path: str):
    """A verification .bin, local or ``gs://``."""
    from adaface_jax import io
    from adaface_jax.errors import InputError
    from data_pipeline.bin_reader import load_bin

    if not io.isfile(path):
        raise InputError(f"--bin {path}: no such file")
    return load_bin(path)


def run(args) -> int:
    import json

    from adaface_jax import io
    from adaface_jax.errors import InputError
    from adaface_jax.weights import calibration_file
    from evaluation import calibration

    for far in args.far:
        if not 0.0 < far < 1.0:
            raise InputError(f"--far {far}: a false accept rate is in (0, 1)")
    checkpoint = io.check_path(args.checkpoint, "--checkpoint")
    source_path = io.check_path(args.features or args.bin, "--features" if args.features else "--bin")
    if not io.exists(checkpoint):
        raise InputError(f"--checkpoint {args.checkpoint}: no such file or folder")
    stored_in = calibration_file(checkpoint)  # a model we can store into (fails now if not)
    if not args.no_store:  # only an earlier JSON file is replaced
        io.check_output_file(stored_in.path, "calibration file", suffixes=(".json",))
    if args.features:
        feats, issame = _read_features(source_path)
    else:
        images, issame = read_bin(source_path)
        from adaface_jax.inference import load_pretrained

        model = load_pretrained(checkpoint, batch_size=args.batch_size)
        feats, _ = model.embed(images, flip_test=args.flip_test)
    cal = calibration.calibrate(calibration.pair_cosines(feats), issame, fars=tuple(sorted(args.far, reverse=True)),
                                nrof_folds=args.folds)
    cal.update(source=io.basename(source_path), flip_test=bool(args.flip_test) if not args.features else None)
    print(calibration.format_calibration(cal))
    if args.no_store:
        print(json.dumps(cal["thresholds"]))
        return 0
    path = calibration.store_calibration(stored_in, cal)
    print(f"stored in {path}; `adaface-jax compare --checkpoint {args.checkpoint}` now prints the decisions")
    return 0
