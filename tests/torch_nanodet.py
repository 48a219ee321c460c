"""Independent PyTorch NanoDet (inference only) used by refghost's tests as the cross-check.

Written for refghost from the published structure of NanoDet (https://github.com/RangiLyu/nanodet:
``nanodet/model/backbone/shufflenetv2.py``, ``fpn/ghost_pan.py``, ``fpn/pan.py``,
``head/nanodet_plus_head.py``, ``head/nanodet_head.py``, ``module/conv.py``), not copied from it:
the module names, their registration order (hence the state_dict keys) and the forward passes
match NanoDet's; the training-only parts (losses, assigners, ``aux_fpn``/``aux_head``) are left
out. The GhostNet backbone and GhostPAN's GhostBottleneck are ``tests/torch_ghostnet.py``'s.

* Backbones: :class:`ShuffleNetV2` (``with_last_conv=False``), torch_ghostnet's NanoDetGhostNet.
* Necks: :class:`GhostPAN` (NanoDet-Plus), :class:`PAN` (v0.x).
* Heads: :class:`NanoDetPlusHead`, :class:`NanoDetHead` (v0.x); ``forward(feats, export=True)``
  is NanoDet's ``_forward_onnx`` (class scores sigmoided), else the raw ``forward``.
* :func:`build` makes a :class:`Detector` (``backbone``, ``fpn``, ``head``) from a
  :class:`refghost.detector.spec.DetectorConfig`; :func:`randomize` is torch_ghostnet's;
  :func:`capture` records every module's output by module path.

This module is a helper, not a test file.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ghostnet import GhostBottleneck, NanoDetGhostNet, act_layer, randomize  # noqa: F401

__all__ = ["ConvModule", "DepthwiseConvModule", "ShuffleNetV2", "GhostPAN", "PAN", "NanoDetPlusHead",
           "NanoDetHead", "Detector", "build", "randomize", "capture"]


# --- conv modules (NanoDet's module/conv.py: child names conv/bn/act and
# depthwise/pointwise/dwnorm/pwnorm/act, in that registration order) ---------------------------


class ConvModule(nn.Module):
    """conv (kxk, bias only without BN) -> bn -> act; ``norm=False`` drops the BN."""

    def __init__(self, in_chs, out_chs, kernel, stride=1, padding=0, norm=True, activation="ReLU"):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, padding, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(out_chs)
        self.has_act = bool(activation)
        if activation:
            self.act = act_layer(activation)

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return self.act(x) if self.has_act else x


class DepthwiseConvModule(nn.Module):
    """depthwise kxk -> dwnorm -> act -> pointwise 1x1 -> pwnorm -> act (one act module, twice)."""

    def __init__(self, in_chs, out_chs, kernel, stride=1, padding=0, activation="ReLU"):
        super().__init__()
        self.depthwise = nn.Conv2d(in_chs, in_chs, kernel, stride, padding, groups=in_chs, bias=False)
        self.pointwise = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.dwnorm = nn.BatchNorm2d(in_chs)
        self.pwnorm = nn.BatchNorm2d(out_chs)
        self.act = act_layer(activation)

    def forward(self, x):
        x = self.act(self.dwnorm(self.depthwise(x)))
        return self.act(self.pwnorm(self.pointwise(x)))


def _trace(module, name, tensor):
    """Record a clone of ``tensor`` as ``<module path>.<name>`` for :func:`capture`: tensors no
    module returns (concatenations, channel halves, PAN's interpolations and sums). Returns it."""
    module.traced[name] = tensor.detach().clone()
    return tensor


def conv_unit(depthwise, in_chs, out_chs, kernel, stride, activation):
    """A ``DepthwiseConvModule`` or a ``ConvModule`` with BN, padding kernel//2."""
    cls = DepthwiseConvModule if depthwise else ConvModule
    return cls(in_chs, out_chs, kernel, stride=stride, padding=kernel // 2, activation=activation)


# --- ShuffleNetV2 ---------------------------------------------------------------------------

#: Output channels of conv1 and stages 2-4 per model size (conv5 is never built by NanoDet).
SHUFFLENET_CHANNELS = {0.5: [24, 48, 96, 192], 1.0: [24, 116, 232, 464], 1.5: [24, 176, 352, 704],
                       2.0: [24, 244, 488, 976]}
SHUFFLENET_REPEATS = [4, 8, 4]


class ShuffleV2Block(nn.Module):
    """Stride 2: cat(branch1(x), branch2(x)); stride 1: cat(x1, branch2(x2)) with x1, x2 the two
    channel halves; then a channel shuffle with 2 groups."""

    def __init__(self, inp, oup, stride, activation):
        super().__init__()
        self.stride = stride
        half = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, half, 1, bias=False), nn.BatchNorm2d(half), act_layer(activation))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), act_layer(activation),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), act_layer(activation))

    def forward(self, x):
        self.traced = {}
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            _trace(self, "chunk.0", x1)
            _trace(self, "chunk.1", x2)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        _trace(self, "cat", out)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleNetV2(nn.Module):
    def __init__(self, model_size=1.0, out_stages=(2, 3, 4), activation="ReLU"):
        super().__init__()
        self.out_stages = tuple(out_stages)
        channels = SHUFFLENET_CHANNELS[model_size]
        self.conv1 = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]),
                                   act_layer(activation))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inp = channels[0]
        for stage, repeats, oup in zip((2, 3, 4), SHUFFLENET_REPEATS, channels[1:]):
            blocks = [ShuffleV2Block(inp, oup, 2, activation)]
            blocks += [ShuffleV2Block(oup, oup, 1, activation) for _ in range(repeats - 1)]
            setattr(self, f"stage{stage}", nn.Sequential(*blocks))
            inp = oup

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        outs = []
        for stage in (2, 3, 4):
            x = getattr(self, f"stage{stage}")(x)
            if stage in self.out_stages:
                outs.append(x)
        return tuple(outs)


