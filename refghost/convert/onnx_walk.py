"""The verifying walk: every layer of a refghost graph checked against the ONNX data flow.

:class:`Walker` goes through a folded refghost graph in forward order, given the ONNX tensor of
each layer (:func:`refghost.runtimes.mapping.map_onnx`): each layer's ONNX producer must be the
right op reading exactly the ONNX tensors of the layer's inputs (``Identity`` nodes are looked
through), and the weights are read on the way. Conv inputs 1 and 2 are the weight and bias (a
missing bias is zeros); a ``BatchNormalization`` kept by the export (``training=PRESERVE``) is
folded here, in float64 with :func:`refghost.ops.fold_batch_norm`, then rounded once to the
graph's precision.

Whatever would make the imported weights describe a different network from the one the graph
computes is a problem, named by layer and ONNX node: an activation or gate pattern that
:mod:`~refghost.convert.onnx_patterns` refuses, an activation that differs from the rest of the
network, ``BatchNormalization`` epsilon != 1e-5 (or in training mode), a ``Conv`` whose kernel,
strides, pads, dilations or groups are not GhostNet's, a ``Concat`` that is not
``[primary, cheap]`` along channels, a residual ``Add`` that is missing or adds the wrong
tensors, a pooling that does not average over H and W, a ``Gemm`` with alpha/beta != 1 or a
transposed input. The walk records every problem and goes on to the next layer.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .. import ops
from ..arch import FINAL_CONV, NUM_STAGES, STAGES, Graph, backbone_activations
from ..errors import WeightsError
from .onnx_graph import OnnxGraph, attribute, is_close
from .onnx_patterns import ACTIVATION_LABELS, classify_activation, classify_gate


class Walker:
    """Checks every layer of a folded refghost graph against the ONNX data flow, and reads weights."""

    def __init__(self, g: OnnxGraph, unfolded: Graph, tensor_of: dict[str, str]):
        self.g = g
        self.tensor_of = tensor_of
        self.bn_names = {n.name for n in unfolded.nodes if n.op == "batch_norm"}
        self.problems: list[str] = []
        self.bn_folded = 0
        self.acts: dict[str, tuple] = {}  # backbone act node -> classify_activation result
        self.unfolded = unfolded

    # -- helpers --------------------------------------------------------------------------
    def t(self, layer: str) -> str:
        return self.tensor_of[layer]

    def problem(self, layer: str, message: str) -> None:
        self.problems.append(f"layer {layer}: {message}")

    def backbone_acts(self) -> list[str]:
        return backbone_activations(self.unfolded.config)

    def classify(self, layer: str):
        if layer not in self.acts:
            node = self.unfolded.node(layer)
            self.acts[layer] = classify_activation(self.g, self.t(node.inputs[0]), self.t(layer))
        return self.acts[layer]

    def majority_activation(self) -> str:
        votes = Counter()
        for layer in self.backbone_acts():
            found = self.classify(layer)
            if not isinstance(found, str):
                votes[found[0]] += 1
        if not votes:
            layer = self.backbone_acts()[0]
            raise WeightsError(f"{self.g.path}: layer {layer}: {self.classify(layer)}")
        (best, n), *rest = votes.most_common()
        if rest and rest[0][1] == n:
            raise WeightsError(f"{self.g.path}: as many activation sites use {best} as {rest[0][0]} ({n} each); "
                               f"GhostNet uses one activation")
        return best

    def out_stages(self) -> tuple[int, ...]:
        stage_of = {self.t(FINAL_CONV.act): NUM_STAGES - 1}
        for s, rows in enumerate(STAGES):
            stage_of.setdefault(self.t(f"blocks.{s}.{len(rows) - 1}"), s)
        stages = []
        for out in self.g.graph.output:
            t = self.g.resolve(out.name)
            if t not in stage_of:
                layer = next((k for k, v in self.tensor_of.items() if v == t), None)
                what = f"layer {layer}" if layer else "no GhostNet layer"
                raise WeightsError(f"{self.g.path}: graph output {out.name!r} is {what}, not a stage output "
                                   f"(the last block of a stage 0..{len(STAGES) - 1}, or {FINAL_CONV.act})")
            stages.append(stage_of[t])
        if len(set(stages)) != len(stages):
            raise WeightsError(f"{self.g.path}: graph outputs repeat a stage ({stages})")
        return tuple(sorted(stages))

    # -- the walk ---------------------------------------------------------------------------
    def walk(self, graph: Graph) -> dict[str, np.ndarray]:
        tensors = {}
        for node in graph.nodes:
            check = getattr(self, f"_check_{node.op}")
            try:
                check(node, graph, tensors)
            except _Skip:
                pass
        return tensors

    def _check_conv(self, node, graph, tensors):
        g = self.g
        t_out = self.t(node.name)
        t_in = self.t(node.inputs[0])
        p = g.producer.get(t_out)
        bn = None
        if p is not None and p.op_type == "BatchNormalization" and node.name in self.bn_names:
            bn = p
            p = g.source(bn.input[0])
        if p is None or p.op_type != "Conv":
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected a Conv{' (+BatchNormalization)' if node.name in self.bn_names else ''}, "
                                    f"the ONNX tensor {t_out!r} comes from {got}")
            raise _Skip
        label = f"Conv {g.label(p)}"
        if g.resolve(p.input[0]) != t_in:
            self.problem(node.name, f"{label} reads {g.resolve(p.input[0])!r}, not the output of "
                                    f"{node.inputs[0]} ({t_in!r})")
        w = g.const(p.input[1])
        expected = graph.param_shapes[node.params["weight"]]
        if tuple(w.shape) != expected:
            self.problem(node.name, f"{label} has weight shape {list(w.shape)}, expected {list(expected)}")
            raise _Skip
        k, s, pad, groups = expected[2], node.attrs["stride"], node.attrs["padding"], node.attrs["groups"]
        auto_pad = attribute(p, "auto_pad", "NOTSET")
        got = {"kernel_shape": list(attribute(p, "kernel_shape", [k, k])),
               "strides": list(attribute(p, "strides", [1, 1])), "pads": list(attribute(p, "pads", [0, 0, 0, 0])),
               "dilations": list(attribute(p, "dilations", [1, 1])), "group": attribute(p, "group", 1)}
        want = {"kernel_shape": [k, k], "strides": [s, s], "pads": [pad] * 4, "dilations": [1, 1], "group": groups}
        if auto_pad not in ("NOTSET", ""):
            self.problem(node.name, f"{label} has auto_pad={auto_pad}; GhostNet pads explicitly by {pad} on every side")
        for attr, value in want.items():
            if got[attr] != value:
                why = " (TF-style SAME padding shifts the windows)" if attr == "pads" else ""
                self.problem(node.name, f"{label} has {attr} {got[attr]}, GhostNet's is {value}{why}")
        b = g.const(p.input[2]) if len(p.input) > 2 and p.input[2] else None
        if len(p.input) > 2 and p.input[2] and b is None:
            self.problem(node.name, f"{label}: its bias is not a constant of the graph")
            raise _Skip
        dtype = np.float64 if w.dtype == np.float64 else np.float32  # float16 weights widen exactly
        if bn is not None:  # folded in float64, rounded once to the graph's precision
            w, b = self._fold(node.name, bn, w, b)
        elif b is None:
            b = np.zeros(expected[0], dtype)
        if tuple(np.shape(b)) != (expected[0],):
            self.problem(node.name, f"{label} has bias shape {list(np.shape(b))}, expected [{expected[0]}]")
            raise _Skip
        tensors[node.params["weight"]] = np.asarray(w, dtype=dtype)
        tensors[node.params["bias"]] = np.asarray(b, dtype=dtype)

    def _fold(self, layer, bn, w, b):
        g = self.g
        label = f"BatchNormalization {g.label(bn)}"
        eps = attribute(bn, "epsilon", 1e-5)
        if not is_close(eps, ops.BN_EPS):
            self.problem(layer, f"{label} has epsilon {eps:.6g}; PyTorch's BatchNorm2d (GhostNet's) uses "
                                f"{ops.BN_EPS:g}")
        if attribute(bn, "training_mode", 0) or len([o for o in bn.output if o]) > 1:
            self.problem(layer, f"{label} is in training mode (batch statistics); export in eval mode")
        values = [g.const(i) for i in bn.input[1:5]]
        if len(values) != 4 or any(v is None for v in values):
            self.problem(layer, f"{label}: scale, bias, mean and variance must be constants of the graph")
            raise _Skip
        gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in values)
        if (var < 0).any():
            self.problem(layer, f"{label} has negative variances")
            raise _Skip
        self.bn_folded += 1
        return ops.fold_batch_norm(np.asarray(w, np.float64), None if b is None else np.asarray(b, np.float64),
                                   gamma, beta, mean, var)

    def _check_act(self, node, graph, tensors):
        name = node.attrs["activation"]
        found = self.classify(node.name) if node.name in self.acts else classify_activation(
            self.g, self.t(node.inputs[0]), self.t(node.name))
        if isinstance(found, str):
            self.problem(node.name, found)
            raise _Skip
        got, slope, onnx_nodes = found
        if got != name:
            first = self.g.label(onnx_nodes[-1])
            if node.name in backbone_activations(self.unfolded.config):
                context = f"the rest of the network uses {ACTIVATION_LABELS.get(name, name)}"
            else:
                context = "the squeeze-excites and the head always use ReLU"
            self.problem(node.name, f"ONNX node {first} computes {ACTIVATION_LABELS.get(got, got)}; {context}")
            raise _Skip
        if name == "PReLU":
            tensors[node.params["weight"]] = slope

    def _check_concat(self, node, graph, tensors):
        g = self.g
        t_out = self.t(node.name)
        p = g.producer.get(t_out)
        if p is not None and p.op_type == "Slice":  # Huawei's out[:, :oup], a no-op here
            if not self._noop_slice(p):
                self.problem(node.name, f"Slice {g.label(p)} drops channels of the concat (GhostNet's "
                                        f"[:, :oup] keeps them all)")
            p = g.source(p.input[0])
        want = [self.t(i) for i in node.inputs]
        if p is None or p.op_type != "Concat":
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected the GhostModule's Concat([primary_conv, cheap_operation]), found {got}")
            raise _Skip
        axis = attribute(p, "axis", None)
        ins = [g.resolve(i) for i in p.input]
        if axis not in (1, -3):
            self.problem(node.name, f"Concat {g.label(p)} joins along axis {axis}, not channels (axis 1)")
        if ins != want:
            if ins == want[::-1]:
                self.problem(node.name, f"Concat {g.label(p)} takes [cheap_operation, primary_conv]; the GhostModule "
                                        f"concatenates [primary_conv, cheap_operation] (channel order)")
            else:
                self.problem(node.name, f"Concat {g.label(p)} takes {ins}, expected the outputs of "
                                        f"{list(node.inputs)} {want}")

    def _noop_slice(self, p) -> bool:
        g = self.g
        starts, ends = g.const(p.input[1]), g.const(p.input[2])
        axes = g.const(p.input[3]) if len(p.input) > 3 and p.input[3] else None
        steps = g.const(p.input[4]) if len(p.input) > 4 and p.input[4] else None
        if starts is None or ends is None:
            return False
        starts, ends = np.atleast_1d(starts), np.atleast_1d(ends)
        axes = np.arange(len(starts)) if axes is None else np.atleast_1d(axes)
        steps = np.ones_like(starts) if steps is None else np.atleast_1d(steps)
        for a, s, e, st in zip(axes, starts, ends, steps):
            if st != 1 or s != 0:
                return False
            if a in (1, -3) and e < self._concat_channels(p):  # keeps fewer channels than the concat has
                return False
        return True

    def _concat_channels(self, p) -> int:
        concat = self.g.source(p.input[0])
        total = 0
        for t in concat.input if concat is not None else ():
            prod = self.g.source(t)
            while prod is not None and prod.op_type != "Conv":
                prod = self.g.source(prod.input[0])
            if prod is None:
                return 1 << 62
            total += self.g.const(prod.input[1]).shape[0]
        return total

    def _check_add(self, node, graph, tensors):
        g = self.g
        t_out = self.tensor_of[node.name]
        p = g.producer.get(t_out)
        want = sorted(self.t(i) for i in node.inputs)
        if p is None or p.op_type not in ("Add", "Sum"):
            passed = [x for x in node.inputs if self.t(x) == t_out]
            if passed:
                via = self._identity_label(node.name)
                self.problem(node.name, f"the residual Add is missing: the block's output is {passed[0]}'s output "
                                        f"passed on{via} without adding the shortcut")
            else:
                got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
                self.problem(node.name, f"expected the residual Add, found {got}")
            raise _Skip
        ins = sorted(g.resolve(i) for i in p.input)
        if ins != want:
            self.problem(node.name, f"{p.op_type} {g.label(p)} adds {ins}, expected the outputs of "
                                    f"{list(node.inputs)} {want} (ghost2 and the shortcut)")

    def _identity_label(self, layer: str) -> str:
        """' by Identity node X' when the mapped ONNX tensor of ``layer`` came through Identity nodes."""
        for onnx_name in self._raw_tensors(layer):
            hops = self.g.identities(onnx_name)
            if hops:
                return " by " + ", ".join(f"Identity node {self.g.label(h)}" for h in hops)
        return ""

    def _raw_tensors(self, layer: str) -> list[str]:
        return [t for t, p in self.g.producer.items() if self.g.resolve(t) == self.t(layer) and t != self.t(layer)]

    def _check_global_avg_pool(self, node, graph, tensors):
        g = self.g
        p = g.producer.get(self.t(node.name))
        t_in = self.t(node.inputs[0])
        ok = p is not None and g.resolve(p.input[0]) == t_in
        if ok and p.op_type == "ReduceMean":
            axes = g.const(p.input[1]) if len(p.input) > 1 and p.input[1] else attribute(p, "axes")
            axes = sorted(int(a) % 4 for a in np.atleast_1d(axes)) if axes is not None else None
            ok = axes == [2, 3] and attribute(p, "keepdims", 1) == 1
        elif ok:
            ok = p.op_type == "GlobalAveragePool"
        if not ok:
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected the mean over H and W of {node.inputs[0]} (GlobalAveragePool or "
                                    f"ReduceMean(axes=[2, 3], keepdims=1)), found {got}")

    def _check_hard_sigmoid(self, node, graph, tensors):
        found = classify_gate(self.g, self.t(node.inputs[0]), self.t(node.name))
        if isinstance(found, str):
            self.problem(node.name, found)

    def _check_scale(self, node, graph, tensors):
        g = self.g
        p = g.producer.get(self.t(node.name))
        want = sorted(self.t(i) for i in node.inputs)
        if p is None or p.op_type != "Mul" or sorted(g.resolve(i) for i in p.input) != want:
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected the SE's Mul(x, gate) of {list(node.inputs)}, found {got}")

    def _check_linear(self, node, graph, tensors):
        g = self.g
        t_in = self.t(node.inputs[0])
        p = g.producer.get(self.t(node.name))
        if p is not None and p.op_type == "Add":  # MatMul + Add
            sources = [g.source(i) for i in p.input]
            mm = next((n for n in sources if n is not None and n.op_type == "MatMul"), None)
            bias = next((g.const(i) for i in p.input if g.const(i) is not None), None)
            if mm is None or bias is None:
                self.problem(node.name, f"expected Gemm or MatMul + Add, found Add {g.label(p)}")
                raise _Skip
            w = g.const(mm.input[1])
            if w is None:
                self.problem(node.name, f"MatMul {g.label(mm)}: its weight is not a constant")
                raise _Skip
            w, first = w.T, mm
        elif p is not None and p.op_type == "Gemm":
            w, bias, first = g.const(p.input[1]), (g.const(p.input[2]) if len(p.input) > 2 and p.input[2] else None), p
            if w is None:
                self.problem(node.name, f"Gemm {g.label(p)}: its weight is not a constant")
                raise _Skip
            alpha, beta = attribute(p, "alpha", 1.0), attribute(p, "beta", 1.0)
            if not (is_close(alpha, 1.0) and (bias is None or is_close(beta, 1.0))) or attribute(p, "transA", 0):
                self.problem(node.name, f"Gemm {g.label(p)} has alpha={alpha}, beta={beta}, "
                                        f"transA={attribute(p, 'transA', 0)}; a Linear layer is alpha=beta=1, transA=0")
            if not attribute(p, "transB", 0):
                w = w.T
        else:
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected the classifier (Gemm, or MatMul + Add), found {got}")
            raise _Skip
        # the input: act2's output through Flatten/Reshape/Squeeze only
        src = g.resolve(first.input[0])
        while src != t_in and src in g.producer and g.producer[src].op_type in ("Flatten", "Reshape", "Squeeze"):
            src = g.resolve(g.producer[src].input[0])
        if src != t_in:
            self.problem(node.name, f"{first.op_type} {g.label(first)} does not read the flattened output of "
                                    f"{node.inputs[0]}")
        expected = graph.param_shapes[node.params["weight"]]
        if bias is None:
            bias = np.zeros(expected[0], w.dtype)
        bias = np.asarray(bias).reshape(-1)
        if tuple(w.shape) != expected or bias.shape != (expected[0],):
            self.problem(node.name, f"classifier weight {list(w.shape)} / bias {list(bias.shape)}, expected "
                                    f"{list(expected)} / [{expected[0]}]")
            raise _Skip
        dtype = np.float64 if w.dtype == np.float64 else np.float32
        tensors[node.params["weight"]] = np.ascontiguousarray(w, dtype=dtype)
        tensors[node.params["bias"]] = np.asarray(bias, dtype=dtype)


class _Skip(Exception):
    """A layer that cannot be checked further (its problem is recorded)."""
