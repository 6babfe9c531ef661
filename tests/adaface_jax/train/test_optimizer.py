"""Optimizer, parameter groups and LR schedule against torch.optim.SGD / MultiStepLR."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn
from torch.nn import functional as F

from adaface_jax.models import build_model
from adaface_jax.train import optimizer as optim
from adaface_jax.train.state import create_train_state, init_variables
from adaface_jax.train.step import StepConfig, make_train_step
from tests.support import torch_reference
from tests.support.train_fixtures import TinyNet, random_batch

C, E, B = 12, 16, 8


class TorchTiny(nn.Module):
    """TinyBackbone in PyTorch: pad(0,1) conv3x3/2, BN2d, PReLU, mean-pool, Linear, BN1d(affine=False)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.prelu = nn.PReLU(8)
        self.fc = nn.Linear(8, E)
        self.bn1d = nn.BatchNorm1d(E, affine=False)

    def forward(self, x):  # x NHWC
        x = F.pad(x.permute(0, 3, 1, 2), (0, 1, 0, 1))  # Flax 'SAME' for stride 2 on an even size
        x = self.prelu(self.bn(self.conv(x))).mean(dim=(2, 3))
        x = self.bn1d(self.fc(x))
        norm = torch.norm(x, 2, 1, True)
        return x / norm, norm


def _load_torch(tm, head, params, batch_stats):
    p = params["backbone"]
    with torch.no_grad():
        tm.conv.weight.copy_(torch.from_numpy(np.array(p["conv"]["kernel"]).transpose(3, 2, 0, 1)))
        tm.bn.weight.copy_(torch.from_numpy(np.array(p["bn"]["scale"])))
        tm.bn.bias.copy_(torch.from_numpy(np.array(p["bn"]["bias"])))
        tm.prelu.weight.copy_(torch.from_numpy(np.array(p["prelu"]["alpha"])))
        tm.fc.weight.copy_(torch.from_numpy(np.array(p["fc"]["kernel"]).T))
        tm.fc.bias.copy_(torch.from_numpy(np.array(p["fc"]["bias"])))
        head.kernel.copy_(torch.from_numpy(np.array(params["head"]["kernel"])))


def test_three_steps_match_torch_sgd_with_param_groups():
    model = TinyNet(embedding_size=E)
    params, batch_stats, head_state = init_variables(model, jax.random.PRNGKey(3), C, image_size=16, embedding_size=E)
    # Perturb BN/PReLU/bias away from their init so every group's decay and momentum matter.
    flat = traverse_util.flatten_dict(params)
    rs = np.random.RandomState(0)
    flat = {k: v + 0.1 * rs.standard_normal(v.shape).astype(np.float32) for k, v in flat.items()}
    params = traverse_util.unflatten_dict(flat)

    schedule = optim.lr_schedule(0.1, steps_per_epoch=1, milestones=(2,), gamma=0.1)
    tx = optim.make_optimizer(schedule, params, batch_stats, momentum=0.9, weight_decay=5e-4)
    state = create_train_state(params, batch_stats, head_state, tx, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, StepConfig(head="adaface", head_kwargs=dict(m=0.4, h=0.333, s=64.0,
                                                                                       t_alpha=0.01),
                                                      num_classes=C, lr_fn=schedule)))

    tm, head = TorchTiny(), torch_reference.AdaFace(E, C, m=0.4, h=0.333, s=64.0, t_alpha=0.01)
    _load_torch(tm, head, params, batch_stats)
    decay = [tm.conv.weight, tm.prelu.weight, tm.fc.weight, tm.fc.bias, head.kernel]
    no_decay = [tm.bn.weight, tm.bn.bias]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)

    for i in range(3):
        batch = random_batch(i, B, C)
        state, metrics = step(state, batch)
        emb, norm = tm(torch.from_numpy(batch["image"]))
        loss = F.cross_entropy(head(emb, norm, torch.from_numpy(batch["label"]).long()),
                               torch.from_numpy(batch["label"]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)

    p = jax.device_get(state.params)
    got = {"conv": p["backbone"]["conv"]["kernel"].transpose(3, 2, 0, 1), "bn_w": p["backbone"]["bn"]["scale"],
           "bn_b": p["backbone"]["bn"]["bias"], "prelu": p["backbone"]["prelu"]["alpha"],
           "fc_w": p["backbone"]["fc"]["kernel"].T, "fc_b": p["backbone"]["fc"]["bias"], "kernel": p["head"]["kernel"],
           "bn_mean": state.batch_stats["bn"]["mean"], "bn_var": state.batch_stats["bn"]["var"],
           "batch_mean": state.head_state.batch_mean, "batch_std": state.head_state.batch_std}
    want = {"conv": tm.conv.weight, "bn_w": tm.bn.weight, "bn_b": tm.bn.bias, "prelu": tm.prelu.weight,
            "fc_w": tm.fc.weight, "fc_b": tm.fc.bias, "kernel": head.kernel, "bn_mean": tm.bn.running_mean,
            "bn_var": tm.bn.running_var, "batch_mean": head.batch_mean, "batch_std": head.batch_std}
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k].detach().numpy(), atol=1e-5, rtol=1e-5, err_msg=k)
    # The updates were not trivially small: params moved by far more than the tolerance.
    assert np.abs(np.asarray(got["fc_w"]) - np.asarray(params["backbone"]["fc"]["kernel"]).T).max() > 1e-3