# --- necks ----------------------------------------------------------------------------------


class GhostBlocks(nn.Module):
    """``reduce_conv`` (1x1 conv with bias + act, only if use_res) registered before ``blocks``."""

    def __init__(self, in_chs, out_chs, expand, kernel, num_blocks, use_res, activation):
        super().__init__()
        self.use_res = use_res
        if use_res:
            self.reduce_conv = ConvModule(in_chs, out_chs, 1, norm=False, activation=activation)
        self.blocks = nn.Sequential(*[GhostBottleneck(in_chs, int(out_chs * expand), out_chs, kernel,
                                                     activation=activation) for _ in range(num_blocks)])

    def forward(self, x):
        out = self.blocks(x)
        return out + self.reduce_conv(x) if self.use_res else out


class GhostPAN(nn.Module):
    def __init__(self, in_channels, out_channels, use_depthwise=False, kernel_size=5, expand=1, num_blocks=1,
                 use_res=False, num_extra_level=0, activation="LeakyReLU"):
        super().__init__()
        c, k, n = out_channels, kernel_size, len(in_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear")  # align_corners None: False
        self.reduce_layers = nn.ModuleList([ConvModule(i, c, 1, activation=activation) for i in in_channels])

        def blocks():
            return GhostBlocks(2 * c, c, expand, k, num_blocks, use_res, activation)

        self.top_down_blocks = nn.ModuleList([blocks() for _ in range(n - 1)])
        self.downsamples = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for _ in range(n - 1):
            self.downsamples.append(conv_unit(use_depthwise, c, c, k, 2, activation))
            self.bottom_up_blocks.append(blocks())
        self.extra_lvl_in_conv = nn.ModuleList([conv_unit(use_depthwise, c, c, k, 2, activation)
                                                for _ in range(num_extra_level)])
        self.extra_lvl_out_conv = nn.ModuleList([conv_unit(use_depthwise, c, c, k, 2, activation)
                                                 for _ in range(num_extra_level)])

    def forward(self, inputs):
        self.traced = {}
        reduced = [layer(x) for x, layer in zip(inputs, self.reduce_layers)]
        inner = [reduced[-1]]
        for j, low in enumerate(reversed(reduced[:-1])):  # top-down: cat(upsampled high, low)
            cat = _trace(self, f"top_down_blocks.{j}.input", torch.cat([self.upsample(inner[0]), low], 1))
            inner.insert(0, self.top_down_blocks[j](cat))
        outs = [inner[0]]
        for i in range(len(reduced) - 1):  # bottom-up: cat(downsampled low, top-down high)
            down = self.downsamples[i](outs[-1])
            cat = _trace(self, f"bottom_up_blocks.{i}.input", torch.cat([down, inner[i + 1]], 1))
            outs.append(self.bottom_up_blocks[i](cat))
        for conv_in, conv_out in zip(self.extra_lvl_in_conv, self.extra_lvl_out_conv):
            outs.append(conv_in(reduced[-1]) + conv_out(outs[-1]))
        return tuple(outs)


class PAN(nn.Module):
    """NanoDet v0.x PAN (FPN's lateral 1x1 convs, no BN; top-down x2 and bottom-up x0.5 bilinear
    interpolations added in place)."""

    def __init__(self, in_channels, out_channels, activation=None):
        super().__init__()
        self.lateral_convs = nn.ModuleList([ConvModule(i, out_channels, 1, norm=False, activation=activation)
                                            for i in in_channels])

    def forward(self, inputs):
        self.traced = {}
        laterals = [conv(x) for x, conv in zip(inputs, self.lateral_convs)]
        n = len(laterals)
        for j, i in enumerate(range(n - 1, 0, -1)):
            up = F.interpolate(laterals[i], scale_factor=2, mode="bilinear")
            laterals[i - 1] += _trace(self, f"upsample.{j}", up)
            if 0 < i - 1:  # a level's sum before the bottom-up one is added to it
                _trace(self, f"top_down.{i - 1}", laterals[i - 1])
        for i in range(n - 1):
            down = F.interpolate(laterals[i], scale_factor=0.5, mode="bilinear")
            laterals[i + 1] += _trace(self, f"downsample.{i}", down)
        return tuple(laterals)


# --- heads ----------------------------------------------------------------------------------


class Integral(nn.Module):
    """Holds the ``project`` buffer, linspace(0, reg_max, reg_max + 1), as NanoDet's state_dict has it."""

    def __init__(self, reg_max):
        super().__init__()
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))


