"""Shared machinery of tools/prepare_voc.py, prepare_cityscapes.py and prepare_custom.py (a tools/ module, not
part of the furnace library: no training run needs it).

The dataset tools only decide *which* archive member goes *where*; this module does the rest:

- `open_source`: an official archive (.tar, .tar.gz/.tgz, .zip) or its extracted folder behind one interface.
  Tar archives are read as a stream, so each member is read once and nothing is extracted that is not needed;
  a truncated or corrupt archive becomes a `PrepareError` naming the file.
- atomic writes (`write_bytes_atomic`, `save_index_png`) so an interrupted run never leaves a half-written
  file that a re-run would mistake for finished work, and cheap completeness checks for re-runs.
- a manifest (`.prepared.json` in the output folder) recording every output file with its size and the
  per-image class histograms; a re-run whose manifest still matches the disk skips the archives entirely.
- `TaskPool`: label decoding/encoding in a few threads while the main thread streams the archive.
- partitions: the published lists shipped in furnace/data/published_splits/ when the training list is the
  published one, seeded ones otherwise or on request, or a user's folder of published lists (one protocol of
  several by name); their class-frequency balance, and the count check.
- `cli_main`: a preparer's main, with a PrepareError reported as a message and exit status 1.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import lzma
import os
import re
import sys
import tarfile
import zipfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

import furnace.data
from furnace.data.splits import PARTITIONS, partition, partition_paths, read_list, write_list

MANIFEST_NAME = ".prepared.json"
MANIFEST_VERSION = 1

# Errors that reading a damaged archive raises (bz2 reports bad data as a plain OSError; gzip.BadGzipFile
# is an OSError too). They are caught only around archive reads, never around our own writes.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_SIGNATURE = b"\xff\xd8\xff"


class PrepareError(RuntimeError):
    """A dataset cannot be prepared: missing/damaged archive, missing files, unexpected counts."""


# ----------------------------------------------------------------------------------------------- sources
@dataclass
class Member:
    """One file of a source. `read()` is valid only until the next member is requested (tar streams)."""

    name: str  # '/'-separated path inside the archive, or relative to the folder
    size: int
    fs_path: Optional[Path]  # the file on disk for a folder source, else None
    _read: Callable[[], bytes]

    def read(self) -> bytes:
        return self._read()


class _CountingReader:
    """File wrapper counting the bytes read, so a tar stream can show progress in archive bytes."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        return data


