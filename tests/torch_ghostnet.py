"""Independent PyTorch GhostNet used by refghost's test-suite as the cross-check framework.

Written from the published descriptions of GhostNet, not from their code (no code was taken from
NanoDet, Huawei or timm): the paper (Han et al., "GhostNet: More Features from Cheap Operations",
CVPR 2020, https://arxiv.org/abs/1911.11907) for the GhostModule, the GhostBottleneck and the stage
table, and the module names, registration order and hyper-parameters of the public
implementations it must match key for key:

* NanoDet's backbone, https://github.com/RangiLyu/nanodet/blob/main/nanodet/model/backbone/ghostnet.py
  (its activations: https://github.com/RangiLyu/nanodet/blob/main/nanodet/model/module/activation.py);
* Huawei's ImageNet classifier,
  https://github.com/huawei-noah/Efficient-AI-Backbones/blob/master/ghostnet_pytorch/ghostnet.py,
  and timm's port of it,
  https://github.com/huggingface/pytorch-image-models/blob/main/timm/models/ghostnet.py.

``docs/architecture.md`` lists where NanoDet's differs from Huawei's and timm's.

Two architectures are available through :func:`build`:

* ``arch="nanodet"``: NanoDet's ``GhostNet`` backbone (``nanodet/model/backbone/ghostnet.py``):
  configurable activation (LeakyReLU slope 0.1), GhostModule *without* the ``[:, :oup]`` slice,
  SE always with ReLU inside, forward returns a tuple of the ``out_stages`` outputs in ascending
  stage order.  Module names and registration order (hence state_dict order) match NanoDet.
* ``arch="ghostnet"``: Huawei's ImageNet classifier (``ghostnet_pytorch/ghostnet.py``): the same
  backbone with ReLU everywhere and the GhostModule slice, followed by
  ``global_pool -> conv_head (C9 -> 1280, bias) -> act2 (ReLU) -> flatten -> dropout -> classifier``.

Helpers: :func:`randomize` (deterministic re-initialisation), :func:`capture` (forward hooks on
every named submodule, cloned outputs), :func:`state_dict_numpy`.

This module is a helper, not a test file.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "CFGS",
    "ConvBnAct",
    "GhostBottleneck",
    "GhostModule",
    "GhostNetClassifier",
    "NanoDetGhostNet",
    "SqueezeExcite",
    "act_layer",
    "build",
    "capture",
    "hard_sigmoid",
    "make_divisible",
    "randomize",
    "state_dict_numpy",
]

# --------------------------------------------------------------------------------------------
# Configuration (the paper's Table 1, NanoDet's ``cfgs``): one list per stage, rows are
# [k, exp (mid), c (out), se, s].
# Stage 9 is not in this table: it is a ConvBnAct 1x1 to make_divisible(960 * width, 4).
# --------------------------------------------------------------------------------------------
CFGS: tuple[tuple[tuple[int, int, int, float, int], ...], ...] = (
    ((3, 16, 16, 0.0, 1),),
    ((3, 48, 24, 0.0, 2),),
    ((3, 72, 24, 0.0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0.0, 2),),
    (
        (3, 200, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ),
    ((5, 672, 160, 0.25, 2),),
    (
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
    ),
)
NUM_STAGES = 10  # 9 cfg stages + the final ConvBnAct stage
HEAD_CHANNELS = 1280  # Huawei's conv_head output, fixed (does not scale with width)


def make_divisible(v: float, divisor: int = 4, min_value: int | None = None) -> int:
    """Spec 1.2: round ``v`` to a multiple of ``divisor``, never dropping more than 10%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Spec 1.3: relu6(x + 3) / 6 (a division, not a multiplication by 1/6); not in place."""
    return F.relu6(x + 3.0) / 6.0


# --------------------------------------------------------------------------------------------
# Activations (NanoDet's ``act_layers`` names; LeakyReLU with NanoDet's slope 0.1)
# --------------------------------------------------------------------------------------------
ACTIVATIONS: dict[str | None, Callable[[], nn.Module]] = {
    "ReLU": lambda: nn.ReLU(inplace=True),
    "LeakyReLU": lambda: nn.LeakyReLU(negative_slope=0.1, inplace=True),
    "ReLU6": lambda: nn.ReLU6(inplace=True),
    "SELU": lambda: nn.SELU(inplace=True),
    "ELU": lambda: nn.ELU(inplace=True),
    "GELU": lambda: nn.GELU(),
    "PReLU": lambda: nn.PReLU(),
    "SiLU": lambda: nn.SiLU(inplace=True),
    "HardSwish": lambda: nn.Hardswish(inplace=True),
    "Hardswish": lambda: nn.Hardswish(inplace=True),
    None: lambda: nn.Identity(),
}


def act_layer(name: str | None) -> nn.Module:
    """A fresh activation module for a NanoDet activation name (``None`` gives identity)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(k for k in ACTIVATIONS if k)}")
    return ACTIVATIONS[name]()