def _export_level(out, num_classes):
    """``_forward_onnx``'s per-level form: sigmoid on the class channels, box logits as they are."""
    cls, reg = out[:, :num_classes], out[:, num_classes:]
    return torch.cat([cls.sigmoid(), reg], dim=1)


def _priors(levels):
    """flatten(start_dim=2) each level, cat along priors, permute to (N, priors, C)."""
    return torch.cat([o.flatten(start_dim=2) for o in levels], dim=2).permute(0, 2, 1)


class NanoDetPlusHead(nn.Module):
    def __init__(self, num_classes, input_channel, feat_channels=96, stacked_convs=2, kernel_size=5,
                 strides=(8, 16, 32), conv_type="DWConv", reg_max=7, activation="LeakyReLU"):
        super().__init__()
        self.num_classes = num_classes
        self.distribution_project = Integral(reg_max)
        self.cls_convs = nn.ModuleList([
            nn.ModuleList([conv_unit(conv_type != "Conv", input_channel if j == 0 else feat_channels, feat_channels,
                                     kernel_size, 1, activation) for j in range(stacked_convs)])
            for _ in strides])
        self.gfl_cls = nn.ModuleList([nn.Conv2d(feat_channels, num_classes + 4 * (reg_max + 1), 1)
                                      for _ in strides])

    def forward(self, feats, export=False):
        outs = []
        for x, convs, cls in zip(feats, self.cls_convs, self.gfl_cls):
            for conv in convs:
                x = conv(x)
            out = cls(x)
            outs.append(_export_level(out, self.num_classes) if export else out)
        return _priors(outs)


class NanoDetHead(nn.Module):
    """NanoDet v0.x head (GFLHead's layout): 3x3 conv towers, ``gfl_reg`` built even when shared."""

    def __init__(self, num_classes, input_channel, feat_channels=256, stacked_convs=2, strides=(8, 16, 32),
                 conv_type="DWConv", reg_max=16, share_cls_reg=False, activation="LeakyReLU"):
        super().__init__()
        self.num_classes, self.share_cls_reg = num_classes, share_cls_reg
        self.distribution_project = Integral(reg_max)
        depthwise = conv_type != "Conv"

        def tower():
            return nn.ModuleList([conv_unit(depthwise, input_channel if j == 0 else feat_channels, feat_channels,
                                            3, 1, activation) for j in range(stacked_convs)])

        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for _ in strides:
            self.cls_convs.append(tower())
            self.reg_convs.append(nn.ModuleList() if share_cls_reg else tower())
        box_bins = 4 * (reg_max + 1)
        self.gfl_cls = nn.ModuleList([nn.Conv2d(feat_channels, num_classes + (box_bins if share_cls_reg else 0), 1)
                                      for _ in strides])
        self.gfl_reg = nn.ModuleList([nn.Conv2d(feat_channels, box_bins, 1) for _ in strides])

    def forward(self, feats, export=False):
        self.traced = {}
        outs = []
        for i, x in enumerate(feats):
            cls_feat = reg_feat = x
            for conv in self.cls_convs[i]:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs[i]:
                reg_feat = conv(reg_feat)
            if self.share_cls_reg:
                out = self.gfl_cls[i](cls_feat)
            else:
                out = torch.cat([self.gfl_cls[i](cls_feat), self.gfl_reg[i](reg_feat)], dim=1)
                _trace(self, f"cls_reg.{i}", out)
            outs.append(_export_level(out, self.num_classes) if export else out)
        return _priors(outs)


