"""PyTorch reference of AdaFace's backbone and margin heads, written from the published description
(the original repository: net.py, head.py and the released .ckpt layout).  Module structure and attribute names are
chosen so ``state_dict()`` keys are exactly those of the released checkpoints
(``input_layer.0.weight``, ``body.3.res_layer.1.weight``, ``output_layer.4.running_var`` ...).

Used only by the tests as an independent reference for our Flax port.
"""
from __future__ import annotations

import math

import torch
from torch import nn

BASIC_UNITS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3]}
BOTTLENECK_UNITS = {152: [3, 8, 36, 3], 200: [3, 24, 36, 3]}


class SEModule(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        w = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * w


def _shortcut(in_channel, depth, stride):
    if in_channel == depth:
        return nn.MaxPool2d(1, stride)
    return nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))


class BasicBlockIR(nn.Module):
    def __init__(self, in_channel, depth, stride, use_se=False):
        super().__init__()
        self.shortcut_layer = _shortcut(in_channel, depth, stride)
        layers = [
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        self.res_layer = nn.Sequential(*layers)
        if use_se:
            self.res_layer.add_module("se_block", SEModule(depth, 16))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class BottleneckIR(nn.Module):
    def __init__(self, in_channel, depth, stride, use_se=False):
        super().__init__()
        mid = depth // 4
        self.shortcut_layer = _shortcut(in_channel, depth, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, mid, 1, 1, 0, bias=False),
            nn.BatchNorm2d(mid),
            nn.PReLU(mid),
            nn.Conv2d(mid, mid, 3, 1, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.PReLU(mid),
            nn.Conv2d(mid, depth, 1, stride, 0, bias=False),
            nn.BatchNorm2d(depth),
        )
        if use_se:
            self.res_layer.add_module("se_block", SEModule(depth, 16))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class Backbone(nn.Module):
    def __init__(self, input_size=112, num_layers=50, use_se=False):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        if num_layers in BASIC_UNITS:
            chans = [(64, 64), (64, 128), (128, 256), (256, 512)]
            units, block = BASIC_UNITS[num_layers], BasicBlockIR
        else:
            chans = [(64, 256), (256, 512), (512, 1024), (1024, 2048)]
            units, block = BOTTLENECK_UNITS[num_layers], BottleneckIR
        modules = []
        for (cin, depth), n in zip(chans, units):
            modules.append(block(cin, depth, 2, use_se))
            modules.extend(block(depth, depth, 1, use_se) for _ in range(n - 1))
        self.body = nn.Sequential(*modules)
        out_c = chans[-1][1]
        side = input_size // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(out_c), nn.Dropout(0.4), nn.Flatten(), nn.Linear(out_c * side * side, 512),
            nn.BatchNorm1d(512, affine=False))

    def forward(self, x):
        x = self.output_layer(self.body(self.input_layer(x)))
        norm = torch.norm(x, 2, 1, True)
        return x / norm, norm


def build_backbone(arch: str, input_size: int = 112) -> Backbone:
    """'ir_50' / 'ir_se_101' ... -> Backbone."""
    use_se = arch.startswith("ir_se_")
    n = int(arch.rsplit("_", 1)[1])
    return Backbone(input_size, 100 if n == 101 else n, use_se)


def randomize_(model: nn.Module, seed: int = 0, gain: float = 0.7) -> nn.Module:
    """Random weights everywhere and BN running stats far from their 0/1 init, so a mapping
    that mixes up mean/var, scale/bias or layouts shows in the outputs.  ``gain`` < 1 on the
    convolutions keeps activations O(1) through the residual stack in eval mode."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(rand(mod.weight.shape) * gain / math.sqrt(fan_in))
                if mod.bias is not None:
                    mod.bias.copy_(0.1 * rand(mod.bias.shape))
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.copy_(0.2 * rand(mod.running_mean.shape))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
                mod.num_batches_tracked.fill_(7)
                if mod.affine:
                    mod.weight.copy_(1.0 + 0.1 * rand(mod.weight.shape))
                    mod.bias.copy_(0.1 * rand(mod.bias.shape))
            elif isinstance(mod, nn.PReLU):
                mod.weight.copy_(0.25 + 0.1 * rand(mod.weight.shape))
    return model


# ---------------------------------------------------------------------------------------------
# Margin heads, written from the original's head.py `AdaFace`.


def l2_norm(x, axis):
    return x / torch.norm(x, 2, axis, True)


def init_kernel(embedding_size, classnum, generator=None):
    k = torch.empty(embedding_size, classnum).uniform_(-1, 1, generator=generator)
    return k.renorm_(2, 1, 1e-5).mul_(1e5)


class AdaFace(nn.Module):
    def __init__(self, embedding_size=512, classnum=70722, m=0.4, h=0.333, s=64.0, t_alpha=0.01):
        super().__init__()
        self.kernel = nn.Parameter(init_kernel(embedding_size, classnum))
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, 1e-3
        self.register_buffer("t", torch.zeros(1))
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def forward(self, embeddings, norms, label):
        cosine = (embeddings @ l2_norm(self.kernel, 0)).clamp(-1 + self.eps, 1 - self.eps)
        safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
        with torch.no_grad():
            mean = safe_norms.mean().detach()
            std = safe_norms.std().detach()
            self.batch_mean = mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
            self.batch_std = std * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        scaler = torch.clip((safe_norms - self.batch_mean) / (self.batch_std + self.eps) * self.h, -1, 1)
        onehot = torch.zeros_like(cosine).scatter_(1, label.reshape(-1, 1), 1.0)
        theta = cosine.acos()
        theta_m = torch.clip(theta + onehot * (-self.m * scaler), min=self.eps, max=math.pi - self.eps)
        cosine = theta_m.cos() - onehot * (self.m + self.m * scaler)
        return cosine * self.s


class _FixedMargin(nn.Module):
    """The original's ArcFace and CosFace heads share their kernel and clamped cosine; only the margin differs."""

    def __init__(self, embedding_size, classnum, s, m):
        super().__init__()
        self.kernel = nn.Parameter(init_kernel(embedding_size, classnum))
        self.m, self.s, self.eps = m, s, 1e-4

    def cosine_and_margin(self, embeddings, label):
        cosine = (embeddings @ l2_norm(self.kernel, 0)).clamp(-1 + self.eps, 1 - self.eps)
        return cosine, torch.zeros_like(cosine).scatter_(1, label.reshape(-1, 1), self.m)


class ArcFace(_FixedMargin):
    def __init__(self, embedding_size=512, classnum=70722, s=64.0, m=0.5):
        super().__init__(embedding_size, classnum, s, m)

    def forward(self, embeddings, norms, label):
        cosine, m_hot = self.cosine_and_margin(embeddings, label)
        theta_m = torch.clip(cosine.acos() + m_hot, min=self.eps, max=math.pi - self.eps)
        return theta_m.cos() * self.s


class CosFace(_FixedMargin):
    def __init__(self, embedding_size=512, classnum=70722, s=64.0, m=0.4):
        super().__init__(embedding_size, classnum, s, m)

    def forward(self, embeddings, norms, label):
        cosine, m_hot = self.cosine_and_margin(embeddings, label)
        return (cosine - m_hot) * self.s

def save_released(state_dict, path):
    """``state_dict`` (a backbone's) saved as the released AdaFace checkpoints are: ``{'state_dict': {'model.*'}}``."""
    torch.save({"state_dict": {"model." + k: v for k, v in state_dict.items()}}, path)
