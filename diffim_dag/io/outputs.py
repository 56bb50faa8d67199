"""Output sets: a folder of one subtraction's products, installed whole or not at all.

* :func:`check_output_dir` validates ``--out`` before any work: it must be creatable and writable and
  not a file; a folder holding files that are not a diffim-dag output is refused (the user's files
  survive) unless ``overwrite``; an earlier diffim-dag output set (it has the completion manifest
  :data:`OUTPUTS_MANIFEST`) is replaced only with ``overwrite``.
* :func:`output_set` gives a temporary folder beside the final one (``.NAME.tmp-…``); when the block
  ends, the completion manifest (every file's size and SHA-256) is written and the folder installed
  with one rename (:func:`install`: an atomic exchange with an earlier set where the kernel offers
  it), so a stopped run leaves the old set or the new one, never a mix; on any error the temporary
  folder is removed.  :func:`remove_temporaries` removes the ones still open (the signal handler's job)
  while other threads may still be writing into them: from then on :func:`make_folder`, which every
  writer uses to create its folder, refuses, so no writer re-creates a removed folder, and a folder
  that gained a file while it was being removed is removed again until it is gone.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from ..errors import InputError

__all__ = ["OUTPUTS_MANIFEST", "OutputError", "check_output_dir", "check_output_root", "output_set", "install", "file_entry", "sha256",
           "read_manifest", "remove_temporaries", "register_cleanup", "unregister_cleanup", "temporary_dir",
           "temporary_name", "open_temporary", "forget_temporary", "discard_temporary", "make_folder", "remove_tree"]

#: The completion manifest of an output set.
OUTPUTS_MANIFEST = "_outputs.json"

_OPEN: set[Path] = set()
_CLEANUPS: dict[int, object] = {}
_LOCK = threading.RLock()  # re-entrant: the signal handler runs in the main thread, maybe inside a held lock
_STOPPING = False


class OutputError(InputError):
    """``--out`` cannot take the outputs (a file, not writable, or holding other files)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path, root: Path) -> dict:
    """``{"path": relative to root, "sha256", "size"}`` of one output file."""
    return {"path": os.path.relpath(path, root), "sha256": sha256(path), "size": path.stat().st_size}


