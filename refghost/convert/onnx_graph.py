"""An ONNX graph read for import: its nodes, producers, consumers, constants and attributes.

:class:`OnnxGraph` indexes a loaded ``onnx.ModelProto`` (producer and consumers of every tensor,
constants from initializers, ``Constant`` nodes and ``Identity`` chains); :func:`load_onnx_graph`
reads a file into one. :func:`attribute`, :func:`is_close` and :func:`scalar` read node
attributes and constant values the way the pattern and layer checks compare them.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import WeightsError

#: float32 tolerance when comparing constants read from the graph with the expected ones.
CONSTANT_RTOL = 1e-6


class OnnxGraph:
    """An ONNX graph with its producers, consumers and constants at hand."""

    def __init__(self, model, path: str):
        self.path = path
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.nodes = list(self.graph.node)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self._consts: dict[str, np.ndarray | None] = {}

    def label(self, node) -> str:
        """How messages name an ONNX node: its name, or its position and op type."""
        return repr(node.name) if node.name else f"#{self.index[id(node)]} ({node.op_type}, unnamed)"

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node, through Identity), or None."""
        if not name:
            return None
        if name in self._consts:
            return self._consts[name]
        from onnx import numpy_helper

        value = None
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name])
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant":
                value = _constant_value(node)
            elif node is not None and node.op_type == "Identity":
                value = self.const(node.input[0])
        self._consts[name] = value
        return value

    def resolve(self, name: str) -> str:
        """The tensor an Identity chain forwards (``name`` itself if its producer is no Identity)."""
        seen = 0
        while name in self.producer and self.producer[name].op_type == "Identity" and seen < 1000:
            name = self.producer[name].input[0]
            seen += 1
        return name

    def identities(self, name: str) -> list:
        """The Identity nodes between ``name`` and :meth:`resolve` of it."""
        found = []
        while name in self.producer and self.producer[name].op_type == "Identity" and len(found) < 1000:
            found.append(self.producer[name])
            name = self.producer[name].input[0]
        return found

    def source(self, name: str):
        """The node producing ``resolve(name)``, or None for a graph input or a constant."""
        return self.producer.get(self.resolve(name))


def load_onnx_graph(path: str) -> OnnxGraph:
    """The ONNX model at ``path``, indexed. Raises WeightsError for a missing or unreadable file."""
    from ..runtimes.onnx_package import import_onnx

    onnx = import_onnx()
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path)
    except Exception as exc:  # DecodeError and friends
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: not a readable ONNX model ({reason})") from None
    return OnnxGraph(model, path)


def _constant_value(node) -> np.ndarray | None:
    from onnx import helper, numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            v = helper.get_attribute_value(a)
            return np.asarray(v, dtype=np.float32 if "float" in a.name else np.int64)
    return None


def attribute(node, name, default=None):
    """The value of attribute ``name`` of an ONNX node (strings decoded), or ``default``."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def is_close(value, expected) -> bool:
    """Whether a constant read from the graph is ``expected``, to float32 precision (:data:`CONSTANT_RTOL`)."""
    return value is not None and abs(float(value) - expected) <= CONSTANT_RTOL * max(1.0, abs(expected))


def scalar(array) -> float | None:
    """A constant holding one value (any shape), as a float; else None."""
    if array is None or np.size(array) != 1:
        return None
    return float(np.asarray(array).reshape(()))

