"""The one error type refghost raises for bad input, and its subclasses.

Every problem with something a user hands to refghost (a weights file, an image, a checkpoint,
a command-line argument) raises a :class:`RefghostError` whose message names the problem: the
file, the key, the expected and the found shape. The CLI prints the message and exits 2.
"""


class RefghostError(Exception):
    """Bad input to refghost: the message says what is wrong and where."""


class WeightsError(RefghostError):
    """A weights file (or checkpoint) that cannot be used: unreadable, wrong schema, bad keys."""


class ImageError(RefghostError):
    """An image that cannot be used: unreadable file, wrong shape, dtype or channel count, NaN."""


class GoldenError(RefghostError):
    """A golden file that cannot be used: unreadable, wrong format or version, inconsistent."""


class CompareError(RefghostError):
    """Nothing comparable: no tensor in common, an unreadable candidate, a mismatched input."""


class IsolationError(RefghostError):
    """A call run in a child process (:func:`refghost.isolate.call_isolated`) that crashed, hung
    past its time limit, ran out of memory or raised a library's own exception: the message says
    which library, doing what, and how it ended."""
