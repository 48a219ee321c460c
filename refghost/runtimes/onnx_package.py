"""Import the ``onnx`` package, or say clearly why it cannot be used.

``onnx`` needs a ``protobuf`` runtime of the major version its generated code was built with
(onnx 1.23: protobuf >= 6.31.1). Other tools can silently install an older one: MNN's converter
wrapper (``mnnconvert``) runs ``pip install -U aliyun-log-python-sdk`` at first use, which
downgraded protobuf 7.36 to 5.29 here, after which ``import onnx`` raises protobuf's
``VersionError`` from deep inside onnx. :func:`import_onnx` turns that into one
:class:`OnnxUnusable` naming both packages, their versions and the fix.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from ..errors import RefghostError


class OnnxUnusable(RefghostError):
    """The ``onnx`` package is missing or broken (typically by an incompatible ``protobuf``)."""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _required_protobuf() -> str:
    try:
        requires = metadata.requires("onnx") or []
    except metadata.PackageNotFoundError:
        return "protobuf"
    spec = next((r.split(";")[0].strip() for r in requires if r.replace(" ", "").startswith("protobuf")), "protobuf")
    return spec.replace(" ", "")


def import_onnx():
    """The ``onnx`` module; :class:`OnnxUnusable` if it is not installed or cannot be imported."""
    try:
        return importlib.import_module("onnx")
    except ModuleNotFoundError as exc:
        if exc.name != "onnx":
            raise _unusable(exc) from None
        raise OnnxUnusable("this needs the Python package 'onnx'; install it with `pip install onnx` "
                           "(or `pip install \"refghost[test]\"` for the pinned versions)") from None
    except Exception as exc:  # protobuf's VersionError, TypeError from old generated code, ...
        raise _unusable(exc) from None


def _unusable(exc: Exception) -> OnnxUnusable:
    need = _required_protobuf()
    return OnnxUnusable(
        f"the installed 'onnx' ({_version('onnx')}) cannot be imported with the installed 'protobuf' "
        f"({_version('protobuf')}); onnx needs {need}: {type(exc).__name__}: {str(exc).splitlines()[0][:300].rstrip('.')}. "
        f"Fix: pip install \"{need}\" (another tool downgraded it: MNN's `mnnconvert` wrapper installs "
        f"aliyun-log-python-sdk at first use; run its converter without the wrapper, see the README)")