def _act_or_empty(name: str | None) -> nn.Module:
    """GhostModule rule: the activation if ``name`` is truthy, else an empty ``nn.Sequential``."""
    return act_layer(name) if name else nn.Sequential()


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """Spec 1.4: mean over H,W -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> hard_sigmoid gate."""

    def __init__(self, in_chs: int, se_ratio: float = 0.25, divisor: int = 4) -> None:
        super().__init__()
        reduced = make_divisible(in_chs * se_ratio, divisor)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(in_chs, reduced, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)  # always ReLU: the bottleneck never passes an activation
        self.conv_expand = nn.Conv2d(reduced, in_chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.avg_pool(x)
        s = self.conv_reduce(s)
        s = self.act1(s)
        s = self.conv_expand(s)
        return x * hard_sigmoid(s)


class ConvBnAct(nn.Module):
    """Spec 1.5: conv (no bias, padding k//2) -> BN -> activation.  Only used as stage 9."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1,
                 activation: str | None = "ReLU") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = act_layer(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostModule(nn.Module):
    """Spec 1.6: primary 1x1 conv+BN(+act), cheap depthwise 3x3 conv+BN(+act), concatenated.

    ``slice_output=False`` is NanoDet (returns all ``2*ceil(oup/2)`` channels);
    ``slice_output=True`` is Huawei/timm (returns ``[:, :oup]``).
    """

    def __init__(self, inp: int, oup: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, activation: str | None = "ReLU", slice_output: bool = False) -> None:
        super().__init__()
        self.oup = oup
        self.slice_output = slice_output
        init_chs = math.ceil(oup / ratio)
        new_chs = init_chs * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_chs, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_chs),
            _act_or_empty(activation),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=False),
            nn.BatchNorm2d(new_chs),
            _act_or_empty(activation),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        if self.slice_output:
            out = out[:, : self.oup]
        return out


class GhostBottleneck(nn.Module):
    """Spec 1.7: ghost1 (act) -> [dw conv + BN if stride 2] -> [SE] -> ghost2 (linear) + shortcut."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3,
                 stride: int = 1, activation: str | None = "ReLU", se_ratio: float = 0.0,
                 slice_output: bool = False) -> None:
        super().__init__()
        self.stride = stride
        has_se = se_ratio is not None and se_ratio > 0.0
        # Registration order (= state_dict order): ghost1, conv_dw, bn_dw, se, ghost2, shortcut.
        self.ghost1 = GhostModule(in_chs, mid_chs, activation=activation, slice_output=slice_output)
        if stride > 1:
            pad = (dw_kernel_size - 1) // 2
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, pad,
                                     groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)  # no activation after it
        self.se = SqueezeExcite(mid_chs, se_ratio=se_ratio) if has_se else None
        self.ghost2 = GhostModule(mid_chs, out_chs, activation=None, slice_output=slice_output)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            pad = (dw_kernel_size - 1) // 2
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, pad, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.ghost1(x)
        if self.stride > 1:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(residual)  # in place into ghost2's fresh output, as NanoDet does
        return x


