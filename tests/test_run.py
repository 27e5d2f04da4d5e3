"""Runs you can trust (furnace/run.py, furnace/settings.py), at the command line where a user meets them: a
changed setting gets its own folder or is refused, a finished run is never overwritten, a second trainer is
refused and a crashed one does not block, killing script.sh leaves no trainer, every bad setting is refused
by name before anything is read. Each refusal asserts the exit status, the message, and that no checkpoint
of the existing run changed (hashes before and after)."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from furnace.config import collect_overrides, load_experiment, new_config, resolve
from furnace.run import RunRefused, run_name
from furnace.settings import RULES
from trainkit import (EXP, PYTHON, ROOT, TOY_CLASSES, clean_env, driver_command, load, overrides,
                      train_in_process)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(method="supervised", epochs=1, iters_per_epoch=2)


def digest(out: Path) -> dict:
    """sha256 of every checkpoint and of run.json of a run folder."""
    files = sorted((out / "snapshot").glob("*.pth")) + [p for p in [out / "run.json"] if p.exists()]
    assert files, f"no checkpoints in {out}"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def cli(script: str, args, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    """The experiment's train.py / eval.py / script.sh as a user runs it."""
    cmd = ["bash", str(EXP / script)] if script.endswith(".sh") else [PYTHON, str(EXP / script)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          env=clean_env(**env), cwd=str(ROOT))


@pytest.fixture(scope="module")
def finished(toy, tmp_path_factory):
    """A finished tiny supervised run: (its folder, its train.py arguments)."""
    out = tmp_path_factory.mktemp("finished")
    args = overrides(toy, out, **TINY)
    train_in_process(args)
    return out, args


# ----------------------------------------------------------------------------------------- settings
def test_every_setting_has_a_type_and_range_rule(tmp_path):
    for dataset in ("voc", "cityscapes", "custom"):
        missing = sorted(set(new_config(dataset, str(EXP / "config.py"))) - set(RULES))
        assert not missing, f"keys of new_config without a rule in furnace/settings.py RULES: {missing}"
    (tmp_path / "classes.txt").write_text("a\nb\n")  # a custom dataset's classes are read from its folder
    for config in sorted(ROOT.glob("exp.*/*/config.py")):  # every experiment's own settings pass
        C = load_experiment(config.parent)
        resolve(C, collect_overrides(pairs=[f"data_root={tmp_path}"] if C.dataset == "custom" else []))


BAD = [("lr=abc", "lr='abc' must be a number"), ("lr=0", "lr=0 must be > 0"), ("lr=True", "lr=True"),
       ("crop_size=abc", "crop_size='abc'"), ("crop_size=[32,0]", "crop_size=[32, 0]"),
       ("save_every=0", "save_every=0 must be >= 1"), ("log_every=0", "log_every=0 must be >= 1"),
       ("save_every_iters=-1", "save_every_iters=-1"), ("eval_crop_size=0", "eval_crop_size=0"),
       ("eval_stride_rate=0", "eval_stride_rate=0"), ("eval_scales=[]", "eval_scales=[]"),
       ("batch_size=2.5", "batch_size=2.5 must be an integer"), ("epochs=0", "epochs=0"),
       ("iters_per_epoch=0", "iters_per_epoch=0"), ("momentum=1", "momentum=1 must be < 1"),
       ("weight_decay=-1", "weight_decay=-1"), ("seed=-1", "seed=-1"), ("num_workers=-1", "num_workers=-1"),
       ("train_scales=[0.5,0]", "train_scales="), ("image_std=[1,1]", "image_std="), ("partition=0", "partition=0"),
       ("region_weight=-1", "region_weight=-1"), ("region_grid=0", "region_grid=0"), ("ohem=yes", "ohem='yes'"),
       ("ohem_thresh=0", "ohem_thresh=0"), ("warmup_iters=-1", "warmup_iters=-1"), ("amp=fp8", "amp='fp8'"),
       ("network=resnet19", "network='resnet19'"), ("teacher_deep=3", "teacher_deep=3"),
       ("eval_flip=1", "eval_flip=1 must be True or False"), ("output_stride=12", "output_stride=12"),
       ("class_names=3", "class_names=3"), ("gpu_batch=0", "gpu_batch=0")]


@pytest.mark.parametrize("pair,fragment", BAD, ids=[p for p, _ in BAD])
def test_bad_setting_is_refused_by_name(pair, fragment):
    with pytest.raises(ValueError) as error:
        resolve(load_experiment(EXP), collect_overrides(pairs=[pair]))
    assert fragment in str(error.value) and f"command-line override {pair!r}" in str(error.value)