def _torch_split_parameters(module):
    """The original's split_parameters: BatchNorm params undecayed, every other leaf module's decayed."""
    decay, no_decay = [], []
    for m in module.modules():
        if list(m.children()):
            continue
        target = no_decay if isinstance(m, nn.modules.batchnorm._BatchNorm) else decay
        target.extend(m.parameters(recurse=False))
    return decay, no_decay


def test_decay_mask_matches_original_groups_on_ir_18():
    flax_model = build_model("ir_18")
    variables = jax.eval_shape(lambda: flax_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)), train=False))
    params = {"backbone": variables["params"], "head": {"kernel": jax.ShapeDtypeStruct((512, 7), jnp.float32)}}
    mask = optim.decay_mask(params, variables["batch_stats"])
    leaves = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask))
    n_decay = n_plain = 0
    for leaf, m in leaves:
        if m:
            n_decay += int(np.prod(leaf.shape))
        else:
            n_plain += int(np.prod(leaf.shape))

    tm = torch_reference.build_backbone("ir_18")
    decay, no_decay = _torch_split_parameters(tm)
    assert n_decay == sum(p.numel() for p in decay) + 512 * 7  # + head.kernel
    assert n_plain == sum(p.numel() for p in no_decay)
    assert mask["backbone"]["input_layer_2"]["alpha"] and mask["backbone"]["output_layer_3"]["bias"]
    assert not mask["backbone"]["input_layer_1"]["scale"] and not mask["backbone"]["body_2"]["shortcut_layer_1"]["bias"]


@pytest.mark.parametrize("milestones,spe", [((12, 20, 24), 3), ((1,), 5)])
def test_lr_schedule_matches_multisteplr_per_epoch(milestones, spe):
    schedule = optim.lr_schedule(0.1, spe, milestones, 0.1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
    epochs = max(milestones) + 2
    for epoch in range(epochs):
        for s in range(spe):
            np.testing.assert_allclose(float(schedule(epoch * spe + s)), opt.param_groups[0]["lr"], rtol=1e-6)
        opt.step()
        sched.step()


def test_lr_warmup_is_linear_then_multistep():
    schedule = optim.lr_schedule(0.1, 10, (2,), 0.1, warmup_steps=5)
    np.testing.assert_allclose([float(schedule(i)) for i in (0, 1, 4, 5, 19, 20)],
                               [0.0, 0.02, 0.08, 0.1, 0.1, 0.01], rtol=1e-6, atol=1e-9)