def _archive_kind(path: Path) -> str:
    """'zip', 'tar' (uncompressed), 'tar-compressed', judged from the first bytes, not the file name."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise PrepareError(f"{path} is empty")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b") or head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ\x00"):
        return "tar-compressed"
    if len(head) == 512 and head[257:262] == b"ustar":
        return "tar"
    raise PrepareError(f"{path} is neither a tar nor a zip archive nor a folder (or its first block is damaged)")


def _tar_ended_cleanly(tf: tarfile.TarFile) -> bool:
    """After iterating `tf` to its end: was the end a zero block (the end-of-archive marker), or did the data
    simply run out? tarfile stops silently in the second case when the cut falls between members."""
    pos = getattr(tf.fileobj, "pos", None)  # stream mode: bytes of the (decompressed) stream consumed
    if pos is not None:
        return pos >= tf.offset + tarfile.BLOCKSIZE
    tf.fileobj.seek(tf.offset)
    return tf.fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


class Source:
    """An official archive or its extracted folder. `what` names it in messages (e.g. 'SBD archive')."""

    def __init__(self, path, what: str, hint: str = ""):
        self.path = Path(path)
        self.what = what
        if not self.path.exists():
            raise PrepareError(f"{what} not found: {self.path}" + (f" ({hint})" if hint else ""))
        self.kind = "dir" if self.path.is_dir() else _archive_kind(self.path)
        self.ended_cleanly = True  # set False when a tar read ends without its end-of-archive block
        self.last_member: Optional[str] = None  # the last tar member read, for the truncation message

    def __str__(self) -> str:
        return f"{self.what} {self.path}"

    def damaged(self, err: BaseException) -> PrepareError:
        if self.kind == "dir":
            return PrepareError(f"cannot read a file of {self}: {err}")
        return PrepareError(
            f"{self} is truncated or corrupt ({type(err).__name__}: {err}); download it again")

    # -- iteration ------------------------------------------------------------------------------------
    def members(self, desc: str = "") -> Iterator[Member]:
        """Every regular file, in archive order, with a progress bar. Read a member before asking for the next."""
        desc = desc or f"reading {self.path.name}"
        if self.kind == "dir":
            yield from self._dir_members(desc)
        elif self.kind == "zip":
            yield from self._zip_members(desc)
        else:
            yield from self._tar_members(desc)

    def _dir_members(self, desc: str) -> Iterator[Member]:
        files = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            files.extend(Path(dirpath) / f for f in sorted(filenames))
        for fp in tqdm(files, desc=desc, unit="file", mininterval=1.0):
            rel = fp.relative_to(self.path).as_posix()

            def read(fp=fp) -> bytes:
                try:
                    return fp.read_bytes()
                except OSError as e:
                    raise self.damaged(e) from e

            yield Member(rel, fp.stat().st_size, fp, read)

    def _zip_members(self, desc: str) -> Iterator[Member]:
        try:
            zf = zipfile.ZipFile(self.path)
            infos = [i for i in zf.infolist() if not i.is_dir()]
        except _ARCHIVE_ERRORS as e:
            raise self.damaged(e) from e
        with zf, tqdm(total=sum(i.compress_size for i in infos), desc=desc, unit="B", unit_scale=True,
                      mininterval=1.0) as bar:
            for info in infos:
                def read(info=info) -> bytes:
                    try:
                        return zf.read(info)
                    except _ARCHIVE_ERRORS as e:
                        raise self.damaged(e) from e

                yield Member(info.filename, info.file_size, None, read)
                bar.update(info.compress_size)

    def _tar_members(self, desc: str) -> Iterator[Member]:
        # Stream mode ('r|*'): one forward pass, whatever the compression, so a .tgz is decompressed once.
        with open(self.path, "rb") as raw, tqdm(total=self.path.stat().st_size, desc=desc, unit="B",
                                                 unit_scale=True, mininterval=1.0) as bar:
            counter = _CountingReader(raw)
            try:
                tf = tarfile.open(fileobj=counter, mode="r|*")
            except _ARCHIVE_ERRORS as e:
                raise self.damaged(e) from e
            with tf:
                it = iter(tf)
                while True:
                    try:
                        info = next(it)
                    except StopIteration:
                        break
                    except _ARCHIVE_ERRORS as e:
                        raise self.damaged(e) from e
                    bar.update(counter.count - bar.n)
                    self.last_member = info.name
                    if not info.isfile():
                        continue

                    def read(info=info) -> bytes:
                        try:
                            data = tf.extractfile(info).read()
                        except _ARCHIVE_ERRORS as e:
                            raise self.damaged(e) from e
                        if len(data) != info.size:
                            raise self.damaged(EOFError(f"{info.name}: {len(data)} of {info.size} bytes"))
                        return data

                    yield Member(info.name, info.size, None, read)
                bar.update(counter.count - bar.n)
                self.ended_cleanly = _tar_ended_cleanly(tf)

    def cheap_names(self) -> Optional[List[str]]:
        """Every file name without reading any data (a folder walk, a zip's directory), or None for a tar,
        which would have to be read through."""
        if self.kind == "dir":
            return [(Path(d) / f).relative_to(self.path).as_posix()
                    for d, _, files in os.walk(self.path) for f in files]
        if self.kind == "zip":
            try:
                with zipfile.ZipFile(self.path) as zf:
                    return [i.filename for i in zf.infolist() if not i.is_dir()]
            except _ARCHIVE_ERRORS as e:
                raise self.damaged(e) from e
        return None

    def check_complete(self) -> None:
        """After a full pass: a tar that ended without its end-of-archive marker is an error naming it, even
        when every file the tool needed came before the cut (tarfile itself stops silently at a member
        boundary)."""
        if not self.ended_cleanly:
            after = f" after {self.last_member}" if self.last_member else ""
            raise PrepareError(f"{self} is truncated (it stops{after}, before its end-of-archive marker); "
                               "download it again")

    # -- small files (split lists) --------------------------------------------------------------------
    def find(self, patterns: Mapping[str, Tuple[str, str]], hint: str = "") -> Dict[str, Tuple[str, bytes]]:
        """Read the small files matching `patterns` {key: (regex on member name, human description)}.

        Returns {key: (member name, bytes)}. A pattern with no match is an error naming the source (wrong or
        incomplete archive); two matches is an error too (e.g. a folder holding two dataset copies).
        A compressed tar is streamed only until every pattern has matched. `hint` ends the message of a
        missing file (e.g. which folder to pass)."""
        regexes = {k: re.compile(rx) for k, (rx, _) in patterns.items()}
        found: Dict[str, Tuple[str, bytes]] = {}

        def visit(name: str, read: Callable[[], bytes]) -> None:
            for key, rx in regexes.items():
                if rx.search(name):
                    if key in found:
                        raise PrepareError(f"{self} holds several files matching {patterns[key][1]}: "
                                           f"{found[key][0]} and {name}; point to a single dataset copy")
                    found[key] = (name, read())

        if self.kind == "dir":
            for dirpath, dirnames, filenames in os.walk(self.path):
                for f in filenames:
                    fp = Path(dirpath) / f
                    visit(fp.relative_to(self.path).as_posix(), fp.read_bytes)
        elif self.kind == "zip":
            try:
                with zipfile.ZipFile(self.path) as zf:
                    for info in zf.infolist():
                        visit(info.filename, lambda info=info: zf.read(info))
            except _ARCHIVE_ERRORS as e:
                raise self.damaged(e) from e
        elif self.kind == "tar":
            # Uncompressed: random access mode seeks from header to header, reading no image data.
            try:
                with tarfile.open(self.path, "r:") as tf:
                    for info in tf:
                        self.last_member = info.name
                        if info.isfile():
                            visit(info.name, lambda info=info: tf.extractfile(info).read())
                    self.ended_cleanly = _tar_ended_cleanly(tf)
            except _ARCHIVE_ERRORS as e:
                raise self.damaged(e) from e
        else:
            for m in self.members(desc=f"looking for the split lists in {self.path.name}"):
                visit(m.name, m.read)
                if len(found) == len(regexes):
                    break
        missing = [patterns[k][1] for k in regexes if k not in found]
        if missing and not self.ended_cleanly:
            raise PrepareError(f"{self} is truncated (it stops before its end-of-archive marker) and lacks "
                               f"{', '.join(missing)}; download it again")
        if missing:
            raise PrepareError(f"{self} has no {', '.join(missing)}; "
                               + (hint or "is it the right (and complete) download?"))
        return found


def open_source(path, what: str, hint: str = "") -> Source:
    return Source(path, what, hint)


def parse_names(data: bytes, where: str) -> List[str]:
    """Names in an official split list (one per line, blank lines ignored)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{where} is not a text file ({e})") from e
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise PrepareError(f"{where} is empty")
    if len(set(names)) != len(names):
        raise PrepareError(f"{where} lists some names twice")
    return names


def incomplete_error(missing: Mapping[str, Sequence[str]], sources: Sequence[Source]) -> PrepareError:
    """The error for files the split lists promise but the sources lack: {description: [file, ...]}."""
    lines = [f"{len(v)} missing: {what}, e.g. {', '.join(v[:3])}" for what, v in missing.items() if v]
    cut = [f"{s} is truncated (it stops before its end-of-archive marker)" for s in sources if not s.ended_cleanly]
    cause = "; ".join(cut) + "; download it again" if cut else "truncated or incomplete downloads?"
    return PrepareError(f"files are missing ({cause}):\n  " + "\n  ".join(lines))


# ------------------------------------------------------------------------------------------------ writes
def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename: a file that exists is a finished file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_index_png(path: Path, label: np.ndarray) -> None:
    """Save an HxW uint8 array of class indices as a single-channel ('L') PNG, atomically."""
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"{path}: expected an HxW uint8 label, got {label.dtype} {label.shape}")
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def png_complete(path: Path) -> bool:
    """Cheap check that a PNG we wrote is whole: signature at the start, IEND chunk at the end."""
    try:
        size = path.stat().st_size
        if size < len(_PNG_SIGNATURE) + len(_PNG_IEND):
            return False
        with open(path, "rb") as f:
            head = f.read(len(_PNG_SIGNATURE))
            f.seek(size - len(_PNG_IEND))
            tail = f.read()
        return head == _PNG_SIGNATURE and tail == _PNG_IEND
    except OSError:
        return False


