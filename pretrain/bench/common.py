"""What the benchmarks share: the optional peers (MEGABYTE-pytorch, matplotlib) and their install
lines, a config with some keys replaced, the training step they time, memory read from /proc and
measured in fresh child processes (glibc's mmap threshold pinned), and where tables and figures go.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from terrabyte.data_pipeline.basics.system import atomic_write

from ..model.terrabyte import MALLOC_MMAP_THRESHOLD
from ..train.config import Config

GB = 1e9  # memory is reported in decimal GB
PEER_INSTALL = "pip install megabyte-pytorch --no-deps beartype"
PLOT_INSTALL = "pip install matplotlib"
# glibc otherwise raises its mmap threshold after large frees and keeps later blocks on the heap,
# so RSS stops following live memory and peaks differ by hundreds of MiB between identical runs
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD)}


# ---------------------------------------------------------------- the peer and the configs


def megabyte_class():
    """MEGABYTE-pytorch's model class, or None when it is not installed (an optional peer)."""
    try:
        from MEGABYTE_pytorch import MEGABYTE
    except ImportError:
        return None
    return MEGABYTE


def build_megabyte(cfg: Config):
    """MEGABYTE-pytorch with the config's shapes: same dims, depths, patching, heads of the same
    width (its heads are one number for all stages: the global stage's), rotary positions and SDPA.
    Its vocabulary covers our PAD and EOS ids, with PAD as its ignored id."""
    from terrabyte.data_pipeline.basics.vocab import Vocab

    m = cfg.model
    heads = m.heads if isinstance(m.heads, int) else m.heads[0]
    dim_head = m.dim_head if isinstance(m.dim_head, int) else m.dim_head[0]
    ff_mult = m.ff_mult if isinstance(m.ff_mult, (int, float)) else m.ff_mult[0]
    ff_mult = int(ff_mult) if float(ff_mult).is_integer() else ff_mult  # it sizes nn.Linear with dim * mult
    vocab = Vocab(cfg.model.num_tokens)
    return megabyte_class()(num_tokens=vocab.size, dim=tuple(m.dim), depth=tuple(m.depth),
                            max_seq_len=tuple(m.max_seq_len), dim_head=dim_head, heads=heads, ff_mult=ff_mult,
                            pad_id=vocab.pad_id, rel_pos=True, flash_attn=True)


def with_sections(cfg: Config, **sections) -> Config:
    """A copy of ``cfg`` with some keys of some sections replaced, e.g. train={"steps": 10}."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


def train_step(model, opt, x) -> None:
    """One timed step: forward with the loss, backward, optimizer step."""
    loss = model(x, return_loss=True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# ---------------------------------------------------------------- memory


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); harmless if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_growth(device: str, run: Callable[[], object]) -> int:
    """Bytes ``run()`` adds at its peak above what is held before it: CUDA's allocator on a GPU,
    the process's RSS high-water mark (VmHWM) on CPU."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    reset_peak_rss()
    base = status_bytes("VmRSS")
    run()
    return status_bytes("VmHWM") - base


def spawn_child(target, args: tuple, pin_malloc: bool = True):
    """Start target(*args, queue) in a fresh spawned process with glibc's mmap threshold pinned
    (unless not ``pin_malloc``: the environment a user's own script has), so its memory is its own
    and RSS follows live memory: (process, queue)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    if pin_malloc:
        os.environ.update(MALLOC_ENV)  # the spawned interpreter reads it at start
    else:
        for k in MALLOC_ENV:
            os.environ.pop(k, None)
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return proc, queue


# ---------------------------------------------------------------- output


def emit(table: str, out: Optional[str]) -> None:
    """Print a result table, and write it to ``out`` too when given."""
    sys.stdout.write(table)
    if out:
        atomic_write(out, table)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    """Write a finished matplotlib figure as the house PNG (parent folders made) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
