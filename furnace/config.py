"""Experiment configuration: defaults per dataset, overrides, and the values derived from them.

An experiment folder's `config.py` starts from `new_config(dataset, __file__)` and sets what differs.
At launch, `resolve(C, overrides)` applies, in this order (later wins):
  1. files given with `--cfg FILE` (lines `key = value`, '#' comments),
  2. command-line `key=value` pairs (e.g. `python train.py lr=0.01 epochs=2`).
No environment variable sets a key, so a run's settings do not depend on the shell it starts from.
Values are Python literals where they parse as one (`0.01`, `[0.5, 1.0]`, `None`), strings otherwise.
An unknown key is an error naming where it came from. String values may use the placeholders
{root} (repository), {exp_dir}, {exp_name}, {method}, {data_root}, {partition}, {output_dir}, and in output_dir
{run}: the run's name, `<method>` for the experiment's own settings and `<method>-<overrides>-<hash>` for a
variant (furnace/run.py), so that each run has its own folder.
"""
import argparse
import ast
import numbers
import os
import os.path as osp
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from easydict import EasyDict

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

AMP_MODES = ("auto", "off", "bf16", "fp16")
TEACHER_PRECISIONS = ("auto", "amp", "int8")

# `setting` chooses, in one switch, how a run computes its step (README, "Faithfulness to the paper").
# 'published': the update of the published code for its per-GPU batch, on any number of processes.
# 'fast': the project's faster choices. Each key below can still be set on its own (ablations); a key left
# at None takes the setting's value.
SETTINGS = {
    "published": dict(teacher_bn="train", teacher_labels="online", network_calls="separate",
                      cutmix_overlap="toggle", loss_scope="per_gpu", amp="off"),
    "fast": dict(teacher_bn="eval", teacher_labels="offline", network_calls="joint",
                 cutmix_overlap="union", loss_scope="global", amp="auto"),
}


