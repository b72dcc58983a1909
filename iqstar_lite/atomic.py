"""Write a directory atomically: build it in a temp sibling, then swap it in.

An interrupted write (crash, Ctrl-C, full disk) leaves the previous directory intact and no
half-written one behind; after ``kill -9`` or a power cut, ``recover_dirs`` (run before reading) puts the complete
version back and removes the temporary. Files are fsync'ed before the swap and the folder after it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh sibling folder; when the block succeeds it replaces ``target``, else it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    old = None
    if target.exists():  # move the old one aside first: at every instant one complete version exists
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; when the block succeeds it is fsync'ed and replaces ``target``, else removed."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def recover_dirs(parent: Path, names: str) -> list[str]:
    """Finish what an interrupted ``atomic_dir`` left in ``parent`` for targets whose name matches the regex ``names``
    (only those: other hidden folders are never touched): a ``.NAME.old`` whose NAME is missing (killed between the two
    renames) becomes NAME again; other ``.NAME.old`` and temporaries ``.NAME-XXXXXXXX`` are removed.
    Returns what it did, one entry per folder."""
    temp = re.compile(rf"^\.(?P<name>{names})-[a-z0-9_]{{8}}$")  # tempfile.mkdtemp(prefix=".NAME-")
    old_re = re.compile(rf"^\.(?P<name>{names})\.old$")
    parent = Path(parent)
    done: list[str] = []
    if not parent.is_dir():
        return done
    for p in sorted(parent.iterdir()):
        if not p.is_dir():
            continue
        if m := old_re.match(p.name):
            target = parent / m["name"]
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name}")
            else:
                os.replace(p, target)
                done.append(f"restored {target.name}")
        elif temp.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
    return done
