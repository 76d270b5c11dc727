"""What a run touches on its host: files replaced atomically, a free local port, the machine's name.

The bottom layer: ``data_pipeline``, ``kernels``, ``pretrain`` and ``launch`` all use it, and it
imports none of them.
"""
from __future__ import annotations

import contextlib
import os
import platform
import socket
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path`` in one rename.

    On an exception the temporary file (or folder) is removed and ``path`` keeps what it had, so a
    reader never sees half a file under the final name. The temporary name is hidden and ends in
    ``.tmp`` (``.NAME.PID.tmp``), unique per process so two writers never share one. ``durable``:
    the written file is fsynced before the rename and the folder after it, so that a power loss
    cannot leave the new name pointing at data that never reached the disk.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, durable: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` all at once or not at all."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file's or one folder's entries to the disk (a folder's fsync makes renames and
    new names inside it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path`` (or ``path`` itself, a file), then the folders, deepest first."""
    path = Path(path)
    if not path.is_dir():
        fsync_path(path)
        return
    folders = [path]
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            continue
        if p.is_dir():
            folders.append(p)
        else:
            fsync_path(p)
    for folder in reversed(folders):
        fsync_path(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: str = "cpu") -> str:
    """One line naming the machine a benchmark ran on, for the BENCHMARKS.md tables, e.g. "AMD EPYC,
    2 cores visible, Python 3.11.7, torch 2.13.0+cpu, 1 threads"; a CUDA device's name comes first."""
    parts = [cpu_model(), f"{os.cpu_count()} cores visible", f"Python {platform.python_version()}"]
    try:
        import torch
    except ImportError:
        return ", ".join(parts)
    parts += [f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    if str(device).startswith("cuda"):
        parts.insert(0, torch.cuda.get_device_name(torch.device(device)))
    return ", ".join(parts)
