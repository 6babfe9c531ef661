"""`adaface-jax info --params`: the parameter counts equal the PyTorch reference models'."""
import pytest

from adaface_jax.cli import main
from tests.support import torch_reference


def test_info_params_counts_match_the_pytorch_reference(capsys):
    assert main(["info", "--params"]) == 0
    out = capsys.readouterr().out
    printed = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
               if line.strip().endswith("M parameters")}
    for arch in ("ir_18", "ir_50"):
        n = sum(p.numel() for p in torch_reference.build_backbone(arch).parameters())
        assert printed[arch] == pytest.approx(n / 1e6, abs=0.006), arch