class _GhostNetTrunk(nn.Module):
    """Stem + 10 stages shared by both architectures (registers conv_stem, bn1, act1, blocks)."""

    def __init__(self, width: float, activation: str | None, slice_output: bool) -> None:
        super().__init__()
        self.width = width
        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(3, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = act_layer(activation)
        in_chs = stem_chs
        stages: list[nn.Module] = []
        exp = None
        for cfg in CFGS:
            layers = []
            for k, exp, c, se_ratio, s in cfg:
                out_chs = make_divisible(c * width, 4)
                mid_chs = make_divisible(exp * width, 4)
                layers.append(GhostBottleneck(in_chs, mid_chs, out_chs, k, s, activation=activation,
                                              se_ratio=se_ratio, slice_output=slice_output))
                in_chs = out_chs
            stages.append(nn.Sequential(*layers))
        # Stage 9 uses the expansion of the last cfg row (960).
        self.num_features = make_divisible(exp * width, 4)
        stages.append(nn.Sequential(ConvBnAct(in_chs, self.num_features, 1, activation=activation)))
        self.blocks = nn.Sequential(*stages)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv_stem(x)))


class NanoDetGhostNet(_GhostNetTrunk):
    """NanoDet's GhostNet backbone; forward returns the out_stages outputs in ascending order."""

    def __init__(self, width: float = 1.0, out_stages: Iterable[int] = (4, 6, 9),
                 activation: str | None = "ReLU") -> None:
        out_stages = tuple(out_stages)
        if not set(out_stages).issubset(range(NUM_STAGES)):
            raise AssertionError(f"out_stages must be a subset of 0..9, got {out_stages}")
        super().__init__(width, activation, slice_output=False)
        self.out_stages = out_stages
        self.activation = activation

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        outputs = []
        for i in range(NUM_STAGES):  # all 10 stages always run
            x = self.blocks[i](x)
            if i in self.out_stages:
                outputs.append(x)
        return tuple(outputs)


