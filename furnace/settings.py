"""The type and range of every setting of `furnace.config.new_config`, checked before anything is read.

`RULES` maps each key to a check (a function of the value returning an error text, or None when the value is
fine). `check_settings(C)` applies them all and raises one ValueError naming every bad setting, with where
its value came from when known (a --cfg line, a command-line override). Every key
of `new_config` must have a rule: tests/test_run.py fails on a key without one.
"""
import numbers
from typing import Callable, Dict, Optional

# This loads torch; furnace.config stays light by importing this module only in resolve(), when new_config
# has loaded torch already (furnace.data).
from furnace.models import NETWORKS

Check = Callable[[object], Optional[str]]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer(lo: Optional[int] = None, hi: Optional[int] = None) -> Check:
    def check(v):
        if not _is_int(v):
            return "must be an integer"
        if lo is not None and v < lo:
            return f"must be >= {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None
    return check


def number(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False) -> Check:
    def check(v):
        if not _is_num(v) or v != v:  # not NaN either
            return "must be a number"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None
    return check


def one_of(*choices) -> Check:
    return lambda v: None if (isinstance(v, str) or v is None) and v in choices else f"must be one of {choices}"


def boolean(v) -> Optional[str]:
    return None if isinstance(v, bool) else "must be True or False"


def text(v) -> Optional[str]:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string (a path or a name)"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def size(v) -> Optional[str]:
    """A crop size: a positive int, or (height, width) of positive ints."""
    if _is_int(v):
        return None if v > 0 else "must be a positive integer or [height, width]"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v):
        return None
    return "must be a positive integer or [height, width] of positive integers"


def numbers_list(length: Optional[int] = None, positive: bool = False) -> Check:
    def check(v):
        if not isinstance(v, (list, tuple)) or not v or not all(_is_num(x) for x in v):
            return "must be a non-empty list of numbers"
        if length is not None and len(v) != length:
            return f"must be a list of {length} numbers"
        if positive and not all(x > 0 for x in v):
            return "must hold numbers > 0"
        return None
    return check


def names_list(v) -> Optional[str]:
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return None
    return "must be a list of strings"


def palette(v) -> Optional[str]:
    if isinstance(v, (list, tuple)) and v and all(
            isinstance(c, (list, tuple)) and len(c) == 3 and all(_is_int(x) and 0 <= x <= 255 for x in c) for c in v):
        return None
    return "must be a list of [R, G, B] colours with values 0..255"


# The training methods, each a module furnace/methods/<name>.py (furnace.methods): the one list of their names.
METHODS = ("supervised", "cps", "mgd")

RULES: Dict[str, Check] = {
    "exp_name": text, "exp_dir": text, "seed": integer(0, 2 ** 63 - 1),
    # data
    "dataset": one_of("voc", "cityscapes", "custom"), "data_root": text, "train_list": text, "labeled_list": text,
    "unlabeled_list": text, "val_list": text, "num_classes": optional(integer(2, 254)), "class_names": optional(names_list),
    "palette": optional(palette),  # (custom datasets: None there is read from the data root)
    "crop_size": size, "partition": integer(1), "train_scales": numbers_list(positive=True),
    "image_mean": numbers_list(3), "image_std": numbers_list(3, positive=True), "num_workers": integer(0),
    # network and method
    "network": one_of(*NETWORKS), "pretrained": optional(text), "zero_init_residual": boolean,
    "output_stride": lambda v: None if _is_int(v) and v in (8, 16, 32) else "must be 8, 16 or 32",
    "method": lambda v: one_of(*METHODS)(v), "teacher_deep": optional(text), "teacher_wide": optional(text),
    "teacher_deep_network": one_of(*NETWORKS), "teacher_wide_network": one_of(*NETWORKS),
    "teacher_bn": optional(one_of("eval", "train")), "teacher_precision": one_of("auto", "amp", "int8"),
    "teacher_int8_min_agreement": number(0, 1), "teacher_calibration_images": integer(1),
    "teacher_check_images": integer(1), "teacher_labels": optional(one_of("online", "offline")),
    "teacher_label_dir": optional(text),
    # how the step is computed (`setting`; None in the keys it sets: the setting's value)
    "setting": one_of("published", "fast"), "gpu_batch": integer(1),
    "network_calls": optional(one_of("separate", "joint")), "student_bn_calls": boolean,
    "cutmix_overlap": optional(one_of("toggle", "union")),
    "loss_scope": optional(one_of("per_gpu", "global")),
    # loss weights
    "sup_weight": number(0), "cps_weight": number(0), "pixel_unlabeled_weight": number(0),
    "pixel_labeled_weight": number(0), "semantic_weight": number(0),
    "region_weight": number(0), "region_grid": integer(1), "ohem": boolean, "ohem_thresh": number(0, 1, lo_open=True),
    "ohem_min_kept": integer(0),
    # optimisation
    "batch_size": integer(1), "accum_steps": integer(1), "lr": number(0, lo_open=True), "momentum": number(0, 1, hi_open=True),
    "weight_decay": number(0), "lr_power": number(0), "warmup_iters": integer(0), "epochs": integer(1),
    "iters_per_epoch": optional(integer(1)), "amp": optional(one_of("auto", "off", "bf16", "fp16")),
    "channels_last": boolean, "device": one_of("auto", "cpu", "cuda"),
    # checkpoints and logs
    "output_dir": text, "save_every": integer(1), "save_every_iters": integer(0), "log_every": integer(1),
    # evaluation
    "eval_mode": one_of("sliding", "whole"), "eval_crop_size": size,
    "eval_stride_rate": number(0, 1, lo_open=True), "eval_scales": numbers_list(positive=True), "eval_flip": boolean,
    # validation during training
    "val_every": optional(integer(0)), "val_images": optional(integer(1)),
}


def check_settings(C, origins: Optional[Dict[str, str]] = None) -> None:
    """Raise ValueError naming every setting of C whose type or range is wrong (or that has no rule)."""
    origins = origins or {}
    errors = []
    for key, value in C.items():
        rule = RULES.get(key)
        problem = rule(value) if rule is not None else None
        if problem:
            where = f" (from {origins[key]})" if key in origins else ""
            errors.append(f"{key}={value!r} {problem}{where}")
    if errors:
        raise ValueError("config: " + "; ".join(errors))