def new_config(dataset: str, exp_file: str) -> EasyDict:
    """Defaults shared by every experiment on `dataset` ('voc', 'cityscapes' or 'custom': your own folder,
    furnace/data/custom.py, whose num_classes, class_names and palette are read from the data root when the
    config is resolved, so that they follow a data_root override)."""
    from furnace.data import CITYSCAPES_CLASS_NAMES, VOC_CLASS_NAMES

    exp_dir = osp.dirname(osp.abspath(exp_file))
    C = EasyDict()
    C.exp_name = osp.basename(exp_dir)
    C.exp_dir = exp_dir
    C.seed = 12345

    # data: per dataset its folder, training list, classes and training crop. custom: num_classes and
    # class_names None = from {data_root}/classes.txt (a value given must agree with it); palette, the colours
    # of the predictions, None = {data_root}/palette.txt if there is one.
    per_dataset = {
        "voc": dict(data_root="{root}/DATA/pascal_voc", train_list="{data_root}/lists/train_aug.txt",
                    num_classes=21, class_names=VOC_CLASS_NAMES, crop_size=512),
        "cityscapes": dict(data_root="{root}/DATA/city", train_list="{data_root}/lists/train.txt",
                           num_classes=19, class_names=CITYSCAPES_CLASS_NAMES, crop_size=800),
        "custom": dict(data_root="{root}/DATA/custom", train_list="{data_root}/lists/train.txt",
                       num_classes=None, class_names=None, palette=None, crop_size=512),
    }
    if dataset not in per_dataset:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {tuple(per_dataset)}")
    C.dataset = dataset
    C.update(per_dataset[dataset])
    C.partition = 8                    # 1/partition of the training list is labeled
    C.labeled_list = "{data_root}/lists/labeled_1-{partition}.txt"
    C.unlabeled_list = "{data_root}/lists/unlabeled_1-{partition}.txt"
    C.val_list = "{data_root}/lists/val.txt"
    C.train_scales = [0.5, 0.75, 1.0, 1.5, 1.75, 2.0]
    C.image_mean = [0.485, 0.456, 0.406]
    C.image_std = [0.229, 0.224, 0.225]
    C.num_workers = 4

    # network and method
    C.network = "resnet18"
    C.pretrained = None                # ImageNet weights file (torchvision or timm format), or None
    C.zero_init_residual = False       # from scratch only: each ResNet block starts as the identity (toy runs)
    C.output_stride = 16
    C.method = "mgd"
    C.teacher_deep = None              # checkpoint of the deep teacher (CPS branch 1)
    C.teacher_wide = None              # checkpoint of the wide teacher (CPS branch 1)
    C.teacher_deep_network = "resnet101"
    C.teacher_wide_network = "wide_resnet50_2"
    C.teacher_bn = None                # 'train': batch statistics of each call, as published; 'eval': frozen BN
    C.teacher_precision = "auto"       # 'auto': int8 copies on CPU (furnace/quantize.py) where they keep the
                                       # fp32 argmax (below), else as `amp`; 'amp': as `amp`; 'int8': always
    C.teacher_int8_min_agreement = 0.98  # least share of held-out labeled pixels with the fp32 argmax
    C.teacher_calibration_images = 32  # unlabeled training crops that set the int8 activation ranges
    C.teacher_check_images = 16        # labeled training crops on which the agreement is measured
    C.teacher_labels = None            # 'online': predicted on every augmented crop at every step, as
                                       # published; 'offline': the teachers' pseudo-labels of x_l, u0, u1 are
                                       # predicted once per image and augmented with it (furnace/teacher_labels.py)
    C.teacher_label_dir = None         # offline pseudo-labels; None: {output_dir}/teacher_labels

    # how the step is computed: SETTINGS above; None = the setting's value
    C.setting = "published"
    C.gpu_batch = 2                    # images per GPU in the published run: with loss_scope='per_gpu' every loss
                                       # is a mean over such groups of per-group values, as each published GPU
                                       # computed it; lambda_1 is a sum over this many images in both scopes
    C.network_calls = None             # 'separate': each network called on each input (u0, u1, u_m, x_l) on
                                       # its own, as published (BatchNorm statistics per call); 'joint': one call
                                       # on the inputs that need it, concatenated
    C.student_bn_calls = True          # separate calls: the student also on u0 and u1 without gradient, as
                                       # published; they only update its BatchNorm running statistics (which
                                       # evaluation uses). False (opt-in, any setting): skipped, the same
                                       # gradients, other running statistics
    C.cutmix_overlap = None            # 'toggle': overlapping boxes flip the mask back to 0, as published; 'union'
    C.loss_scope = None                # 'per_gpu': as published (above); 'global': normalised over the global batch

    # loss weights (0 switches a term off, for ablations)
    C.sup_weight = 1.0
    C.cps_weight = 1.0
    C.pixel_unlabeled_weight = 1.0     # CE(s_mix, argmax T_D mix) + CE(s_mix, argmax T_W mix)
    C.pixel_labeled_weight = 1.0       # CE(s_l, argmax T_D(x_l)) + CE(s_l, argmax T_W(x_l))
    C.semantic_weight = 0.002          # lambda_1, see gpu_batch
    C.region_weight = 100.0            # lambda_2
    C.region_grid = 7
    C.ohem = dataset == "cityscapes"
    C.ohem_thresh = 0.7
    C.ohem_min_kept = 50000            # per image of the local batch

    # optimisation (batch and lr are global: the lr written here is the lr used, whatever the GPU count)
    C.batch_size = 8                   # labeled images per step over all processes; unlabeled the same
    C.accum_steps = 1                  # gradient accumulation: each process computes its share of the batch in
                                       # this many micro-batches (BatchNorm statistics per micro-batch; README)
    C.lr = 0.0025                      # the published VOC ResNet-18 update (README, "Learning rate"): a
                                       # config that keeps the defaults takes published-size steps
    C.momentum = 0.9
    C.weight_decay = 8e-4 if dataset == "cityscapes" else 4e-4  # published 1e-4 at the per-GPU-scaled lr
    C.lr_power = 0.9
    C.warmup_iters = 0
    C.epochs = 34
    C.iters_per_epoch = None           # None: max(|D_l|, |D_u|) // batch_size (the supervised baseline too)
    C.amp = None                       # 'off' (fp32, as published), 'auto' (bf16 on CUDA and bf16-capable CPUs,
                                       # else off), 'bf16', 'fp16' (CUDA only)
    C.channels_last = False
    C.device = "auto"                  # 'auto', 'cpu' or 'cuda'

    # checkpoints and logs
    C.output_dir = "{exp_dir}/output/{run}"  # {run}: one folder per run identity (furnace/run.py)
    C.save_every = 5                   # epochs; the last epoch is always saved
    C.save_every_iters = 500           # also last.pth every this many iterations within an epoch (0: off)
    C.log_every = 10                   # iterations between TensorBoard points

    # evaluation
    C.eval_mode = "sliding"            # 'sliding' or 'whole'
    C.eval_crop_size = C.crop_size
    C.eval_stride_rate = 2 / 3
    C.eval_scales = [1.0]
    C.eval_flip = False
    # validation during training (furnace/engine.py: the evaluation above, on the model being trained)
    C.val_every = None                 # epochs between validations and always after the last; None: about 5
                                       # per run (ceil(epochs / 5)); 0: off
    C.val_images = None                # validate on this many val images, spread over the list (None: all)
    return C