class GhostNetClassifier(_GhostNetTrunk):
    """Huawei's GhostNet ImageNet classifier (ReLU everywhere, sliced GhostModules, 1280 head)."""

    def __init__(self, width: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__(width, "ReLU", slice_output=True)
        self.dropout = dropout
        self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.conv_head = nn.Conv2d(self.num_features, HEAD_CHANNELS, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        x = self.global_pool(x)
        x = self.conv_head(x)
        x = self.act2(x)
        x = x.reshape(x.shape[0], -1)
        if self.dropout > 0.0:
            x = F.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------
def build(arch: str = "nanodet", width: float = 1.0, activation: str | None = "ReLU",
          out_stages: Iterable[int] = (4, 6, 9), num_classes: int = 1000) -> nn.Module:
    """Build a GhostNet in eval mode (float32, PyTorch default init, nothing downloaded).

    ``arch="nanodet"`` uses ``width``, ``activation`` and ``out_stages``;
    ``arch="ghostnet"`` uses ``width`` and ``num_classes`` and ignores the other two.
    """
    if arch == "nanodet":
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        model: nn.Module = NanoDetGhostNet(width=width, out_stages=out_stages, activation=activation)
    elif arch == "ghostnet":
        model = GhostNetClassifier(width=width, num_classes=num_classes)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'nanodet' or 'ghostnet'")
    return model.eval()


def _normal(g: torch.Generator, shape: torch.Size, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def _uniform(g: torch.Generator, shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float32) * (hi - lo) + lo


RESIDUAL_BRANCH_GAIN = 0.3  # ghost2.primary_conv.0: last conv of the residual branch
CONV_SHORTCUT_GAIN = 0.8  # shortcut.2: 1x1 conv of a non-identity shortcut


def _conv_gain(name: str) -> float:
    if name.endswith("ghost2.primary_conv.0"):
        return RESIDUAL_BRANCH_GAIN
    if name.endswith("shortcut.2"):
        return CONV_SHORTCUT_GAIN
    return 1.0


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Deterministically re-initialise ``model`` in place and return it.

    Values are drawn in float32 from ``torch.Generator().manual_seed(seed)`` in ``named_modules``
    order and then cast to each tensor's dtype, so ``randomize(m.double(), s)`` equals
    ``randomize(m, s).double()`` exactly.

    * Conv2d / Linear weight: N(0, std = gain/sqrt(fan_in)), fan_in = (in/groups)*kh*kw.  gain is
      1 except for the convs that feed a residual sum: ``*.ghost2.primary_conv.0`` (gain 0.3, the
      cheap half of ghost2 inherits it) and ``*.shortcut.2`` (gain 0.8).  Without these the
      eval-mode BNs (E[w^2/var] ~ 1.19) and the 16 residual adds blow the RMS of stage 9 up to
      ~50; with them every stage output has RMS ~0.6-1.4 for all activations.
    * Conv2d / Linear bias: N(0, 0.1).
    * BatchNorm weight U(0.5, 1.5), bias N(0, 0.1), running_mean N(0, 0.1),
      running_var U(0.5, 1.5); num_batches_tracked reset to 0.
    * PReLU weight U(0.1, 0.4).
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    for _name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            fan_in = w.shape[1] * int(np.prod(w.shape[2:], dtype=np.int64)) if w.dim() > 2 else w.shape[1]
            w.copy_(_normal(g, w.shape, _conv_gain(_name) / math.sqrt(fan_in)))
            if m.bias is not None:
                m.bias.copy_(_normal(g, m.bias.shape, 0.1))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.copy_(_uniform(g, m.weight.shape, 0.5, 1.5))
            m.bias.copy_(_normal(g, m.bias.shape, 0.1))
            m.running_mean.copy_(_normal(g, m.running_mean.shape, 0.1))
            m.running_var.copy_(_uniform(g, m.running_var.shape, 0.5, 1.5))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.zero_()
        elif isinstance(m, nn.PReLU):
            m.weight.copy_(_uniform(g, m.weight.shape, 0.1, 0.4))
    return model


def _clone_output(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_output(o) for o in out)
    return out


def capture(model: nn.Module, x) -> tuple[object, "OrderedDict[str, torch.Tensor]"]:
    """Run ``model(x)`` under ``torch.no_grad()`` recording every named submodule's output.

    Returns ``(output, intermediates)`` where ``intermediates`` maps module names (as in
    ``named_modules()``, root excluded) to a detached *clone* of that module's output, in the
    order the forward hooks fired (children before their parents).  Modules that are never called
    do not appear: NanoDet's forward runs ``blocks[i]`` one by one, so the ``blocks`` container
    itself is absent for ``arch="nanodet"`` (present for ``arch="ghostnet"``).  Cloning is required because
    in-place activations and ``x += shortcut(res)`` overwrite tensors after their hook ran.
    ``x`` may be a tensor or a NumPy array (converted to the model's parameter dtype).
    """
    if isinstance(x, np.ndarray):
        dtype = next(model.parameters()).dtype
        x = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    intermediates: OrderedDict[str, torch.Tensor] = OrderedDict()
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            intermediates[name] = _clone_output(output)
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            output = model(x)
    finally:
        for h in handles:
            h.remove()
    return output, intermediates


def se_gates(intermediates: dict) -> dict[str, np.ndarray]:
    """``{"<block>.se.gate": hard_sigmoid(<block>.se.conv_expand)}`` for every SE in a capture.

    The gate is a function call inside SqueezeExcite, not a module, so no hook sees it; this
    computes it with the model's own float ops from the captured conv_expand output (tensors or
    arrays). Returns NumPy arrays.
    """
    gates = {}
    for name, value in intermediates.items():
        if name.endswith(".se.conv_expand"):
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            gates[name[: -len("conv_expand")] + "gate"] = hard_sigmoid(t).numpy()
    return gates


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """``model.state_dict()`` as NumPy arrays (copies), in state_dict order.

    ``num_batches_tracked`` entries come out as 0-d int64 arrays.
    """
    out: dict[str, np.ndarray] = {}
    for k, v in model.state_dict().items():
        arr = v.detach().cpu().numpy().copy()
        if k.endswith("num_batches_tracked"):
            arr = np.asarray(arr, dtype=np.int64).reshape(())
        out[k] = arr
    return out