def copy_done(path: Path, size: int) -> bool:
    """A copied member is done when the output exists with the member's size (writes are atomic)."""
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def check_magic(data: bytes, kind: str, where: str) -> None:
    sig = {"jpg": _JPEG_SIGNATURE, "png": _PNG_SIGNATURE}[kind]
    if not data.startswith(sig):
        raise PrepareError(f"{where} is not a {kind.upper()} file")


def decode_png(data: bytes, where: str, modes: Sequence[str] = ("P", "L")) -> np.ndarray:
    """PNG bytes -> HxW uint8 array. A palette ('P') PNG gives its indices, not colours."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for damaged data
        raise PrepareError(f"cannot decode {where}: {e}") from e
    if img.mode not in modes:
        raise PrepareError(f"{where}: expected a PNG of mode {' or '.join(modes)} (class indices), got {img.mode}")
    return np.asarray(img, dtype=np.uint8)


def read_index_png(path: Path) -> np.ndarray:
    return decode_png(path.read_bytes(), str(path))


def class_histogram(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel count per class; values >= num_classes (the ignore value 255) are not counted."""
    counts = np.bincount(label.ravel(), minlength=256)
    return counts[:num_classes].astype(np.int64)


def check_same_sizes(pairs: Sequence[Tuple[Path, Path]], desc: str = "checking image/label sizes") -> None:
    """Every (image, label) pair must have the same width and height (read from the headers only)."""
    bad = []
    for img, lbl in tqdm(pairs, desc=desc, unit="pair", mininterval=1.0):
        with Image.open(img) as a, Image.open(lbl) as b:
            if a.size != b.size:
                bad.append(f"{img} {a.size} vs {lbl} {b.size}")
    if bad:
        raise PrepareError(f"{len(bad)} labels do not match their image size, e.g. " + "; ".join(bad[:3]))


