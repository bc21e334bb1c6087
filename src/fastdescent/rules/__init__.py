"""Functional faces of the update rules: validate, then call the chosen backend."""

from .sgd import sgd_step

__all__ = ["sgd_step"]
