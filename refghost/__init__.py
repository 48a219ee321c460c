"""refghost: reference implementation and verifier for GhostNet (NanoDet backbone)."""

__version__ = "0.1.0"