# --------------------------------------------------------------------------------------------- thread pool
class TaskPool:
    """Runs conversion tasks in `workers` threads (PIL and zlib release the GIL) with a bounded backlog, so
    the archive stream never runs far ahead of the writers. workers=0 runs tasks inline. Results are
    returned in submission order by `finish()`; the first task error is raised there (or at submit)."""

    def __init__(self, workers: int):
        self.workers = max(0, int(workers))
        self.executor = ThreadPoolExecutor(self.workers) if self.workers else None
        self.pending: deque = deque()
        self.results: list = []

    def submit(self, fn: Callable, *args) -> None:
        if self.executor is None:
            self.results.append(fn(*args))
            return
        self.pending.append(self.executor.submit(fn, *args))
        while len(self.pending) > 4 * self.workers:
            self.results.append(self.pending.popleft().result())

    def finish(self) -> list:
        while self.pending:
            self.results.append(self.pending.popleft().result())
        out, self.results = self.results, []
        return out

    def __enter__(self) -> "TaskPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.executor is not None:
            if exc_type is not None:
                for fut in self.pending:
                    fut.cancel()
            self.executor.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------- manifest
def load_manifest(out: Path, dataset: str) -> Optional[dict]:
    """The manifest of a finished run, or None (absent, unreadable, other dataset or version)."""
    try:
        data = json.loads((Path(out) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != MANIFEST_VERSION or data.get("dataset") != dataset:
        return None
    return data


def verify_manifest(out: Path, manifest: dict) -> List[str]:
    """Files of the manifest that are missing or changed size (a stat per file, no reading)."""
    out = Path(out)
    bad = []
    for rel, size in manifest["files"].items():
        try:
            if (out / rel).stat().st_size != size:
                bad.append(rel)
        except OSError:
            bad.append(rel)
    return bad


def save_manifest(out: Path, dataset: str, files: Sequence[Path], lists: Mapping[str, Sequence[str]],
                  hists: Mapping[str, np.ndarray], class_names: Sequence[str]) -> dict:
    out = Path(out)
    data = {
        "version": MANIFEST_VERSION,
        "dataset": dataset,
        "class_names": list(class_names),
        "lists": {k: list(v) for k, v in lists.items()},
        "files": {p.relative_to(out).as_posix(): p.stat().st_size for p in files},
        "hist": {k: [int(x) for x in v] for k, v in hists.items()},
    }
    tmp = out / (MANIFEST_NAME + ".part")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, out / MANIFEST_NAME)
    return data


def try_skip(out: Path, dataset: str, force: bool) -> Optional[dict]:
    """The manifest if a previous run finished and every file it lists is still there, else None."""
    if force:
        return None
    manifest = load_manifest(out, dataset)
    if manifest is None:
        return None
    bad = verify_manifest(out, manifest)
    if bad:
        print(f"{len(bad)} prepared files are missing or changed (e.g. {bad[0]}); preparing them again")
        return None
    print(f"{out} was prepared before and its {len(manifest['files'])} files are intact; archives not read")
    return manifest


# ------------------------------------------------------------------------------------------------- counts
def check_counts(counts: Mapping[str, int], expected: Mapping[str, Optional[int]], dataset: str) -> None:
    """Print the counts; any that differs from its expected value (None = not checked) is an error."""
    wrong = []
    for split, n in counts.items():
        exp = expected.get(split)
        status = "not checked" if exp is None else ("ok" if n == exp else f"EXPECTED {exp}")
        print(f"{dataset} {split}: {n} images ({status})")
        if exp is not None and n != exp:
            wrong.append(f"{split} has {n} images, expected {exp}")
    if wrong:
        raise PrepareError(f"{dataset}: " + "; ".join(wrong) +
                           " (an incomplete or different download? pass --expect-train/--expect-val to accept it)")


# ---------------------------------------------------------------------------------------------- partitions
@dataclass
class Partition:
    denominator: int
    labeled: List[str]
    unlabeled: List[str]
    source: str  # 'seed N' or the published file(s) it came from
    shared: List[str] = field(default_factory=list)  # images in both lists (as some published lists have)


# The published partition lists shipped with the project (see published_splits/SOURCE.md), per dataset:
# the folder and the name of the published training list that decides whether they apply. They stay package
# data of furnace.data (pyproject.toml), beside splits.py, so an installed furnace still carries them.
PUBLISHED_ROOT = Path(furnace.data.__file__).resolve().parent / "published_splits"
DEFAULT_PROTOCOL = "train_aug"  # the protocol every later paper compares on (the pseudoseg_* lists are another)
SOURCES = ("auto", "published", "seeded")


@dataclass
class PublishedLists:
    folder: Path  # {protocol}_labeled_1-D.txt, {protocol}_unlabeled_1-D.txt and the training list
    train_list: str  # file name of the published training list, e.g. 'train_aug.txt'


def shipped_published(dataset: str) -> Optional[PublishedLists]:
    """The shipped published lists of 'pascal_voc' or 'cityscapes'; None for any other dataset."""
    return {"pascal_voc": PublishedLists(PUBLISHED_ROOT / "voc", "train_aug.txt"),
            "cityscapes": PublishedLists(PUBLISHED_ROOT / "cityscapes", "train.txt")}.get(dataset)


@dataclass
class PartitionChoice:
    """Where the partitions come from (the command-line options of the prepare tools).

    source 'auto': the published lists when the training list is the published one, else seeded;
    'published': the published lists whatever the training list (an image they name that the set lacks is
    an error); 'seeded': `partition(train, d, seed)`. A seed given with 'auto' means 'seeded'.
    partition_dir: a user's folder of published lists, used as is (source must not be 'seeded').
    protocol: which protocol of a folder holding several (e.g. 'train_aug', 'pseudoseg')."""

    source: str = "auto"
    seed: Optional[int] = None
    protocol: Optional[str] = None
    partition_dir: Optional[Path] = None
    published: Optional[PublishedLists] = None


_FRACTION = re.compile(r"(?<![0-9])1[-_](\d+)(?![0-9])")
_FRACTION_DIR = re.compile(r"1[-_]\d+")
_KIND = re.compile(r"[_-]?(un)?labeled", re.IGNORECASE)


def protocol_of(rel: str) -> str:
    """The protocol a partition file belongs to, from its path relative to the partition folder: the path
    without the fraction and the (un)labeled word. 'train_aug_labeled_1-8.txt' -> 'train_aug',
    'pseudoseg_unlabeled_1-8.txt' -> 'pseudoseg', 'labeled_1-8.txt' and '1_8/labeled.txt' -> ''."""
    parts = rel.split("/")
    dirs = [p for p in parts[:-1] if not _FRACTION_DIR.fullmatch(p)]
    stem = parts[-1][:-4] if parts[-1].lower().endswith(".txt") else parts[-1]
    stem = _FRACTION.sub("", _KIND.sub("", stem)).strip("_-. ")
    return "/".join(dirs + ([stem] if stem else []))


def _protocol_name(p: str) -> str:
    return repr(p) if p else "'' (unnamed)"


def published_protocols(partition_dir: Path) -> Dict[str, Dict[Tuple[int, str], List[Path]]]:
    """Partition files under `partition_dir` by protocol, then by (denominator, 'labeled'|'unlabeled')."""
    out: Dict[str, Dict[Tuple[int, str], List[Path]]] = {}
    for p in sorted(Path(partition_dir).rglob("*.txt")):
        rel = p.relative_to(partition_dir).as_posix()
        m = _FRACTION.search(rel)
        if not m:
            continue
        low = rel.lower()
        kind = "unlabeled" if "unlabeled" in low else ("labeled" if "labeled" in low else None)
        if kind:
            out.setdefault(protocol_of(rel), {}).setdefault((int(m.group(1)), kind), []).append(p)
    return out


def find_published(partition_dir: Path, protocol: Optional[str] = None,
                   prefer: Optional[str] = DEFAULT_PROTOCOL, what: str = "--partition-dir") -> Dict[Tuple[int, str], Path]:
    """Published partition files under `partition_dir`, keyed by (denominator, 'labeled'|'unlabeled').

    Recognises the usual spellings: labeled_1-8.txt, train_aug_labeled_1-8.txt, 1_8/labeled.txt, ...
    A folder may hold several protocols (train_aug_*, pseudoseg_*): `protocol` picks one by name (its
    files' prefix, or a folder name on their path). Without it, every file is used when no two give the
    same list; otherwise `prefer` when the folder has it; otherwise it is an error listing the protocols."""
    partition_dir = Path(partition_dir)
    if not partition_dir.is_dir():
        raise PrepareError(f"{what} {partition_dir} is not a folder")
    groups = published_protocols(partition_dir)
    names = ", ".join(_protocol_name(p) for p in groups) or "none"
    if protocol is not None:
        want = protocol.lower()
        match = [p for p in groups if p.lower() == want or want in p.lower().split("/")]
        if not match:
            raise PrepareError(f"{what} {partition_dir} has no partition lists of protocol {protocol!r}; "
                               f"its protocols: {names}")
        if len(match) > 1:
            raise PrepareError(f"{what} {partition_dir}: protocol {protocol!r} matches several: "
                               + ", ".join(map(_protocol_name, match)) + "; give one of them in full")
        chosen = groups[match[0]]
    else:
        merged: Dict[Tuple[int, str], List[Path]] = {}
        for g in groups.values():
            for k, v in g.items():
                merged.setdefault(k, []).extend(v)
        if len(groups) > 1 and any(len(v) > 1 for v in merged.values()):
            if prefer is not None and prefer in groups:
                chosen = groups[prefer]
            else:
                raise PrepareError(f"{what} {partition_dir} holds the lists of several protocols ({names}); "
                                   "choose one with --protocol NAME")
        else:
            chosen = merged
    dup = {k: v for k, v in chosen.items() if len(v) > 1}
    if dup:
        (d, kind), paths = next(iter(dup.items()))
        raise PrepareError(f"{what} {partition_dir}: several {kind} lists for 1/{d}: "
                           + ", ".join(map(str, paths)) + "; point to the folder of one protocol")
    return {k: v[0] for k, v in chosen.items()}


def list_tokens(path: Path) -> List[str]:
    """First token of each line of a published list (a bare name, or the image path of 'image label')."""
    try:
        lines = read_list(path)
    except (OSError, ValueError) as e:
        raise PrepareError(str(e)) from e
    return [line.split()[0] for line in lines]


def load_published(path: Path, key_fn: Callable[[str], Optional[str]], lookup: Mapping[str, str]) -> List[str]:
    """Names of a published list, as is (same order). A line may be a bare name or paths (image first);
    key_fn maps its first token to a key of `lookup` (key -> our name). Unknown names are an error."""
    names = []
    for i, token in enumerate(list_tokens(path), 1):
        key = key_fn(token)
        if key is None or key not in lookup:
            raise PrepareError(f"{path} line {i}: {token!r} is not an image of the training list")
        names.append(lookup[key])
    if len(set(names)) != len(names):
        raise PrepareError(f"{path} lists some images twice")
    return names


def is_published_set(train: Sequence[str], published_train: Sequence[str],
                     key_fn: Callable[[str], Optional[str]]) -> bool:
    """Is the prepared training list the published one, as a set of images? Both are mapped by key_fn
    (e.g. our 'train/jena/jena_000078_000019' and the published '/images/train/jena_000078_000019.png')."""
    ours = {key_fn(n) for n in train}
    theirs = {key_fn(n) for n in published_train}
    return None not in ours and len(ours) == len(train) and ours == theirs


def make_partitions(train: Sequence[str], key_fn: Callable[[str], Optional[str]],
                    denominators: Sequence[int] = PARTITIONS, seed: int = 0,
                    partition_dir: Optional[Path] = None, protocol: Optional[str] = None,
                    what: str = "--partition-dir") -> List[Partition]:
    """For each 1/d: the published lists under partition_dir if there are, else a seeded `partition`.

    With a published labeled list and no unlabeled one, the unlabeled part is the rest of `train`.
    Images in both lists are kept (the published PseudoSeg lists have one) and reported in `shared`."""
    lookup = {}
    for n in train:
        lookup[key_fn(n)] = n
    published = find_published(partition_dir, protocol, what=what) if partition_dir is not None else {}
    if partition_dir is not None and not any(k[1] == "labeled" and k[0] in denominators for k in published):
        raise PrepareError(f"{what} {partition_dir} holds no labeled list for 1/"
                           + ", 1/".join(map(str, denominators)) + " (e.g. labeled_1-8.txt)")
    parts = []
    for d in denominators:
        shared: List[str] = []
        if (d, "labeled") in published:
            lpath = published[(d, "labeled")]
            labeled = load_published(lpath, key_fn, lookup)
            if (d, "unlabeled") in published:
                upath = published[(d, "unlabeled")]
                unlabeled = load_published(upath, key_fn, lookup)
                in_labeled = set(labeled)
                shared = [n for n in unlabeled if n in in_labeled]
                source = f"{lpath} + {upath}"
            else:
                chosen = set(labeled)
                unlabeled = [n for n in train if n not in chosen]
                source = f"{lpath} (unlabeled = the rest)"
        else:
            try:
                labeled, unlabeled = partition(train, d, seed)
            except ValueError as e:
                raise PrepareError(f"partition 1/{d}: {e} (choose others with --partitions)") from e
            source = f"seed {seed}"
        parts.append(Partition(d, labeled, unlabeled, source, shared))
    return parts


@dataclass
class Resolved:
    parts: List[Partition]
    note: str  # one line for the output: which partitions and why


def resolve_partitions(train: Sequence[str], key_fn: Callable[[str], Optional[str]],
                       denominators: Sequence[int], choice: PartitionChoice) -> Resolved:
    """The partitions `choice` asks for, checked against `train` (nothing is written). Every list a
    published folder names must be an image of `train`: an error names the list file and the image."""
    if choice.source not in SOURCES:
        raise PrepareError(f"--partition-source must be one of {', '.join(SOURCES)}, got {choice.source!r}")
    seed = 0 if choice.seed is None else choice.seed
    if choice.partition_dir is not None:
        if choice.source == "seeded":
            raise PrepareError("--partition-dir gives published lists and --partition-source seeded asks for "
                               "generated ones: pass only one of them")
        parts = make_partitions(train, key_fn, denominators, seed, choice.partition_dir, choice.protocol)
        protocols = published_protocols(choice.partition_dir)
        note = f"partitions: the lists in {choice.partition_dir}"
        if choice.protocol is not None:
            note += f", protocol {choice.protocol}"
        if len(protocols) > 1:
            note += ("; the folder holds the protocols " + ", ".join(map(_protocol_name, protocols))
                     + " (choose one with --protocol NAME; default " + DEFAULT_PROTOCOL + ")")
        return Resolved(parts, note)
    explicit_seed = choice.source == "auto" and choice.seed is not None and choice.protocol is None
    if choice.source == "seeded" or explicit_seed:
        if choice.protocol is not None:
            raise PrepareError(f"--protocol {choice.protocol} chooses published lists and --partition-source "
                               "seeded asks for generated ones: pass only one of them")
        return Resolved(make_partitions(train, key_fn, denominators, seed),
                        f"partitions: seeded (seed {seed}), as asked")
    pub = choice.published
    if pub is None:
        if choice.source == "published" or choice.protocol is not None:
            raise PrepareError("no published partition lists are known for this dataset")
        return Resolved(make_partitions(train, key_fn, denominators, seed), f"partitions: seeded (seed {seed})")
    train_path = Path(pub.folder) / pub.train_list
    if not train_path.is_file():
        raise PrepareError(f"the published lists are incomplete: {train_path} is missing")
    published_train = list_tokens(train_path)
    same = is_published_set(train, published_train, key_fn)
    protocol = DEFAULT_PROTOCOL if choice.protocol is None else choice.protocol
    if not same and choice.source == "auto" and choice.protocol is None:
        return Resolved(make_partitions(train, key_fn, denominators, seed),
                        f"partitions: seeded (seed {seed}), since the training list ({len(train)} images) is not "
                        f"the published one ({train_path}, {len(published_train)} images); "
                        "--partition-source published installs the published lists anyway")
    have = {d for d, kind in find_published(pub.folder, protocol, what="published lists") if kind == "labeled"}
    if not have & set(denominators) and choice.source == "auto" and choice.protocol is None:
        return Resolved(make_partitions(train, key_fn, denominators, seed),
                        f"partitions: seeded (seed {seed}), since the published lists ({pub.folder}) have no 1/"
                        + ", 1/".join(map(str, denominators)))
    parts = make_partitions(train, key_fn, denominators, seed, pub.folder, protocol, what="published lists")
    why = ("the training list is the published one" if same else
           f"as asked, though the training list ({len(train)} images) is not the published one "
           f"({len(published_train)} images)")
    return Resolved(parts, f"partitions: the published {protocol} lists shipped in {pub.folder} ({why}); "
                    "--partition-source seeded [--seed N] generates others")


def balance_table(parts: Sequence[Partition], hists: Mapping[str, np.ndarray], train: Sequence[str],
                  class_names: Sequence[str]) -> Tuple[str, Dict[int, float]]:
    """Class-frequency balance of each labeled part against the whole training set.

    For class c, f_S(c) = pixels of c in S / labelled pixels in S. The table gives f_train(c) and, per
    partition, f_labeled(c) - f_train(c) in percentage points; the last row is max_c |difference|."""
    def freq(names) -> np.ndarray:
        total = np.zeros(len(class_names), dtype=np.int64)
        for n in names:
            total += np.asarray(hists[n], dtype=np.int64)
        s = total.sum()
        return total / s if s else total.astype(np.float64)

    whole = freq(train)
    diffs = {p.denominator: freq(p.labeled) - whole for p in parts}
    width = max(len(c) for c in class_names)
    head = f"{'class':<{width}}  {'all %':>7}" + "".join(f"  {'1/%d diff' % p.denominator:>10}" for p in parts)
    lines = [head, "-" * len(head)]
    for c, name in enumerate(class_names):
        lines.append(f"{name:<{width}}  {100 * whole[c]:7.2f}"
                     + "".join(f"  {100 * diffs[p.denominator][c]:+10.2f}" for p in parts))
    max_abs = {d: float(np.abs(v).max()) for d, v in diffs.items()}
    lines.append("-" * len(head))
    lines.append(f"{'max |diff|':<{width}}  {'':>7}" + "".join(f"  {100 * max_abs[p.denominator]:10.2f}"
                                                             for p in parts))
    return "\n".join(lines), max_abs


def write_lists_and_partitions(list_dir: Path, lists: Mapping[str, Sequence[str]], train_key: str,
                               hists: Mapping[str, np.ndarray], class_names: Sequence[str],
                               key_fn: Callable[[str], Optional[str]], denominators: Sequence[int],
                               choice: PartitionChoice) -> dict:
    """Resolve the partitions (any error comes before a file is written), then write lists/<split>.txt for
    every split and the partitions, and print which partitions these are and the balance report."""
    list_dir = Path(list_dir)
    train = list(lists[train_key])
    resolved = resolve_partitions(train, key_fn, denominators, choice)
    parts = resolved.parts
    for split, names in lists.items():
        write_list(list_dir / f"{split}.txt", names)
    print(resolved.note)
    for p in parts:
        lpath, upath = partition_paths(list_dir, p.denominator)
        write_list(lpath, p.labeled)
        write_list(upath, p.unlabeled)
        print(f"partition 1/{p.denominator}: {len(p.labeled)} labeled, {len(p.unlabeled)} unlabeled ({p.source})")
        if p.shared:
            print(f"  note: {len(p.shared)} image(s) in both lists, kept as published: {', '.join(p.shared[:5])}")
    table, max_abs = balance_table(parts, hists, train, class_names)
    print("class-frequency balance: pixel share of each class in the whole training set, and the labeled "
          "part's share minus it (percentage points)")
    print(table)
    return {
        "counts": {k: len(v) for k, v in lists.items()},
        "partitions": {p.denominator: (len(p.labeled), len(p.unlabeled), p.source) for p in parts},
        "partition_note": resolved.note,
        "max_balance_diff": max_abs,
    }


# ------------------------------------------------------------------------------------------------- CLI
def cli_main(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a preparer's `main(argv)`: a PrepareError becomes 'error: ...' on stderr and exit status 1,
    since it is the user's data that is wrong and a traceback would only hide the message."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except PrepareError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return wrapped


def add_partition_args(parser: argparse.ArgumentParser) -> None:
    """The options that choose the partitions (PartitionChoice), shared by every preparer."""
    parser.add_argument("--partition-source", choices=SOURCES, default="auto",
                        help="auto (default): the published partitions shipped with the project when the "
                             "training list is the published one, else seeded ones; published: the shipped "
                             "lists whatever the training list; seeded: generated with --seed")
    parser.add_argument("--protocol", default=None,
                        help=f"which published protocol: {DEFAULT_PROTOCOL} (default) or pseudoseg (VOC); also "
                             "picks one protocol of a --partition-dir folder holding several")
    parser.add_argument("--partition-dir", type=Path, default=None,
                        help="folder of published partition lists (e.g. labeled_1-8.txt, 1_8/labeled.txt), "
                             "used as is; partitions it lacks are generated with --seed")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of generated partitions (default 0; giving it asks for seeded partitions)")
    parser.add_argument("--partitions", type=int, nargs="+", default=list(PARTITIONS),
                        help="denominators d of the 1/d labeled partitions (default 16 8 4 2)")


def add_common_args(parser: argparse.ArgumentParser, out_default: str, expect_train: int, expect_val: int) -> None:
    parser.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    add_partition_args(parser)
    parser.add_argument("--expect-train", type=int, default=expect_train,
                        help=f"expected training images (default {expect_train}; -1 skips the check)")
    parser.add_argument("--expect-val", type=int, default=expect_val,
                        help=f"expected validation images (default {expect_val}; -1 skips the check)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="threads converting labels (0 = none)")
    parser.add_argument("--force", action="store_true", help="redo everything, ignoring earlier outputs")


def partition_choice(args: argparse.Namespace, dataset: str) -> PartitionChoice:
    return PartitionChoice(source=args.partition_source, seed=args.seed, protocol=args.protocol,
                           partition_dir=args.partition_dir, published=shipped_published(dataset))


def expected_or_none(n: int) -> Optional[int]:
    return None if n is not None and n < 0 else n
