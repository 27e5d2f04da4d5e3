"""What a run is, where it lives, and who may write it.

A run's *identity* is the part of its resolved config that decides what it computes: data, lists, network,
method, teachers, loss weights, schedule, seed, precision... Not where it writes (output_dir,
teacher_label_dir), how fast or where it runs (num_workers, device, channels_last), how often it saves or
logs, or how it is evaluated or drawn (val_list, eval_*, val_every, val_images, palette): `IDENTITY_EXCLUDED`
lists those; every other key is identity, new keys included.

Each identity has its own folder: the config's default `output_dir = {exp_dir}/output/{run}` names it
`<method>` for the experiment's own settings (config.py) and `<method>-<overridden keys>-<hash>` for a
variant (e.g. `output/mgd` and `output/mgd-partition16-1f0e`): `run_name`. The resolved identity is written
to `<output_dir>/run.json` when training starts; a folder that holds checkpoints of another identity is
refused with the keys that differ (`check_folder`), whether the folder was named by the default or given
with output_dir=.

Training claims the folder (`claim`): the trainer's rank-0 process holds an flock on
`<output_dir>/train.lock` (which names its pid and host) for the whole run, so a second trainer is refused;
the kernel drops the lock when the holder dies, even by SIGKILL, so a crash never blocks the next run.
The other processes of the run, on every node, join through torchrun's rendezvous and never take it.
Without --resume, a folder that already holds checkpoints is refused, never overwritten.

`python -m furnace.run --die-with-parent -- CMD ...` runs CMD so that it is killed when its parent dies
(Linux PR_SET_PDEATHSIG, kept across exec): tools/run_experiment.sh launches through it, and torchrun's
workers set the same on themselves (`die_with_parent`), so killing script.sh leaves no trainer behind.

`python -m furnace.run --slurm-env` prints the launch variables of a SLURM allocation (`slurm_launch`), which
tools/run_experiment.sh reads, so that script.sh runs unchanged in an sbatch job.

This module imports no torch at the top: the launcher wrapper must start fast.
"""
import contextlib
import ctypes
import datetime
import errno
import glob
import hashlib
import json
import os
import os.path as osp
import re
import signal
import socket
import sys
from typing import Dict, Iterable, List, Optional, Tuple

IDENTITY_EXCLUDED = frozenset({
    "exp_name", "exp_dir", "output_dir", "teacher_label_dir", "num_workers", "device", "channels_last",
    "save_every", "save_every_iters", "log_every", "val_list", "palette",
    "eval_mode", "eval_crop_size", "eval_stride_rate", "eval_scales", "eval_flip", "val_every", "val_images"})
# Identity keys added after runs were recorded, with the value that computes what those runs computed: a
# recorded identity without one of them is read with that value (an old run's folder stays its own).
ADDED_KEYS = {"accum_steps": 1, "student_bn_calls": True}
RUN_FILE = "run.json"
LOCK_FILE = "train.lock"


class RunRefused(RuntimeError):
    """A run that would reuse, overwrite or share another run's folder."""


# --------------------------------------------------------------------------------------------- identity
def _plain(value):
    """The JSON form of a value (tuples become lists), so that identities compare the same after a round trip."""
    return json.loads(json.dumps(value, default=str))


def identity(C) -> Dict[str, object]:
    """The settings of a (resolved) config that decide what its run computes."""
    return {k: _plain(v) for k, v in C.items() if k not in IDENTITY_EXCLUDED}


def differences(old: Dict[str, object], new: Dict[str, object], ignore: Iterable[str] = ()) -> List[Tuple[str, object, object]]:
    """(key, old value, new value) for each identity key that differs ('<absent>' for a missing key)."""
    ignore = set(ignore)
    keys = list(new) + [k for k in old if k not in new]
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in keys
            if k not in ignore and old.get(k, "<absent>") != new.get(k, "<absent>")]


def _label(key: str, value) -> str:
    if isinstance(value, str):
        value = osp.splitext(osp.basename(value.rstrip("/")))[0] if "/" in value else value
    elif isinstance(value, (list, tuple)):
        value = "_".join(str(v) for v in value)
    value = re.sub(r"[^A-Za-z0-9._]+", "_", str(value)).strip("_")[:20]
    return f"{key}{value}" if re.match(r"[-0-9.]", value or "x") else f"{key}_{value}"