@pytest.mark.parametrize("pair", ["lr=abc", "save_every=0", "eval_crop_size=0", "crop_size=abc", "log_every=0"])
def test_bad_setting_at_the_command_line_changes_nothing(finished, pair):
    """train.py --resume on a finished run with a bad setting (eval_crop_size is also offline labelling's).
    The first three through train.py itself, the others through furnace.engine.main (train.py's body) in this
    process, to save the interpreter start-ups."""
    out, args = finished
    before = digest(out)
    if pair in ("crop_size=abc", "log_every=0"):
        with pytest.raises(ValueError) as error:
            train_in_process(["--resume"] + args + [pair])
        message = str(error.value)
    else:
        result = cli("train.py", ["--resume"] + args + [pair])
        assert result.returncode == 1
        message = result.stderr
    assert f"config: {pair.split('=')[0]}=" in message and pair in message, message[-1500:]
    assert digest(out) == before


def test_eval_py_refuses_a_bad_eval_crop_size(finished):
    out, args = finished
    before = digest(out)
    result = cli("eval.py", args + ["eval_crop_size=0"])
    assert result.returncode == 1 and "eval_crop_size=0" in result.stderr, result.stderr[-1500:]
    assert digest(out) == before and not (out / "eval.json").exists()


def test_keys_and_flags_in_any_order(finished):
    """`train.py a=1 --resume b=2`: a finished run has nothing to do."""
    out, args = finished
    before = digest(out)
    assert train_in_process(args[:3] + ["--resume"] + args[3:])["epochs"] == 1
    assert "nothing to do" in (out / "train.log").read_text()
    assert digest(out) == before


# ------------------------------------------------------------------------------------ run identity
def test_run_names():
    C = load_experiment(EXP)
    assert resolve(C).output_dir == str(EXP / "output" / "mgd")
    assert resolve(C, collect_overrides(pairs=["method=supervised", "num_workers=1", "eval_flip=True"])
                   ).output_dir == str(EXP / "output" / "supervised")  # not identity: same run
    variant = resolve(C, collect_overrides(pairs=["partition=16"])).output_dir
    assert Path(variant).parent == EXP / "output" and Path(variant).name.startswith("mgd-partition16-")
    assert resolve(C, collect_overrides(pairs=["partition=16"])).output_dir == variant  # stable
    assert resolve(C, collect_overrides(pairs=["partition=4"])).output_dir != variant
    assert run_name("mgd", {"a": 1, "b": 2, "c": 3}, {"a": 0, "b": 0, "c": 0}, ["a", "b", "c"]).startswith("mgd-b2-c3+1-")


def test_script_sh_gives_each_setting_its_own_run_and_eval_finds_it(toy, tmp_path):
    """bash script.sh SETTINGS, then the same with lr=0.02: two folders, the first untouched; the second's
    evaluation (eval.py with the same arguments) evaluates the second."""
    args = overrides(toy, f"{tmp_path}/{{run}}", **TINY)
    first = cli("script.sh", args, timeout=300, NGPUS="1")
    assert first.returncode == 0, first.stderr[-3000:]
    (base,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert base.name.startswith("supervised-") and (base / "eval.json").exists()
    before = digest(base)

    second = cli("script.sh", args + ["lr=0.02"], timeout=300, NGPUS="1")
    assert second.returncode == 0, second.stderr[-3000:]
    (variant,) = [p for p in tmp_path.iterdir() if p.is_dir() and p != base]
    assert "lr0.02" in variant.name and digest(base) == before
    assert json.loads((variant / "run.json").read_text())["identity"]["lr"] == 0.02
    # script.sh's eval.py found the variant from the same arguments (as `python eval.py ... lr=0.02` does)
    assert json.loads((variant / "eval.json").read_text())[0]["checkpoint"] == str(variant / "snapshot" / "last.pth")


def test_changed_setting_in_the_same_folder_is_refused(finished):
    """output_dir given by hand: another lr or num_classes there is refused naming run.json and the keys."""
    out, args = finished
    before = digest(out)
    lr = cli("train.py", ["--resume"] + args + ["lr=0.02"])
    assert lr.returncode == 1 and "lr: 0.01 there, 0.02 now" in lr.stderr and str(out / "run.json") in lr.stderr
    seven = TOY_CLASSES + ["extra"]
    classes = cli("train.py", ["--resume"] + args + ["num_classes=7", f"class_names={seven!r}"])
    assert classes.returncode == 1 and "num_classes: 6 there, 7 now" in classes.stderr, classes.stderr[-2000:]
    assert str(out / "run.json") in classes.stderr
    ev = cli("eval.py", args + ["lr=0.02"])
    assert ev.returncode == 1 and "lr: 0.01 there, 0.02 now" in ev.stderr
    assert digest(out) == before and not (out / "eval.json").exists()


def test_folder_without_run_json_is_checked_against_its_checkpoint(toy, finished, tmp_path):
    """A run written before run.json existed: its last.pth's config decides."""
    out, args = finished
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "run.json").unlink()
    before = digest(old)
    seven = TOY_CLASSES + ["extra"]
    argv = ["--resume"] + overrides(toy, old, **TINY) + ["num_classes=7", f"class_names={seven!r}"]
    with pytest.raises(RunRefused) as error:
        train_in_process(argv)
    assert "num_classes: 6 there, 7 now" in str(error.value) and str(old / "snapshot" / "last.pth") in str(error.value)
    assert digest(old) == before


