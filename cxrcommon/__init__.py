"""Plumbing shared by every synthcxr stage: image I/O, report text, manifests,
device/precision policy, model loading, the offline CLIP tokenizer and provenance.

It imports no stage; stages import it."""

__version__ = "0.1.0"