def read_manifest(folder: Path) -> dict | None:
    """The completion manifest of an output folder (None when there is none or it is unreadable)."""
    try:
        return json.loads((Path(folder) / OUTPUTS_MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def check_output_dir(path, *, overwrite: bool = False, replace_own: bool = False) -> Path:
    """Validate an output folder before any work (see the module docstring); returns it absolute.

    ``replace_own`` lets an earlier diffim-dag output be replaced without ``overwrite`` (the demo's).
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: is a file, not a folder")
    if out.is_dir():
        entries = [p for p in out.iterdir() if not p.name.startswith(".")]
        if entries:
            if read_manifest(out) is not None:
                if not (overwrite or replace_own):
                    raise OutputError(f"--out {out}: holds an earlier diffim-dag output; give --overwrite to replace "
                                      "it as a whole, or choose another folder")
            elif not overwrite:
                names = ", ".join(sorted(p.name for p in entries)[:3]) + (", …" if len(entries) > 3 else "")
                raise OutputError(f"--out {out}: holds files that are not a diffim-dag output ({names}); choose "
                                  "another folder, or give --overwrite to replace the folder as a whole")
    # the set is written beside the folder and renamed into place: its parent must take a new folder
    _check_writable(out, Path(os.path.abspath(out)).parent)
    return out.resolve() if out.exists() else Path(os.path.abspath(out))


def _check_writable(out: Path, folder: Path) -> None:
    """Raise :class:`OutputError` unless ``folder`` exists or can be made, and takes a new entry (probed)."""
    where = folder
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise OutputError(f"--out {out}: cannot create it ({where} is a file)")
    try:
        os.rmdir(tempfile.mkdtemp(dir=where, prefix=".diffim-dag-probe-"))
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write in {where} ({exc.strerror or exc})") from None


def check_output_root(path) -> Path:
    """Validate a batch's ``--out`` before any work: a folder, existing or creatable, that this process can
    write in (nothing is created here).  Reruns add to it: finished visits are kept, so an earlier batch
    output is not refused."""
    out = Path(os.path.abspath(Path(path).expanduser()))
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: is a file, not a folder")
    _check_writable(out, out)
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the kernel cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def install(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``final`` with one rename.

    An earlier ``final`` is swapped out atomically where the kernel offers it (then removed); elsewhere
    it is moved aside first, so that for a moment neither is in place, never a mix of the two.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        if _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old set
            return
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)


def temporary_dir(final: Path, tag: str = "") -> Path:
    """A new hidden folder beside ``final``, registered for :func:`remove_temporaries`."""
    tmp = temporary_name(final, tag)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return open_temporary(tmp, exist_ok=False)


def temporary_name(final: Path, tag: str = "") -> Path:
    """A new name for a hidden temporary folder beside ``final`` (nothing is created)."""
    final = Path(final)
    return final.parent / f".{final.name}.tmp-{tag + '-' if tag else ''}{uuid.uuid4().hex[:12]}"


def open_temporary(tmp: Path, *, exist_ok: bool = True) -> Path:
    """Create the temporary folder ``tmp`` (:func:`temporary_name`) if it is not there yet and register it for
    :func:`remove_temporaries` in this process (refused once that has run: the process is stopping)."""
    tmp = Path(tmp)
    with _LOCK:
        make_folder(tmp, exist_ok=exist_ok)
        _OPEN.add(tmp)
    return tmp


def make_folder(path, *, exist_ok: bool = True) -> Path:
    """``mkdir -p path``, refused (:class:`OutputError`) once :func:`remove_temporaries` has run: the process is
    stopping, and a writer thread must not re-create a temporary folder it removed.  Every output writer
    creates its folders with this."""
    path = Path(path)
    with _LOCK:
        if _STOPPING:
            raise OutputError(f"{path}: not created, the command is stopping")
        path.mkdir(parents=True, exist_ok=exist_ok)
    return path


def remove_tree(path, *, within_s: float = 0.5) -> None:
    """Remove the folder ``path`` and all it holds, again while it is still there (for up to ``within_s``
    seconds: a folder that cannot be removed must not hold up a stopping command): a thread writing into it
    can add a file between the listing and the removal of the folder (no folder can be re-created once
    :data:`_STOPPING` is set; a file can no longer be created once the folder is gone)."""
    deadline = time.monotonic() + within_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.002)


def forget_temporary(tmp: Path) -> None:
    with _LOCK:
        _OPEN.discard(Path(tmp))


def discard_temporary(tmp: Path) -> None:
    """Remove the temporary folder ``tmp`` if it is still there (a set that was not installed) and forget it."""
    forget_temporary(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def register_cleanup(function) -> int:
    """Have :func:`remove_temporaries` also call ``function()`` (e.g. a batch's orphan sweep); returns a handle."""
    with _LOCK:
        handle = id(function)
        _CLEANUPS[handle] = function
    return handle


def unregister_cleanup(handle: int) -> None:
    with _LOCK:
        _CLEANUPS.pop(handle, None)


def remove_temporaries() -> None:
    """Remove every temporary output folder still open in this process and run the registered cleanups: the
    process is stopping (Ctrl-C), and no temporary folder is created after this."""
    global _STOPPING
    with _LOCK:
        _STOPPING = True
        open_now = list(_OPEN)
        _OPEN.clear()
        cleanups = list(_CLEANUPS.values())
        _CLEANUPS.clear()
    for tmp in open_now:
        remove_tree(tmp)
    for function in cleanups:
        try:
            function()
        except OSError:
            pass


@contextlib.contextmanager
def output_set(final, *, extra: dict | None = None, folder: Path | None = None, entries: dict | None = None):
    """A temporary folder to write one output set into; installed as ``final`` when the block ends.

    The completion manifest lists every file written (path, size, SHA-256) plus ``extra``.  ``folder``: a
    temporary folder (:func:`open_temporary`) already holding part of the set, whose ``entries``
    (``{relative path: file_entry}``) were taken when those files were written; it is removed on any error.
    """
    final = Path(final)
    tmp = temporary_dir(final) if folder is None else open_temporary(Path(folder))
    try:
        yield tmp
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                known = (entries or {}).get(rel)
                ok = known is not None and known.get("size") == p.stat().st_size
                files[rel] = dict(known) if ok else file_entry(p, tmp)
        manifest = {"written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": files,
                    **(extra or {})}
        (tmp / OUTPUTS_MANIFEST).write_text(json.dumps(manifest, indent=2))
        install(tmp, final)
    finally:
        forget_temporary(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
