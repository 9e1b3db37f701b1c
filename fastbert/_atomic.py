"""Folder-atomic writes and manifests: how every folder fastbert creates is written and recognised.

    with atomic_folder(final, kind="model") as tmp:       # a fresh hidden sibling of `final`
        write the files into tmp
    # here: manifest written last, everything fsynced, tmp swapped in as `final`, the old folder removed

A folder is written whole under a temporary sibling name (`.NAME.tmp-PID-XXXX`), its manifest
(`fastbert-manifest.json`: kind, format, each file's size and sha256) written last, every file and folder
fsynced, then swapped in by rename: the old folder (if any) is first renamed to `.NAME.old`, the new one into
place, then the old one deleted. A kill at any point leaves the old complete folder or the new complete one;
after a kill between the two renames `final` is missing and `.NAME.old` holds the old one, which
`recover(final)` (called by every loader and writer) renames back. The temporary folder a killed writer leaves
is removed by the next write of the same folder (its process id is gone).

The manifest is also the marker of a folder fastbert made: commands that replace a folder only replace one
whose manifest has the expected `kind` (or that is empty); anything else needs an explicit overwrite.
A subfolder holding its own manifest (a model inside a checkpoint) is listed by that manifest file only, and
verified recursively.

Fault injection (tests): `fault_point(name)` is called at each named step of a write; a hook set with
`set_fault_hook` sees every name, and the environment variable `FASTBERT_FAULT_AT=name` makes the process
kill itself with SIGKILL there (what a power cut or the OOM killer does); `name=TERM` sends SIGTERM instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

MANIFEST_NAME = "fastbert-manifest.json"
MANIFEST_FORMAT = 1
FAULT_ENV = "FASTBERT_FAULT_AT"

_fault_hook: Callable[[str], None] | None = None


class ManifestError(ValueError):
    """A folder's content does not match its manifest (the message names the file)."""