def run_name(method: str, ident: Dict[str, object], base: Dict[str, object], overridden: Iterable[str] = ()) -> str:
    """`method` for the experiment's own settings (`base`), else `method-<last 2 overridden keys>[+N]-<hash>`,
    the hash over every overridden identity value that differs from base."""
    diff = [k for k, _, _ in differences(base, ident)]
    if not diff:
        return method
    shown = [k for k in dict.fromkeys(overridden) if k in diff] or diff
    # the last two overridden keys (command-line overrides come last): what sets a variant apart, usually
    label = "-".join(_label(k, ident.get(k)) for k in shown[-2:]) + (f"+{len(shown) - 2}" if len(shown) > 2 else "")
    # over the overridden values, not the derived ones (partition=16 also changes the lists' absolute paths):
    # the same overrides name the same folder wherever the repository is
    digest = hashlib.sha1(json.dumps({k: ident.get(k) for k in shown}, sort_keys=True).encode()).hexdigest()[:4]
    return "-".join([method, label, digest])


# ----------------------------------------------------------------------------------------------- folder
def checkpoints(output_dir: str) -> List[str]:
    """The checkpoint files of a run folder (complete ones: not the temporaries of an interrupted write)."""
    return sorted(glob.glob(osp.join(output_dir, "snapshot", "*.pth")))


def recorded_identity(output_dir: str) -> Tuple[Optional[Dict[str, object]], Optional[str], Tuple[str, ...]]:
    """(identity, the file it comes from, keys not to compare) of the run in a folder: its run.json, or for a
    folder written before run.json existed, the config saved in its last checkpoint (whose `amp` was
    already resolved to the device). (None, None, ()) if the folder holds neither."""
    path = osp.join(output_dir, RUN_FILE)
    if osp.isfile(path):
        with open(path) as f:
            return {**ADDED_KEYS, **json.load(f)["identity"]}, path, ()
    ckpts = checkpoints(output_dir)
    if ckpts:
        from furnace.checkpoint import load_checkpoint
        last = osp.join(output_dir, "snapshot", "last.pth")
        path = last if last in ckpts else ckpts[-1]
        config = load_checkpoint(path).get("config")
        if config:
            return {**ADDED_KEYS, **identity(config)}, path, ("amp",)
    return None, None, ()


