"""The whole NanoDet detector: backbone, neck, head, decode, NMS.

:mod:`.spec` says which detector (:class:`DetectorConfig`, :data:`PRESETS`, the level sizes of an
input), :mod:`.graph` turns it into a :class:`refghost.arch.Graph` that :mod:`refghost.forward`
executes, and :mod:`.ops` holds the NumPy operations the detector adds to GhostNet's.
:mod:`.decode` is NanoDet's post-processing (priors, integral, boxes, multiclass NMS, boxes back
to the image), :mod:`.run` the chain from images to detections that :func:`refghost.run` uses,
:mod:`.draw` the ``--draw``/``--json`` output and :mod:`.classes` COCO's class names.
"""

from .graph import build_detector_graph
from .spec import PRESETS, DetectorConfig, LevelSize, level_sizes, num_priors

__all__ = ["DetectorConfig", "PRESETS", "LevelSize", "level_sizes", "num_priors", "build_detector_graph"]
