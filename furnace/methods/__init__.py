"""Training methods. Each is one module here, `furnace/methods/<name>.py`, defining `METHOD`, a subclass of
`furnace.methods.base.Method`; its name is listed once, in `furnace.settings.METHODS` (what `method=` accepts).

    supervised  the baseline on labeled images (furnace/methods/supervised.py: the smallest example)
    cps         cross pseudo supervision, which trains the teachers
    mgd         multi-granularity distillation of a student from two frozen teachers
"""
import importlib
import logging

from easydict import EasyDict

from furnace.distributed import DistInfo
from furnace.methods.base import Method


def build_method(C: EasyDict, info: DistInfo, log: logging.Logger) -> Method:
    """The method C.method names, for this run."""
    return importlib.import_module(f"furnace.methods.{C.method}").METHOD(C, info, log)
