"""float16 compute with dynamic loss scaling: GradScaler semantics, skip + backoff on overflow, growth,
checkpointing, and the precision config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adaface_jax import parallel
from adaface_jax.train import loss_scale as ls
from adaface_jax.train.config import check_config
from adaface_jax.train.loop import ConfigError
from adaface_jax.train.setup import build_backbone, build_trainer
from tests.support.train_fixtures import random_batch, tiny_config

C = 12


def test_update_matches_torch_amp_update_scale():
    """The scale/counter sequence of ``update`` equals torch's GradScaler kernel (torch._amp_update_scale_)
    over a pattern of finite and non-finite steps, including growth at the interval and backoff."""
    cfg = ls.LossScaleConfig(init=2.0 ** 16, growth_interval=3, growth_factor=2.0, backoff_factor=0.5)
    pattern = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1]
    state = ls.LossScaleState.create(cfg)
    t_scale, t_tracker = torch.tensor([2.0 ** 16]), torch.tensor([0], dtype=torch.int32)
    update = jax.jit(lambda s, f: ls.update(s, f, cfg))
    for finite in pattern:
        state = update(state, jnp.asarray(bool(finite)))
        torch._amp_update_scale_(t_scale, t_tracker, torch.tensor([0.0 if finite else 1.0]), 2.0, 0.5, 3)
        assert float(state.scale) == float(t_scale[0])
        assert int(state.good_steps) == int(t_tracker[0])
    assert float(state.scale) != 2.0 ** 16  # the pattern moved it


def _fp16_trainer(init_scale, growth_interval, devices=None):
    c = tiny_config(C)
    c.precision = "float16"
    c.loss_scale.init = init_scale
    c.loss_scale.growth_interval = growth_interval
    return build_trainer(c, parallel.make_mesh(devices or jax.devices()[:1]), steps_per_epoch=2)


def test_overflow_is_skipped_with_backoff_then_growth():
    t = _fp16_trainer(2.0 ** 40, growth_interval=2)
    assert t.model.dtype == jnp.float16
    state = t.state
    params0 = jax.device_get(state.params)
    batch = random_batch(0, 8, C)
    scales, skipped = [], []
    for _ in range(40):
        state, m = t.step(state, batch)
        scales.append(float(m["loss_scale"]))
        skipped.append(int(m["skipped"]))
        if not skipped[-1]:
            break
    # 2^40 * dL/d(emb) overflows float16 in the backward pass: skipped steps, each halving the scale
    n_skip = skipped.index(0)
    assert n_skip >= 1
    assert scales[:n_skip] == [2.0 ** (40 - i - 1) for i in range(n_skip)]
    assert int(state.skipped_total) == n_skip and int(state.step) == n_skip + 1
    finite_scale = scales[n_skip]
    assert finite_scale == 2.0 ** (40 - n_skip)  # the first finite step keeps the scale (counter 1 of 2)
    assert int(state.loss_scale.good_steps) == 1
    # the skipped steps did not touch the parameters; the finite one did
    moved = np.abs(np.asarray(state.params["head"]["kernel"]) - params0["head"]["kernel"]).max()
    assert moved > 1e-4
    state, m = t.step(state, random_batch(1, 8, C))
    assert int(m["skipped"]) == 0 and float(m["loss_scale"]) == 2 * finite_scale  # growth after 2 finite steps
    assert int(state.loss_scale.good_steps) == 0


def test_first_overflow_keeps_every_parameter():
    t = _fp16_trainer(2.0 ** 60, growth_interval=2000)
    before = jax.device_get(t.state.checkpoint_items())
    state, m = t.step(t.state, random_batch(0, 8, C))
    assert int(m["skipped"]) == 1 and int(state.skipped_in_row) == 1
    after = jax.device_get(state.checkpoint_items())
    for field in ("params", "batch_stats", "head_state", "opt_state"):
        for a, b in zip(jax.tree_util.tree_leaves(after[field]), jax.tree_util.tree_leaves(before[field])):
            np.testing.assert_array_equal(a, b)
    assert float(after["loss_scale"].scale) == 2.0 ** 59 and int(after["loss_scale"].good_steps) == 0


def test_scaled_float32_step_equals_unscaled_step():
    """A power-of-two scale is exact in float32: the scaled step's update equals the plain step's."""
    from adaface_jax.train.step import make_train_step  # noqa: PLC0415
    import dataclasses  # noqa: PLC0415

    c = tiny_config(C)
    t = build_trainer(c, parallel.make_mesh(jax.devices()[:1]), steps_per_epoch=2)
    cfg = dataclasses.replace(t.step_config, loss_scale=ls.LossScaleConfig(init=2.0 ** 16))
    scaled_state = t.state.replace(loss_scale=ls.LossScaleState.create(cfg.loss_scale))
    batch = random_batch(3, 8, C)
    s1, m1 = jax.jit(make_train_step(t.model, cfg))(scaled_state, batch)
    s0, m0 = jax.jit(make_train_step(t.model, t.step_config))(t.state, batch)
    assert float(m1["loss"]) == float(m0["loss"])
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s0.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_checkpoint_round_trip_keeps_the_scale(tmp_path):
    from adaface_jax.train.checkpointer import Checkpointer  # noqa: PLC0415

    t = _fp16_trainer(2.0 ** 40, growth_interval=3)
    state = t.state
    for i in range(3):
        state, _ = t.step(state, random_batch(i, 8, C))
    want = jax.device_get(state.loss_scale)
    assert float(want.scale) < 2.0 ** 40
    ck = Checkpointer(str(tmp_path), async_save=False)
    ck.save(state, {"note": "fp16"})
    ck.wait()
    fresh = _fp16_trainer(2.0 ** 40, growth_interval=3)
    restored, _ = ck.restore(fresh.state, fresh.mesh)
    ck.close()
    assert float(restored.loss_scale.scale) == float(want.scale)
    assert int(restored.loss_scale.good_steps) == int(want.good_steps)
    assert int(restored.step) == 3


def test_precision_config_and_the_dropped_legacy_key():
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("float16", jnp.float16)):
        c = tiny_config(C)
        c.precision = name
        assert build_backbone(check_config(c, num_devices=1, process_count=1)).dtype == dtype
    c = tiny_config(C)
    c.half_precision = True                # the boolean older recipes carried: refused, naming its replacement
    with pytest.raises(ConfigError, match=r"^config.half_precision: no longer a config field; set "
                                          r"config.precision='float32'\|'bfloat16'\|'float16' instead"):
        check_config(c, num_devices=1, process_count=1)
    c = tiny_config(C)
    c.precision = "fp8"
    with pytest.raises(ConfigError, match=r"^config.precision='fp8' is unknown"):
        check_config(c, num_devices=1, process_count=1)
    c = tiny_config(C)
    c.precision, c.loss_scale.backoff_factor = "float16", 2.0
    with pytest.raises(ConfigError, match=r"^config.loss_scale=.*'backoff_factor': 2.0.*0 < backoff_factor < 1"):
        check_config(c, num_devices=1, process_count=1)


def test_bfloat16_state_has_no_scale_and_checkpoints_as_before():
    c = tiny_config(C)
    c.precision = "bfloat16"
    t = build_trainer(c, parallel.make_mesh(jax.devices()[:1]), steps_per_epoch=2)
    assert t.model.dtype == jnp.bfloat16 and t.state.loss_scale is None
    assert "loss_scale" not in t.state.checkpoint_items()
