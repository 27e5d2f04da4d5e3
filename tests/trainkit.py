"""Helpers shared by tests/test_training.py and tests/test_reliability.py (not a test module), and a
training driver for the tests' subprocesses and `torchrun` runs.

As a script:
    python tests/trainkit.py EXP_DIR [--fault KIND:N] [--runs JSON] [-- train.py arguments]
runs `furnace.engine.main` with the config of experiment folder EXP_DIR, like its train.py, plus test-only
instrumentation that production code must not carry:
  --fault kill-at-step:N    SIGKILL this process as training step N (counted from 1) begins
  --fault kill-in-save:N    SIGKILL this process halfway through writing the file of the N-th checkpoint save
  --fault stall-at-step:N   as training step N begins, create the file $TRAINKIT_MARKER and sleep (holding the
                            run's lock) until killed
  --runs JSON               several trainings in one process (one torchrun launch): a list of
                            {"out": DIR, "args": [...], "fp64": bool}; the process group stays up between them.
fp64 runs the whole computation in float64 (default dtype, batches, and every `.float()` upcast of the
losses and BatchNorm kept at float64; the networks start from the float32 initial weights) to compare 1 and
N processes beyond float32 rounding, see test_reliability.py; tests/fp64site does the same for script.sh.
"""
import contextlib
import importlib
import io
import json
import os
import os.path as osp
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
EXP = ROOT / "exp.voc" / "voc8.mobilev2_deeplabv3plus"   # the fastest student (MobileNet-v2)
TOY_CLASSES = ["background", "disc", "rectangle", "triangle", "cross", "ring"]
NUM_CLASSES = len(TOY_CLASSES)


# ------------------------------------------------------------------------------------------ test helpers
def load_tool(name: str) -> ModuleType:
    """The tool tools/<name>.py as a module (tests/conftest.py puts tools/ on sys.path)."""
    return importlib.import_module(name)