def test_train_py_twice_is_refused(finished):
    out, args = finished
    before = digest(out)
    again = cli("train.py", args)
    assert again.returncode == 1
    assert f"{out} already holds a run" in again.stderr and "--resume" in again.stderr, again.stderr[-2000:]
    assert digest(out) == before


# ------------------------------------------------------------------------------- one trainer per run
def test_second_trainer_is_refused_and_a_crashed_one_does_not_block(toy, tmp_path):
    out = tmp_path / "run"
    args = overrides(toy, out, method="supervised", epochs=2, iters_per_epoch=2)
    marker = tmp_path / "stalled"
    first = subprocess.Popen(driver_command(args, fault="stall-at-step:3"), env=clean_env(TRAINKIT_MARKER=str(marker)),
                             cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), first.stderr.read()[-2000:] if first.poll() is not None else "timeout"
        before = digest(out)  # epoch 1 saved; the first trainer now stalls in epoch 2, holding the lock

        second = cli("train.py", ["--resume"] + args)
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"{out / 'train.lock'} is held by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert digest(out) == before
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL and (out / "train.lock").exists()  # left behind by the crash

    third = cli("train.py", ["--resume"] + args)
    assert third.returncode == 0, third.stderr[-2000:]
    assert load(out / "snapshot" / "last.pth")["epoch"] == 2 and not (out / "train.lock").exists()


def _processes_mentioning(text: str) -> list:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("ngpus,kill", [("2", "group"), ("1", "script")])
def test_killed_script_sh_leaves_no_trainer(toy, tmp_path, ngpus, kill):
    """SIGKILL to script.sh's process group (torchrun with 2 workers, which run in sessions of their own), or
    to the script's bash alone (1 process): within seconds no process of the run is left."""
    out = tmp_path / "run"
    args = overrides(toy, out, method="supervised", epochs=1, iters_per_epoch=10000, save_every_iters=0,
                     gpu_batch=1)  # 2 processes of 1 image each (the published per-GPU groups are 2)
    proc = subprocess.Popen(["bash", str(EXP / "script.sh")] + args, env=clean_env(NGPUS=ngpus), cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lock = out / "train.lock"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if lock.exists() and lock.read_text().startswith("{") and (out / "train.log").exists():
            break
        time.sleep(0.1)
    assert proc.poll() is None and lock.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "timeout"
    trainer = json.loads(lock.read_text())["pid"]
    assert _processes_mentioning(str(out)), "no trainer found"
    if kill == "group":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.time() + 30
    while _processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    left = _processes_mentioning(str(out))
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left after killing script.sh: {left} (trainer {trainer})"


def test_keys_added_later_read_with_the_values_old_runs_computed(tmp_path):
    """A run.json written before accum_steps and student_bn_calls existed is read with accum_steps=1 and
    student_bn_calls=True (what those runs did), so its folder still accepts a resume of the same settings."""
    from furnace.run import ADDED_KEYS, recorded_identity
    (tmp_path / "run.json").write_text(json.dumps({"identity": {"method": "mgd", "lr": 0.0025}}))
    identity, source, _ = recorded_identity(str(tmp_path))
    assert identity == {"accum_steps": 1, "student_bn_calls": True, "method": "mgd", "lr": 0.0025}
    assert source == str(tmp_path / "run.json") and set(ADDED_KEYS) == {"accum_steps", "student_bn_calls"}
