"""Recognising the graph: a GhostNet :class:`~refghost.arch.Graph` and its weights as a list of ops
on tensors (no buffers yet), with BatchNorm folded into each conv's weights and bias in float64.

The walk follows the blocks of :func:`refghost.arch.blocks` and checks every node it takes (op, inputs,
shapes); a graph it does not expect raises :class:`EngineUnsupported` (the interpreter runs it).
Activations with a fused epilogue get their code (:mod:`refghost.kernels.epilogue`); others are
kept by name and run as a separate elementwise pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import ops
from ..arch import FINAL_CONV, HEAD, STEM, Bottleneck, Graph, SqueezeExcite, blocks, ghost_module_parts
from ..kernels.epilogue import ACT_LEAKY, ACT_NONE, ACT_RELU, ACT_RELU6

#: Activations with a fused epilogue, by code.
_FAST_ACTS = {"Identity": ACT_NONE, "ReLU": ACT_RELU, "LeakyReLU": ACT_LEAKY, "PReLU": ACT_LEAKY, "ReLU6": ACT_RELU6}
#: Ghost modules (without residual) on planes of at least this many pixels run the primary 1x1
#: conv and its 3x3 depthwise as one op, by bands of rows (:mod:`.ghost`): the depthwise reads
#: the primary half back from cache, straight from the buffer (no padded copy, no accumulator
#: pass); the same bits as the two ops. 10-20% faster on the 160x160 and 80x80 ghost1 modules.
GHOST_FUSE_MIN_PLANE = 6400
#: No activation (the fields of :meth:`Recogniser.activation`).
NO_ACT = dict(code=ACT_NONE, slope=0.0, generic=None, weight=None)


class EngineUnsupported(Exception):
    """The engine cannot run this graph (the interpreter can)."""


@dataclass
class Tensor:
    """A tensor of ``c`` channels with ``h x w`` planes; ``slot``: its buffer (:mod:`.lower`)."""

    name: str
    c: int
    h: int
    w: int
    slot: int = -1

    @property
    def p(self):
        return self.h * self.w


@dataclass
class Op:
    """An op of ``kind`` reading and writing tensors, with its parameters (float64) in ``args``."""

    kind: str
    reads: tuple
    writes: tuple
    args: dict = field(default_factory=dict)


def _f64(tensors, key):
    """Tensor ``key`` of the weights in float64 (folding is done in float64)."""
    return np.asarray(tensors[key], dtype=np.float64)


class Recogniser:
    """Walks the graph block by block and emits ops on tensors (no buffers yet)."""

    def __init__(self, graph: Graph, tensors):
        self.graph = graph
        self.tensors = tensors
        self.nodes = {node.name: node for node in graph.nodes}
        self.used = set()
        self.ops: list[Op] = []
        self.count = 0

    def node(self, name, op=None):
        node = self.nodes.get(name)
        if node is None or (op is not None and node.op != op):
            raise EngineUnsupported(f"expected node {name!r} ({op})")
        self.used.add(name)
        return node

    def new(self, c, h, w, name=""):
        self.count += 1
        return Tensor(name or f"t{self.count}", c, h, w)

    def emit(self, kind, reads, writes, **args):
        self.ops.append(Op(kind, tuple(reads), tuple(writes), args))

    # --- parameters
    def folded(self, conv_name, bn_name):
        """(W, b) in float64 of conv ``conv_name`` with BatchNorm ``bn_name`` folded in."""
        conv = self.node(conv_name, "conv")
        bn = self.node(bn_name, "batch_norm")
        if bn.inputs != (conv_name,):
            raise EngineUnsupported(f"{bn_name} does not follow {conv_name}")
        t = self.tensors
        w = _f64(t, conv.params["weight"])
        b = _f64(t, conv.params["bias"]) if "bias" in conv.params else np.zeros(w.shape[0])
        bn_params = (_f64(t, bn.params[r]) for r in ("weight", "bias", "running_mean", "running_var"))
        return (*ops.fold_batch_norm(w, b, *bn_params, eps=bn.attrs.get("eps", ops.BN_EPS)), conv.attrs)

    def activation(self, name):
        """(code, slope, generic name or None, generic weight) of activation node ``name``."""
        node = self.node(name, "act")
        act = node.attrs["activation"]
        weight = None
        if act == "PReLU":
            weight = _f64(self.tensors, node.params["weight"])
        if act in _FAST_ACTS:
            slope = ops.LEAKY_RELU_SLOPE if act == "LeakyReLU" else (float(weight.reshape(())) if act == "PReLU"
                                                                     else 0.0)
            return dict(code=_FAST_ACTS[act], slope=slope, generic=None, weight=None)
        return dict(NO_ACT, generic=act, weight=weight)

    # --- ops
    def conv1x1(self, x: Tensor, w, b, out: Tensor, row0=0, act=None):
        o, c = w.shape[0], w.shape[1]
        if w.shape[2:] != (1, 1) or c != x.c:
            raise EngineUnsupported("conv1x1 shape")
        wb = np.concatenate([b[:, None], w.reshape(o, c)], axis=1)
        act = act or NO_ACT
        self.emit("gemm", [x], [out], w=wb, row0=row0, **act)

    def depthwise(self, src, s_row0, dst, d_row0, w, b, attrs, act=None, res=None, res_row0=0, pre_row0=-1):
        c, _, k, k2 = w.shape
        if k != k2 or attrs["groups"] != c:
            raise EngineUnsupported("depthwise shape")
        act = act or NO_ACT
        reads = [src] + ([res] if res is not None else [])
        self.emit("dw", reads, [dst], src=src, s_row0=s_row0, dst=dst, d_row0=d_row0, nch=c, w=w.reshape(c, k * k),
                  b=b, k=k, s=attrs["stride"], p=attrs["padding"], res=res, res_row0=res_row0, pre_row0=pre_row0,
                  **act)

    def ghost(self, name, x: Tensor, residual=None, *, activated):
        """A GhostModule (``activated``: an activation after each half, as in a block's ghost1),
        with the block's residual fused when ``residual`` is given."""
        primary, cheap = ghost_module_parts(name, activated)
        wp, bp, attrs = self.folded(primary.conv, primary.bn)
        if attrs["stride"] != 1 or attrs["groups"] != 1 or attrs["padding"] != 0:
            raise EngineUnsupported(f"{primary.conv} is not a 1x1 conv")
        init = wp.shape[0]
        act_p = self.activation(primary.act) if primary.act else None
        wc, bc, cattrs = self.folded(cheap.conv, cheap.bn)
        if wc.shape[0] != init or cattrs["stride"] != 1:
            raise EngineUnsupported(f"{cheap.conv} shape")
        act_c = self.activation(cheap.act) if cheap.act else None
        concat = self.node(name, "concat")
        if len(concat.inputs) != 2:
            raise EngineUnsupported(f"{name} concat")
        g = self.new(2 * init, x.h, x.w, name)
        ap, ac = act_p or NO_ACT, act_c or NO_ACT
        if (residual is None and x.p >= GHOST_FUSE_MIN_PLANE and wc.shape[2:] == (3, 3)
                and cattrs["groups"] == init and cattrs["padding"] == 1 and ap["generic"] is None
                and ac["generic"] is None
                and (ap["code"] != ACT_LEAKY or ac["code"] != ACT_LEAKY or ap["slope"] == ac["slope"])):
            slope = ap["slope"] if ap["code"] == ACT_LEAKY else ac["slope"]
            wb = np.concatenate([bp[:, None], wp.reshape(init, x.c)], axis=1)
            self.emit("ghost", [x], [g], w=wb, wdw=wc.reshape(init, 9), bdw=bc, act1=ap["code"], act2=ac["code"],
                      slope=slope, act_p=ap, act_c=ac)
            return g
        self.conv1x1(x, wp, bp, g, 0, act_p)
        if residual is None:
            self.depthwise(g, 0, g, init, wc, bc, cattrs, act_c)
        else:
            if act_p is not None or act_c is not None or residual.c != 2 * init:
                raise EngineUnsupported(f"{name}: residual with activation or channel mismatch")
            self.depthwise(g, 0, g, init, wc, bc, cattrs, None, residual, init, 0)
        return g

    def squeeze_excite(self, name, x: Tensor):
        se = SqueezeExcite(name)
        self.node(se.avg_pool, "global_avg_pool")
        reduce_ = self.node(se.conv_reduce, "conv")
        act = self.node(se.act, "act")
        expand = self.node(se.conv_expand, "conv")
        self.node(se.gate, "hard_sigmoid")
        self.node(name, "scale")
        if act.attrs["activation"] != "ReLU":
            raise EngineUnsupported(f"{name}: SE activation {act.attrs['activation']}")
        t = self.tensors
        wr = _f64(t, reduce_.params["weight"])
        we = _f64(t, expand.params["weight"])
        r = wr.shape[0]
        if wr.shape != (r, x.c, 1, 1) or we.shape != (x.c, r, 1, 1):
            raise EngineUnsupported(f"{name}: SE shapes")
        self.emit("se", [x], [x], x=x, wr_t=wr.reshape(r, x.c).T, br=_f64(t, reduce_.params["bias"]),
                  we_t=we.reshape(x.c, r).T, be=_f64(t, expand.params["bias"]))

    def bottleneck(self, block: Bottleneck, x: Tensor):
        """A GhostBottleneck, its parts as :mod:`refghost.arch` lists them."""
        add = self.node(block.name, "add")
        g1 = self.ghost(block.ghost1, x, activated=True)
        y = g1
        if block.conv_dw:
            w, b, attrs = self.folded(block.conv_dw, block.bn_dw)
            s = attrs["stride"]
            k = w.shape[2]
            ho = ops.conv_output_size(y.h, k, s, attrs["padding"])
            wo = ops.conv_output_size(y.w, k, s, attrs["padding"])
            d = self.new(y.c, ho, wo, block.bn_dw)
            self.depthwise(y, 0, d, 0, w, b, attrs)
            y = d
        if block.se:
            self.squeeze_excite(block.se, y)
        if block.shortcut_parts:
            dw, pw = block.shortcut_parts
            w, b, attrs = self.folded(dw.conv, dw.bn)
            k, st, pad = w.shape[2], attrs["stride"], attrs["padding"]
            sd = self.new(x.c, ops.conv_output_size(x.h, k, st, pad), ops.conv_output_size(x.w, k, st, pad), dw.bn)
            self.depthwise(x, 0, sd, 0, w, b, attrs)
            w2, b2, attrs2 = self.folded(pw.conv, pw.bn)
            if attrs2["stride"] != 1 or attrs2["groups"] != 1:
                raise EngineUnsupported(f"{pw.conv} is not a 1x1 conv")
            residual = self.new(w2.shape[0], sd.h, sd.w, pw.bn)
            self.conv1x1(sd, w2, b2, residual)
        else:
            residual = x
        if add.inputs != (block.ghost2, residual.name):
            raise EngineUnsupported(f"{block.name}: unexpected add inputs {add.inputs}")
        if (residual.h, residual.w) != (y.h, y.w):
            raise EngineUnsupported(f"{block.name}: residual shape")
        g2 = self.ghost(block.ghost2, y, residual, activated=False)
        g2.name = block.name
        return g2

    def build(self, h, w):
        graph = self.graph
        # stem: dense KxK conv as im2col + GEMM
        ws, bs, attrs = self.folded(STEM.conv, STEM.bn)
        if attrs["groups"] != 1:
            raise EngineUnsupported("stem")
        k, s, p = ws.shape[2], attrs["stride"], attrs["padding"]
        ho, wo = ops.conv_output_size(h, k, s, p), ops.conv_output_size(w, k, s, p)
        if ho < 1 or wo < 1:
            raise EngineUnsupported("input smaller than the stem kernel")
        x = self.new(ws.shape[0], ho, wo, STEM.act)
        wsb = np.concatenate([bs[:, None], ws.reshape(ws.shape[0], -1)], axis=1)
        act = self.activation(STEM.act)
        self.emit("stem", [], [x], w=wsb, k=k, s=s, p=p, **act)
        produced = {STEM.act: x}
        for block in blocks(graph.config):
            x = self.bottleneck(block, x)
            produced[block.name] = x
        wl, bl, attrs = self.folded(FINAL_CONV.conv, FINAL_CONV.bn)
        if attrs["stride"] != 1 or wl.shape[2:] != (1, 1):
            raise EngineUnsupported("final conv")
        y = self.new(wl.shape[0], x.h, x.w, FINAL_CONV.act)
        self.conv1x1(x, wl, bl, y, 0, self.activation(FINAL_CONV.act))
        produced[FINAL_CONV.act] = y
        outputs = {}
        for out_name, node_name in graph.outputs.items():
            if node_name in produced:
                outputs[out_name] = produced[node_name]
            elif node_name != HEAD.classifier:
                raise EngineUnsupported(f"output {out_name} from {node_name}")
        if HEAD.classifier in graph.outputs.values():
            self.node(HEAD.pool, "global_avg_pool")
            head = self.node(HEAD.conv, "conv")
            act2 = self.node(HEAD.act, "act")
            cls = self.node(HEAD.classifier, "linear")
            if act2.attrs["activation"] != "ReLU":
                raise EngineUnsupported(HEAD.act)
            t = self.tensors
            wh = _f64(t, head.params["weight"])
            self.emit("classifier", [y], [], x=y, wh=wh.reshape(wh.shape[0], -1), bh=_f64(t, head.params["bias"]),
                      wc=_f64(t, cls.params["weight"]), bc=_f64(t, cls.params["bias"]),
                      name=[k for k, v in graph.outputs.items() if v == HEAD.classifier][0])
        for out_name, tensor in outputs.items():
            self.emit("output", [tensor], [], x=tensor, name=out_name)
        unused = set(self.nodes) - self.used
        if unused:
            raise EngineUnsupported(f"nodes the engine does not handle: {sorted(unused)[:3]}")
        # outputs must be copied right after their producer (their buffer may be reused later)
        self._move_outputs_to_producers()

    def _move_outputs_to_producers(self):
        outs = [op for op in self.ops if op.kind == "output"]
        body = [op for op in self.ops if op.kind != "output"]
        for out in outs:
            t = out.args["x"]
            last_write = max(i for i, op in enumerate(body) if any(w is t for w in op.writes))
            body.insert(last_write + 1, out)
        self.ops = body