def random_bn(net: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Non-trivial BatchNorm statistics and affine parameters, so that folding them changes the weights."""
    import torch
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return net


def make_toy_data(out: Path, num_train: int = 24, num_val: int = 5) -> Path:
    """The toy VOC set (tools/make_toy_data.py) under `out`; returns its pascal_voc root."""
    subprocess.run([PYTHON, str(ROOT / "tools" / "make_toy_data.py"), "--out", str(out), "--seed", "0",
                    "--num-train", str(num_train), "--num-val", str(num_val),
                    "--num-city-train", "2", "--num-city-val", "2"],
                   check=True, capture_output=True, text=True, env=clean_env())
    return out / "pascal_voc"


_TOY: Dict[str, Path] = {}


def toy_root(tmp_path_factory) -> Path:
    """One toy VOC set per test session (24 train images: 3 labeled + 21 unlabeled in the 1/8 split; 5 val)."""
    if "root" not in _TOY:
        _TOY["root"] = make_toy_data(tmp_path_factory.mktemp("toy"))
    return _TOY["root"]


def overrides(data_root, output_dir, **changes) -> List[str]:
    """key=value arguments of a tiny toy run: MobileNet-v2 nets, crop 32, batch 2, 2 epochs of 2 steps, fp32,
    evaluation (and offline teacher labels) in 48x48 windows, no validation during training."""
    values = dict(data_root=str(data_root), num_classes=NUM_CLASSES, class_names=TOY_CLASSES, pretrained=None,
                  crop_size=32, eval_crop_size=48, train_scales=[0.75, 1.0], batch_size=2, epochs=2,
                  iters_per_epoch=2, lr=0.01,
                  num_workers=0, amp="off", save_every=1, log_every=1, device="cpu", output_dir=str(output_dir),
                  teacher_deep_network="mobilenet_v2", teacher_wide_network="mobilenet_v2",
                  teacher_precision="amp",  # int8 teachers: tests/test_quantize.py
                  val_every=0)  # validation during training costs more than these runs: tests/test_validation.py
    values.update(changes)
    return [f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in values.items()]


def train_in_process(argv: List[str], exp_dir: Path = EXP) -> dict:
    """furnace.engine.main(C, argv) in this process, as the experiment's train.py would run it."""
    from furnace.config import load_experiment
    from furnace.engine import main
    return main(load_experiment(exp_dir), argv)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch with n intra-op threads (like OMP_NUM_THREADS=n for the subprocesses), restored after.

    Bitwise comparisons between runs need the same thread count: a convolution's weight gradient is a
    reduction split across threads."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def clean_env(**extra) -> Dict[str, str]:
    """This environment with one thread per process, furnace importable, and `extra`."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.update(extra)
    return env


def driver_command(train_args: List[str], nproc: int = 1, fault: Optional[str] = None,
                   runs: Optional[list] = None, exp_dir: Path = EXP) -> List[str]:
    """The command line that runs this file as the training driver (under torchrun when nproc > 1)."""
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [PYTHON]
    cmd += [__file__, str(exp_dir)]
    if fault:
        cmd += ["--fault", fault]
    if runs is not None:
        cmd += ["--runs", json.dumps(runs)]
    return cmd + ["--"] + list(train_args)


def run_driver(train_args: List[str], nproc: int = 1, fault: Optional[str] = None, runs: Optional[list] = None,
               timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(driver_command(train_args, nproc, fault, runs), capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**env), cwd=str(ROOT))


def load(path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def tensors(obj, prefix: str = "") -> Dict[str, "object"]:
    """Every tensor in a nested dict/list structure (a checkpoint, an optimizer state), by path."""
    import torch
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}[{i}]"))
    return out


def assert_bitwise_equal(a: dict, b: dict, keys: Iterable[str] = ("model", "model_b", "optimizer")) -> int:
    """Every tensor under `keys` of checkpoints a and b is torch.equal (same dtype, shape, bits); returns
    how many were compared."""
    import torch
    n = 0
    for key in keys:
        assert (key in a) == (key in b), f"'{key}' in one checkpoint only"
        if key not in a:
            continue
        ta, tb = tensors(a[key]), tensors(b[key])
        assert ta.keys() == tb.keys(), f"{key}: different entries {sorted(ta.keys() ^ tb.keys())[:5]}"
        for name in ta:
            assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, f"{key}.{name}"
            assert torch.equal(ta[name], tb[name]), (
                f"{key}.{name} differs: max |a-b| = {(ta[name].double() - tb[name].double()).abs().max().item():.3g}")
            n += 1
    return n


def make_teacher(path: Path, network: str = "mobilenet_v2", num_classes: int = NUM_CLASSES, seed: int = 0,
                 dataset: str = "voc") -> Path:
    """A teacher checkpoint as a CPS run writes it (random weights: the tests need its shape, not skill)."""
    import torch
    from furnace.checkpoint import save_checkpoint
    from furnace.models import build_segmentor
    torch.manual_seed(seed)
    net = build_segmentor(network, num_classes)
    save_checkpoint({"model": net.state_dict(), "network": network, "num_classes": num_classes, "method": "cps",
                     "epoch": 1, "config": {"dataset": dataset}}, str(path))
    return path


# ---------------------------------------------------------------------------------------------- driver
def _install_fault(spec: str) -> None:
    import torch
    import furnace.checkpoint
    import furnace.engine
    kind, n = spec.rsplit(":", 1)
    n = int(n)
    if kind == "kill-at-step":
        step, count = furnace.engine.Trainer._step, [0]

        def _step(self, batch):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, batch)
        furnace.engine.Trainer._step = _step
    elif kind == "stall-at-step":
        import time
        step, count = furnace.engine.Trainer._step, [0]

        def _step(self, batch):
            count[0] += 1
            if count[0] == n:
                open(os.environ["TRAINKIT_MARKER"], "w").close()
                while True:
                    time.sleep(1)
            return step(self, batch)
        furnace.engine.Trainer._step = _step
    elif kind == "kill-in-save":
        real_save, count = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] == n:  # the checkpoint's bytes, half of them written and flushed, then death
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        furnace.checkpoint.torch.save = save
    else:
        raise SystemExit(f"trainkit: unknown fault {spec!r}")


@contextlib.contextmanager
def float64_everywhere():
    """Train in float64: parameters (default dtype), batches, and the float32 upcasts in losses and BatchNorm."""
    import torch
    import furnace.engine
    import furnace.evaluate
    dtype, to_float, batches = torch.get_default_dtype(), torch.Tensor.float, furnace.engine.Trainer._batches
    predict, new_network = furnace.evaluate.predict_probs, furnace.engine.Trainer._new_network

    def float64_predict(model, image, **kwargs):  # validation during training: images in the model's dtype
        return predict(model, image.double(), **kwargs)

    def float32_init(self):  # the float32 run's initial weights, in float64: the two runs start from the same point
        torch.set_default_dtype(dtype)
        try:
            return new_network(self).double()
        finally:
            torch.set_default_dtype(torch.float64)

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else to_float(self, *args, **kwargs)

    def float64_batches(self, epoch, start=0):
        for batch in batches(self, epoch, start):
            yield {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = keep_float64
    furnace.engine.Trainer._batches = float64_batches
    furnace.evaluate.predict_probs = float64_predict
    furnace.engine.Trainer._new_network = float32_init
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.Tensor.float = to_float
        furnace.engine.Trainer._batches = batches
        furnace.evaluate.predict_probs = predict
        furnace.engine.Trainer._new_network = new_network


def _driver(argv: List[str]) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="furnace.engine.main with test instrumentation")
    parser.add_argument("exp_dir")
    parser.add_argument("--fault")
    parser.add_argument("--runs")
    split = argv.index("--") if "--" in argv else len(argv)
    args, train_args = parser.parse_args(argv[:split]), argv[split + 1:]
    sys.path.insert(0, osp.abspath(args.exp_dir))
    import torch.distributed as dist
    import furnace.engine
    from furnace.config import load_experiment
    if args.fault:
        _install_fault(args.fault)
    if not args.runs:
        furnace.engine.main(load_experiment(args.exp_dir), train_args)
        return
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *a, **k: None  # one process group for all the runs
    try:
        for run in json.loads(args.runs):
            with float64_everywhere() if run.get("fp64") else contextlib.nullcontext():
                furnace.engine.main(load_experiment(args.exp_dir),
                                    train_args + run["args"] + [f"output_dir={run['out']}"])
    finally:
        dist.destroy_process_group = destroy
        if dist.is_initialized():
            destroy()


if __name__ == "__main__":
    _driver(sys.argv[1:])