def load_experiment(exp_dir: Union[str, os.PathLike]) -> EasyDict:
    """The `C` of an experiment folder's config.py, before any override. The file is executed anew on each
    call and not kept in sys.modules, so each call returns a fresh copy that no earlier caller has changed."""
    import importlib.util
    path = osp.join(exp_dir, "config.py")
    if not osp.isfile(path):
        raise FileNotFoundError(f"experiment folder {exp_dir} has no config.py")
    name = "exp_config_" + osp.basename(osp.abspath(exp_dir)).replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.C


def parse_value(text: str):
    """A Python literal if `text` is one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_override_file(path: str) -> List[Tuple[str, str, str]]:
    """(key, value text, origin) triples from a `key = value` file."""
    if not osp.isfile(path):
        raise FileNotFoundError(f"config override file not found: {path}")
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise ValueError(f"{path}:{n}: expected 'key = value', got {line!r}")
            key, value = line.split("=", 1)
            items.append((key.strip(), value.strip(), f"{path}:{n}"))
    return items


def collect_overrides(cfg_files: Iterable[str] = (), pairs: Iterable[str] = ()) -> List[Tuple[str, str, str]]:
    """All overrides in the order they apply: files, then key=value pairs."""
    items = []
    for path in cfg_files:
        items += read_override_file(path)
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"command-line override {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        items.append((key.strip(), value.strip(), f"command-line override {pair!r}"))
    return items


def resolve(C: EasyDict, overrides: Iterable[Tuple[str, str, str]] = ()) -> EasyDict:
    """A new config with the overrides applied, placeholders filled in, and values checked."""
    from furnace import settings
    from furnace.run import identity, run_name
    own = C
    C, origins = _apply(C, overrides)
    settings.check_settings(C, origins)  # types and ranges, before any placeholder or file is used
    base, _ = _apply(EasyDict(dict(own), method=C.method))  # the experiment's own settings, for {run}
    _dataset_classes(C)
    _dataset_classes(base, fallback=C)

    # Fill placeholders; data_root and output_dir first since others refer to them. output_dir's {run}
    # names the run from its identity (furnace/run.py), compared with the experiment's own settings.
    ident = identity(_fill_identity(C))
    names = _fill_identity(C, names_only=True)
    names["run"] = run_name(C.method, ident, identity(_fill_identity(base)), origins)
    C.output_dir = _fill(C.output_dir, names, "output_dir")
    names["output_dir"] = C.output_dir
    for key, value in list(C.items()):
        if isinstance(value, str):
            C[key] = _fill(value, names, key)
    check(C)
    return C


def _apply(C: EasyDict, overrides: Iterable[Tuple[str, str, str]] = ()) -> Tuple[EasyDict, Dict[str, str]]:
    """A copy of C with the overrides applied, and where each overridden key's value came from (in the order
    of each key's last override). Values derived from others before placeholders are filled belong here too:
    resolve() applies this to the experiment's own settings as well, to name a run by what differs."""
    C = EasyDict(dict(C))
    origins = {}
    for key, text, origin in overrides:
        if key not in C:
            raise KeyError(f"unknown config key {key!r} (from {origin}); known keys: {', '.join(sorted(C))}")
        C[key] = parse_value(text)
        origins.pop(key, None)
        origins[key] = origin
    if C.setting not in SETTINGS:
        raise ValueError(f"config: setting={C.setting!r}; expected one of {tuple(SETTINGS)}")
    for key, value in SETTINGS[C.setting].items():  # keys left at None take the setting's value
        if C[key] is None:
            C[key] = value
    return C, origins