# ---------------------------------------------------------------------------------------------- fault injection
def set_fault_hook(hook: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Install `hook(name)`, called at every named write step; returns the previous hook."""
    global _fault_hook
    previous, _fault_hook = _fault_hook, hook
    return previous


def fault_point(name: str) -> None:
    """A named step of a write (see the module docstring); a no-op unless a test asks for a fault here.

    `FASTBERT_FAULT_AT` holds comma-separated entries `name` (SIGKILL there) or `name=SIG` (send that signal
    to this process there, e.g. `pretrain:step-3:backward=TERM`); `name=SIG@R` only in the process whose
    RANK is R (torchrun)."""
    if _fault_hook is not None:
        _fault_hook(name)
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for entry in spec.split(","):
        point, _, action = entry.strip().partition("=")
        sig, _, rank = action.partition("@")
        if point == name and (not rank or rank == os.environ.get("RANK", "0")):
            os.kill(os.getpid(), getattr(signal, "SIG" + sig.upper()) if sig else signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- durability
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: best effort, not every platform allows it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


# ---------------------------------------------------------------------------------------------- manifests
def _listed_files(folder: Path) -> list[str]:
    """Relative paths the manifest of `folder` lists: every file, except inside subfolders that hold their
    own manifest (only that manifest file is listed) and the folder's own manifest."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        if rel_root != Path(".") and MANIFEST_NAME in files:
            out.append((rel_root / MANIFEST_NAME).as_posix())
            dirs[:] = []
            continue
        dirs.sort()
        for name in sorted(files):
            if rel_root == Path(".") and name == MANIFEST_NAME:
                continue
            out.append((rel_root / name).as_posix())
    return out


def write_manifest(folder: str | os.PathLike, kind: str, **meta: Any) -> dict[str, Any]:
    """Write `folder`'s manifest (last: it lists what is there now); returns it."""
    folder = Path(folder)
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
             for rel in _listed_files(folder)}
    manifest = {"fastbert": kind, "format": MANIFEST_FORMAT, **meta, "files": files}
    write_text_atomic(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of `folder`, or None when it has none; ManifestError when it is unreadable."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is corrupt (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "fastbert" not in manifest:
        raise ManifestError(f"{path} is corrupt (not a fastbert manifest)")
    return manifest


def verify_manifest(
    folder: str | os.PathLike, only: Collection[str] | None = None, hashes: bool = True
) -> dict[str, Any] | None:
    """Check `folder` against its manifest (None when it has none). `only`: the relative paths to check (those
    a loader reads; default all); `hashes=False` checks sizes only (cheap, catches truncation). Raises
    ManifestError naming the first file that is missing or differs."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for rel, entry in manifest["files"].items():
        if only is not None and rel not in only and not rel.endswith("/" + MANIFEST_NAME):
            continue
        path = folder / rel
        hint = f"the folder {folder} is corrupt or incomplete"
        if not path.is_file():
            raise ManifestError(f"{path} is missing ({hint}: its manifest lists it)")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise ManifestError(f"{path} has {size} bytes, its manifest says {entry.get('size')} ({hint}: "
                                "truncated or replaced)")
        if hashes and sha256_file(path) != entry.get("sha256"):
            raise ManifestError(f"{path} does not match the sha256 in {folder / MANIFEST_NAME} ({hint}; if you "
                                f"edited it on purpose, delete {MANIFEST_NAME})")
        if rel.endswith("/" + MANIFEST_NAME):
            verify_manifest(path.parent, None, hashes)
    return manifest


def manifest_kind(folder: str | os.PathLike) -> str | None:
    """The `kind` of `folder`'s manifest; None without one (or when it is unreadable)."""
    try:
        manifest = read_manifest(folder)
    except ManifestError:
        return None
    return None if manifest is None else manifest.get("fastbert")


# ---------------------------------------------------------------------------------------------- folder swaps
def _backup(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def recover(final: str | os.PathLike) -> None:
    """After a kill between the two renames of a swap: put the old folder back under its name."""
    final = Path(final)
    backup = _backup(final)
    if not final.exists() and backup.is_dir():
        os.replace(backup, final)


def swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`, keeping the old `final` until the new one is in place."""
    backup = _backup(final)
    recover(final)
    if final.exists() or final.is_symlink():
        if backup.exists():
            shutil.rmtree(backup)  # left by a kill after an earlier swap; `final` is complete
        os.replace(final, backup)
        fault_point("swap:old-moved-aside")
        os.replace(tmp, final)
        fsync_path(final.parent)
        fault_point("swap:new-in-place")
        if backup.is_symlink() or not backup.is_dir():
            backup.unlink()
        else:
            shutil.rmtree(backup)
    else:
        os.replace(tmp, final)
        fsync_path(final.parent)
    fault_point("swap:done")


def absolute(path: str | os.PathLike) -> Path:
    """The absolute, normalised path (symlinks kept): `.` and `..` resolved so the folder has a name."""
    return Path(os.path.abspath(os.fspath(path)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(final: Path) -> None:
    """Remove `.NAME.tmp-PID-*` siblings of `final` left by a writer that was killed (its process is gone)."""
    prefix = f".{final.name}.tmp-"
    if not final.parent.is_dir():
        return
    for p in final.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, kind: str, **meta: Any) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final`; on a normal exit write the manifest (`kind`, `meta`), fsync
    and swap it in as `final`. On an exception the temporary folder is removed and `final` is untouched."""
    final = absolute(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fault_point("write:started")
        yield tmp
        fault_point("write:files-written")
        write_manifest(tmp, kind, **meta)
        fault_point("write:manifest-written")
        fsync_tree(tmp)
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (both absolute; symlinks resolved for the comparison)."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def refuse_dangerous_target(folder: Path, what: str, protected: Collection[str | os.PathLike] = ()) -> None:
    """ValueError when replacing `folder` would delete the working directory, the home folder, the file system
    root, or a folder holding any of the `protected` paths (the inputs): never allowed, even with overwrite."""
    folder = absolute(folder)
    cwd = Path.cwd()
    if is_inside(cwd, folder):
        raise ValueError(f"{what} {folder} is the working directory or holds it; refusing to replace it")
    if folder == Path(folder.anchor) or is_inside(Path.home(), folder):
        raise ValueError(f"{what} {folder} is the file system root or holds the home folder; refusing to replace it")
    for p in protected:
        if p is not None and is_inside(absolute(p), folder):
            raise ValueError(f"{what} {folder} holds the input {p}; refusing to replace it (choose another folder)")