# --- the detector ---------------------------------------------------------------------------


class Detector(nn.Module):
    """backbone -> fpn -> head; ``forward(x)`` is NanoDet's ``model.forward`` (raw head output),
    ``forward(x, export=True)`` the exported ONNX output."""

    def __init__(self, backbone, fpn, head):
        super().__init__()
        self.backbone, self.fpn, self.head = backbone, fpn, head

    def forward(self, x, export=False):
        return self.head(self.fpn(self.backbone(x)), export=export)


def build(config) -> Detector:
    """The detector a :class:`refghost.detector.spec.DetectorConfig` describes, in eval mode
    (float32, PyTorch's default init: call :func:`randomize`)."""
    if config.backbone == "shufflenetv2":
        backbone = ShuffleNetV2(config.backbone_width, config.out_stages, config.backbone_activation)
    else:
        backbone = NanoDetGhostNet(config.backbone_width, config.out_stages, config.backbone_activation)
    with torch.no_grad():  # the backbone's output channels, measured
        in_channels = [f.shape[1] for f in backbone.eval()(torch.zeros(1, 3, 64, 64))]
    c = config.neck_channels
    if config.neck == "ghost_pan":
        fpn = GhostPAN(in_channels, c, config.use_depthwise, config.neck_kernel_size, config.expand,
                       config.num_blocks, config.use_res, config.num_extra_level, config.neck_activation)
    else:
        fpn = PAN(in_channels, c, config.neck_activation)
    if config.head == "nanodet_plus":
        head = NanoDetPlusHead(config.num_classes, c, config.head_feat_channels, config.stacked_convs,
                               config.head_kernel_size, config.strides, config.head_conv_type, config.reg_max,
                               config.head_activation)
    else:
        head = NanoDetHead(config.num_classes, c, config.head_feat_channels, config.stacked_convs, config.strides,
                           config.head_conv_type, config.reg_max, config.share_cls_reg, config.head_activation)
    return Detector(backbone, fpn, head).eval()


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    return tuple(_clone(o) for o in out)


def capture(model: nn.Module, x, **forward_kw) -> tuple[torch.Tensor, "OrderedDict[str, torch.Tensor]"]:
    """Run ``model(x, **forward_kw)`` without grad, recording a clone of every module's output.

    Returns ``(output, {name: tensor})``. Names are module paths (``named_modules``), with two
    suffix rules: a module called k > 1 times is recorded as ``<path>.0`` .. ``<path>.<k-1>`` in
    call order (DepthwiseConvModule's ``act``, GhostPAN's ``upsample``), and a tuple output as
    ``<path>.0``, ``<path>.1``, ... (the backbone's stages, the neck's levels). Tensors no module
    returns are added as the modules traced them (``<path>.<name>``, see :func:`_trace`; the
    names of refghost.detector.graph). Clones, because in-place activations and PAN's ``+=``
    overwrite tensors after their hook ran.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x)).to(next(model.parameters()).dtype)
    calls: OrderedDict[str, list] = OrderedDict()
    handles = []

    def hook_for(name):
        def hook(_module, _inputs, output):
            calls.setdefault(name, []).append(_clone(output))
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook_for(name)))
        with torch.no_grad():
            output = model(x, **forward_kw)
    finally:
        for h in handles:
            h.remove()
    captured: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, outs in calls.items():
        if len(outs) > 1:
            captured.update((f"{name}.{k}", out) for k, out in enumerate(outs))
        elif isinstance(outs[0], tuple):
            captured.update((f"{name}.{k}", out) for k, out in enumerate(outs[0]))
        else:
            captured[name] = outs[0]
    for name, module in model.named_modules():
        captured.update((f"{name}.{k}", t) for k, t in getattr(module, "traced", {}).items())
    return output, captured