def _dataset_classes(C: EasyDict, fallback: Optional[EasyDict] = None) -> None:
    """A custom dataset's num_classes, class_names and palette from its data root (furnace/data/custom.py),
    where C leaves them at None; a value C gives must agree with the files. `fallback`: the resolved config
    whose values to take when C's data root has no class-name file (the experiment's own data_root, when
    the run overrides it, need not exist)."""
    if C.dataset != "custom":
        return
    from furnace.data.custom import dataset_classes
    root = _fill_identity(C, names_only=True)["data_root"]
    try:
        found = dataset_classes(root)
    except FileNotFoundError:
        if fallback is None:
            raise FileNotFoundError(f"config: dataset='custom' reads its classes from {root}/classes.txt, "
                                    "which does not exist: prepare the folder with tools/prepare_custom.py, "
                                    "or set data_root") from None
        found = {k: fallback[k] for k in ("num_classes", "class_names", "palette")}
    except ValueError as e:
        raise ValueError(f"config: dataset='custom': {e}") from None
    for key, value in found.items():
        if C[key] is None:
            C[key] = value
        elif key != "palette" and C[key] != value and fallback is None:
            raise ValueError(f"config: {key}={C[key]!r} but {root} has {value!r} (classes.txt); "
                             f"leave {key} unset to take the data's")


def _fill_identity(C: EasyDict, names_only: bool = False):
    """C with the placeholders of its identity keys filled (or, names_only, the placeholder values)."""
    from furnace.run import IDENTITY_EXCLUDED
    C = EasyDict(dict(C))
    names = {"root": REPO_ROOT, "exp_dir": C.exp_dir, "exp_name": C.exp_name, "partition": C.partition,
             "method": C.method}
    C.data_root = _fill(C.data_root, names, "data_root")
    names["data_root"] = C.data_root
    if names_only:
        return names
    for key, value in list(C.items()):
        if isinstance(value, str) and key not in IDENTITY_EXCLUDED:
            C[key] = _fill(value, names, key)
    return C


def _fill(value, names: Dict[str, object], key: str):
    if not isinstance(value, str):
        return value
    try:
        return value.format(**names)
    except (KeyError, IndexError) as e:
        raise KeyError(f"config key {key!r}: unknown placeholder {e} in {value!r}; "
                       f"available: {', '.join('{' + n + '}' for n in names)}") from None


