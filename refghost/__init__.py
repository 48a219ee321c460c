"""refghost: reference implementation and verifier for GhostNet, the NanoDet backbone.

>>> import refghost
>>> w = refghost.load_weights("weights/ghostnet_nanodet_1.0x.h5")
>>> out = refghost.run(image, w)           # {"blocks.4": ..., "blocks.6": ..., "blocks.9": ...}
"""

from .arch import Config, build_graph
from .errors import ImageError, RefghostError, WeightsError
from .runner import run
from .weights import Weights, load_weights, save_weights

__version__ = "0.1.0"

__all__ = ["run", "load_weights", "save_weights", "Weights", "Config", "build_graph",
           "RefghostError", "WeightsError", "ImageError", "__version__"]