def _fmt(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_folder(C, what: str = "training") -> None:
    """Refuse a folder whose checkpoints belong to a run of another identity, listing the keys that differ."""
    out = C.output_dir
    old, source, ignore = recorded_identity(out)
    if old is None or not checkpoints(out):
        return
    diff = differences(old, identity(C), ignore)
    if diff:
        lines = "\n".join(f"  {k}: {_fmt(a)} there, {_fmt(b)} now" for k, a, b in diff)
        raise RunRefused(
            f"{out} holds a run with other settings ({source}); {what} would mix the two runs:\n{lines}\n"
            f"To run these settings beside it, leave output_dir at its default ('{{exp_dir}}/output/{{run}}' names "
            f"one folder per settings) or set output_dir=ANOTHER_FOLDER; to replace that run, delete {out}.")


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (/proc/cpuinfo), else platform.processor()."""
    try:
        fields = {}
        with open("/proc/cpuinfo") as f:
            for line in f:  # one block per logical CPU, all alike: the first holds the answer
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    except OSError:
        import platform
        return platform.processor() or "unknown"


def write_identity(C) -> None:
    """<output_dir>/run.json: the run's identity and how it was started (atomic write)."""
    import torch
    # the CPU and the thread count set the floating-point order, which alone moves a tiny run's mIoU
    record = {"identity": identity(C), "experiment": C.exp_name, "output_dir": C.output_dir,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
              "cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "command": sys.argv}
    path = osp.join(C.output_dir, RUN_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive flock on a file that names its holder. The kernel releases it when the holder's process
    dies (also by SIGKILL): a stale file never blocks. (Processes forked by the holder, such as DataLoader
    workers, share the lock until they exit.)"""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self) -> None:
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise RunRefused(self._held_message(holder)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                print(f"warning: {self.path}: this file system has no locks ({e}); a second trainer on this "
                      f"folder would not be refused", file=sys.stderr)
            try:  # the holder may have removed the file between our open and our lock: lock the new one
                if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            break
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd

    def _held_message(self, holder: str) -> str:
        try:
            info = json.loads(holder)
            who = f"pid {info['pid']} on host {info['host']}, since {info['since']}: {' '.join(info['command'])}"
        except (ValueError, KeyError, TypeError):
            who = "a process that has not written its name yet"
        return (f"another trainer is running on this run's folder: {self.path} is held by {who}. "
                f"Wait for it to finish or stop it; the lock goes with its process, even after a crash.")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self.fd)  # drops the flock
        self.fd = None


@contextlib.contextmanager
def claim(C, resume: bool, rank: int = 0):
    """Hold C.output_dir for one training: lock it, refuse another run's checkpoints or (without --resume)
    any checkpoints, record run.json. Only the run's rank 0 does this; the other ranks pass through."""
    if rank != 0:
        yield
        return
    os.makedirs(C.output_dir, exist_ok=True)
    lock = RunLock(osp.join(C.output_dir, LOCK_FILE))
    lock.acquire()
    try:
        check_folder(C)
        existing = checkpoints(C.output_dir)
        if existing and not resume:
            names = ", ".join(osp.basename(p) for p in existing)
            raise RunRefused(
                f"{C.output_dir} already holds a run (snapshot/{names}); not overwriting it. `--resume` continues "
                f"it (script.sh does); to start over, delete {C.output_dir}; to run a variant beside it, change "
                f"its settings (each has its own folder) or set output_dir=ANOTHER_FOLDER.")
        if not existing or not osp.isfile(osp.join(C.output_dir, RUN_FILE)):
            write_identity(C)  # a resumed run keeps the record of its start
        yield
    finally:
        lock.release()


# -------------------------------------------------------------------------------------- no orphans
def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent dies (Linux); exit at once if the parent
    is already gone. Returns whether it is armed."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    if armed and os.getppid() != parent:
        os._exit(1)  # the parent died before the signal was armed
    return armed


# -------------------------------------------------------------------------------------------- SLURM
def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[07-09,12],cpu1' -> 'gpu07'), without scontrol."""
    m = re.match(r"([^,\[]*)(?:\[([^,\]-]*))?", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"cannot read the first host of the SLURM node list {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def slurm_launch(env: Dict[str, str]) -> Dict[str, str]:
    """The launch variables of tools/run_experiment.sh inside a SLURM allocation, from SLURM's variables.

    Outside SLURM (no SLURM_JOB_ID) or in a one-node allocation outside an srun step: nothing (script.sh runs
    as on any machine). In the batch script (or salloc shell) of a multi-node allocation: RUN_EXPERIMENT_SRUN=1 and NNODES,
    MASTER_ADDR and MASTER_PORT: the script re-runs itself through srun, one task per node. In an srun step
    (SLURM_STEP_ID set), each task is one node's launcher: NNODES, NODE_RANK (SLURM_NODEID), MASTER_ADDR (the
    step's first host), MASTER_PORT (29500 + job id mod 10000: the same on every node, and two jobs sharing a
    node rarely collide), NGPUS (SLURM_GPUS_ON_NODE when SLURM says it). A variable already set wins."""
    if "SLURM_JOB_ID" not in env:
        return {}
    in_step = "SLURM_STEP_ID" in env
    nodes = int(env.get("SLURM_STEP_NUM_NODES" if in_step else "SLURM_NNODES", env.get("SLURM_NNODES", "1")))
    if not in_step and nodes == 1:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST" if in_step else "SLURM_JOB_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist and "MASTER_ADDR" not in env:
        raise ValueError("SLURM allocation without SLURM_JOB_NODELIST: set MASTER_ADDR")
    out = {"NNODES": str(nodes), "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
           "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(env["SLURM_JOB_ID"]) % 10000)}
    if not in_step:
        return {**{k: env.get(k) or v for k, v in out.items()}, "RUN_EXPERIMENT_SRUN": "1"}
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", nodes)))
    if tasks != nodes:
        raise ValueError(f"this srun step runs {tasks} tasks on {nodes} nodes; script.sh starts one torchrun per "
                         f"node, which starts the node's processes: run it with srun --ntasks-per-node=1 (or from "
                         f"the batch script, which does that itself)")
    out["NODE_RANK"] = env.get("SLURM_NODEID", env.get("SLURM_PROCID", "0"))
    gpus = env.get("SLURM_GPUS_ON_NODE")
    if gpus and gpus.isdigit() and int(gpus) > 0:
        out["NGPUS"] = gpus
    return {k: env.get(k) or v for k, v in out.items()}


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--slurm-env"]:  # shell assignments for run_experiment.sh to eval
        import shlex
        try:
            print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in slurm_launch(dict(os.environ)).items()), end="")
        except ValueError as e:
            sys.exit(f"run_experiment.sh: {e}")
        return
    if len(argv) < 3 or argv[:2] != ["--die-with-parent", "--"]:
        sys.exit("usage: python -m furnace.run --die-with-parent -- COMMAND [ARG ...] | --slurm-env")
    die_with_parent()
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main()