def check(C: EasyDict) -> None:
    """Reject settings that cannot work, naming the setting."""
    def need(cond: bool, msg: str):
        if not cond:
            raise ValueError(f"config: {msg}")
    need(C.amp in AMP_MODES, f"amp={C.amp!r}; expected one of {AMP_MODES}")
    need(C.teacher_bn in ("eval", "train"), f"teacher_bn={C.teacher_bn!r}; expected 'eval' or 'train'")
    need(C.teacher_precision in TEACHER_PRECISIONS,
         f"teacher_precision={C.teacher_precision!r}; expected one of {TEACHER_PRECISIONS}")
    need(C.teacher_labels in ("online", "offline"),
         f"teacher_labels={C.teacher_labels!r}; expected 'online' or 'offline'")
    need(not (C.method == "mgd" and C.teacher_labels == "offline" and C.teacher_bn == "train"),
         "teacher_labels='offline' needs teacher_bn='eval': a pseudo-label made once cannot depend on the batch; "
         "set teacher_labels='online' for train-mode teachers (setting='published' has both)")
    need(C.network_calls in ("separate", "joint"), f"network_calls={C.network_calls!r}; expected 'separate' or 'joint'")
    need(C.cutmix_overlap in ("toggle", "union"), f"cutmix_overlap={C.cutmix_overlap!r}; expected 'toggle' or 'union'")
    need(C.loss_scope in ("per_gpu", "global"), f"loss_scope={C.loss_scope!r}; expected 'per_gpu' or 'global'")
    need(isinstance(C.gpu_batch, int) and C.gpu_batch > 0, f"gpu_batch={C.gpu_batch!r} must be a positive int")
    need(C.loss_scope != "per_gpu" or C.batch_size % C.gpu_batch == 0,
         f"batch_size={C.batch_size} is not a multiple of gpu_batch={C.gpu_batch} (loss_scope='per_gpu' averages "
         f"per-GPU losses over groups of gpu_batch images)")
    need(0 <= C.teacher_int8_min_agreement <= 1,
         f"teacher_int8_min_agreement={C.teacher_int8_min_agreement!r} must be in [0, 1]")
    for key in ("teacher_calibration_images", "teacher_check_images"):
        need(isinstance(C[key], int) and C[key] > 0, f"{key}={C[key]!r} must be a positive int")
    need(C.val_every is None or (isinstance(C.val_every, int) and C.val_every >= 0),
         f"val_every={C.val_every!r} must be None (about 5 validations per run), 0 (off) or a positive int")
    need(C.val_images is None or (isinstance(C.val_images, int) and C.val_images > 0),
         f"val_images={C.val_images!r} must be None (the whole val list) or a positive int")
    need(C.eval_mode in ("sliding", "whole"), f"eval_mode={C.eval_mode!r}; expected 'sliding' or 'whole'")
    need(C.device in ("auto", "cpu", "cuda"), f"device={C.device!r}; expected 'auto', 'cpu' or 'cuda'")
    need(isinstance(C.batch_size, int) and C.batch_size > 0, f"batch_size={C.batch_size!r} must be a positive int")
    need(isinstance(C.accum_steps, int) and C.accum_steps > 0, f"accum_steps={C.accum_steps!r} must be a positive int")
    need(C.batch_size % C.accum_steps == 0 if isinstance(C.accum_steps, int) and C.accum_steps > 0 else True,
         f"accum_steps={C.accum_steps} does not divide batch_size={C.batch_size}")
    need(isinstance(C.epochs, int) and C.epochs > 0, f"epochs={C.epochs!r} must be a positive int")
    need(C.iters_per_epoch is None or (isinstance(C.iters_per_epoch, int) and C.iters_per_epoch > 0),
         f"iters_per_epoch={C.iters_per_epoch!r} must be None or a positive int")
    need(isinstance(C.num_classes, int) and 1 < C.num_classes < 255, f"num_classes={C.num_classes!r}")
    need(C.class_names is not None and len(C.class_names) == C.num_classes,
         f"class_names has {len(C.class_names or [])} names but num_classes={C.num_classes}")
    need(C.lr > 0, f"lr={C.lr!r} must be positive")
    need(C.output_stride in (8, 16, 32), f"output_stride={C.output_stride!r}; expected 8, 16 or 32")
    for key in ("sup_weight", "cps_weight", "pixel_unlabeled_weight", "pixel_labeled_weight",
                "semantic_weight", "region_weight"):
        need(isinstance(C[key], (int, float)) and C[key] >= 0, f"{key}={C[key]!r} must be a number >= 0")


_REQUIRED = object()


def config_value(C, key: str, default=_REQUIRED):
    """C's value of `key`, for a full config and for a partial one (a checkpoint's saved config, a dict
    given by a test or a script): a key that is missing or None takes `default`; without a default that is
    an error naming the key. C: a mapping (EasyDict, dict) or an object with attributes."""
    value = C.get(key) if isinstance(C, Mapping) else getattr(C, key, None)
    if value is not None:
        return value
    if default is _REQUIRED:
        raise KeyError(f"config has no value for {key!r}")
    return default


def crop_hw(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(height, width) of a crop size given as an int (a square) or an (h, w) pair, as crop_size and
    eval_crop_size are. Here, in the torch-free config module, so that transforms and evaluation share it."""
    if isinstance(size, numbers.Integral):  # numpy integers too
        return int(size), int(size)
    hw = tuple(int(s) for s in size)
    if len(hw) != 2:
        raise ValueError(f"a crop size must be an int or (h, w), got {size!r}")
    return hw


def config_from_cli(C: EasyDict, parser: argparse.ArgumentParser,
                    argv: Optional[List[str]] = None) -> Tuple[EasyDict, argparse.Namespace]:
    """Parse a script's command line: its own options, `--cfg FILE` and `key=value` overrides."""
    parser.add_argument("--cfg", action="append", default=[], metavar="FILE",
                        help="file of 'key = value' config overrides (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)  # key=value pairs and options in any order
    return resolve(C, collect_overrides(args.cfg, args.overrides)), args
