"""One row of ``terrabyte bench context``: the model shapes it compares (``model_config``, ``build``)
and one training step of a (model, context) measured in a fresh child process (``measure``): its
time, peak memory and how it failed, under a time cap and an address-space limit. The method is in
``context.py``'s docstring.
"""
from __future__ import annotations

import math
import queue as queue_mod
import resource
import time

import torch

from ..model.terrabyte import TerraByte
from ..train.config import Config
from .common import GB, build_megabyte, spawn_child, status_bytes, with_sections

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MODELS = {
    "tb_sparse": "TerraByte chunked + sparse (3 stages)",
    "tb_python": "TerraByte built in Python, default settings (3 stages, 4 heads of 32 everywhere)",
    "tb_dense": "TerraByte dense (2 stages)",
    "megabyte": "MEGABYTE-pytorch (2 stages)",
}
# contexts up to this are timed as the fastest of a few steps: fixed costs and noise from other
# processes weigh most there, and a few steps cost little
SMALL_CONTEXT, SMALL_REPEATS = 128 * KIB, 3
DENSE_PATCH = 8


# ---------------------------------------------------------------- model shapes


def model_config(base: Config, kind: str, context: int) -> Config:
    """The config of row ``kind`` at ``context`` bytes: the base (sparse, three stages) with its
    global length set, or the two-stage dense shape made of its first and last stages."""
    m = base.model
    if kind == "tb_sparse":
        unit = math.prod(m.max_seq_len[1:])
        return with_sections(base, model={"max_seq_len": (context // unit, *m.max_seq_len[1:])})
    if kind == "tb_python":  # issue #22's shape, every other setting TerraByte's own default
        unit = math.prod(m.max_seq_len[1:])
        return with_sections(base, model={"max_seq_len": (context // unit, *m.max_seq_len[1:]), "heads": 4, "dim_head": 32,
                                  "checkpoint_activations": None, "chunk_bytes": None})

    def ends(value):  # per-stage value of the first and last stage
        return (value[0], value[-1]) if isinstance(value, (list, tuple)) else value

    return with_sections(base, model={
        "dim": ends(m.dim), "depth": (m.depth[0], sum(m.depth[1:])), "heads": ends(m.heads),
        "dim_head": ends(m.dim_head), "max_seq_len": (context // DENSE_PATCH, DENSE_PATCH), "attention": None,
    })


def build(kind: str, cfg: Config, device: str):
    torch.manual_seed(0)
    if kind == "megabyte":
        model = build_megabyte(cfg)
    elif kind == "tb_python":  # what a user writes: only the shape, TerraByte's defaults for the rest
        m = cfg.model
        model = TerraByte(num_tokens=m.num_tokens, dim=m.dim, depth=m.depth, max_seq_len=m.max_seq_len,
                          dim_head=m.dim_head, heads=m.heads, attention=m.attention)
    else:
        model = TerraByte(**cfg.model.kwargs())
    return model.to(device).train()


def describe_model(kind: str, cfg: Config) -> str:
    m = cfg.model
    parts = [f"dims {m.dim}", f"depths {m.depth}", f"heads {m.heads}", f"max_seq_len[1:] {m.max_seq_len[1:]}"]
    parts.append(f"global attention {m.attention[0]}" if m.attention and m.attention[0] else "dense global attention")
    if kind != "megabyte":
        parts.append(f"checkpoint_activations {m.checkpoint_activations}, chunk_bytes {m.chunk_bytes or 'auto'}")
    return f"`{kind}`: {MODELS[kind]}, " + ", ".join(parts)


# ---------------------------------------------------------------- one measurement (child process)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or any(
        s in text for s in ("can't allocate memory", "Cannot allocate memory", "out of memory"))


def _step(model, opt, x, device: str) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        loss = model(x, return_loss=True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else status_bytes("VmHWM")


def measure_child(kind, cfg, context, device, threads, memory_limit_gb, queue) -> None:
    """Child body: build, warm up, time the step; puts ("phase", "step") before each timed step
    (the parent's cap starts there), then ("done", result) or ("failed", {status, peak})."""
    try:
        if memory_limit_gb:
            limit = int(memory_limit_gb * GB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        torch.set_num_threads(threads)
        base_bytes = _peak_bytes(device) if device.startswith("cuda") else status_bytes("VmRSS")
        model = build(kind, cfg, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        patch = context // cfg.model.max_seq_len[0]
        dtype = torch.int32 if device.startswith("cuda") else torch.long  # 4 bytes a byte: 4 GiB at 1 GiB
        _step(model, opt, torch.randint(0, 256, (1, 2 * patch), device=device, dtype=dtype), device)
        x = torch.randint(0, 256, (1, context), device=device, dtype=dtype)
        seconds = math.inf
        for _ in range(SMALL_REPEATS if context <= SMALL_CONTEXT else 1):
            queue.put(("phase", "step"))
            started = time.perf_counter()
            _step(model, opt, x, device)
            seconds = min(seconds, time.perf_counter() - started)
        params = sum(p.numel() for p in model.parameters())
        queue.put(("done", {"seconds": seconds, "peak_bytes": _peak_bytes(device), "params": params,
                            "base_bytes": base_bytes, "checkpoint": getattr(model, "checkpoint_activations", None),
                            "chunk_bytes": getattr(model, "chunk_bytes", None)}))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status in the table
        status = "out of memory" if _is_out_of_memory(exc) else f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        queue.put(("failed", {"status": status, "peak_bytes": _peak_bytes(device)}))


def _exit_status(code) -> str:
    return "out of memory (killed)" if code == -9 else f"crashed (exit code {code})"


def measure(kind: str, cfg: Config, context: int, device: str, threads: int, memory_limit_gb: float,
            time_cap: float) -> dict:
    """One (model, context) in a fresh child: {"status", "seconds", "peak_bytes", "params"}; the
    child is killed when a step passes ``time_cap``."""
    proc, queue = spawn_child(measure_child, (kind, cfg, context, device, threads, memory_limit_gb),
                              pin_malloc=kind != "tb_python")
    deadline = None  # building and the short warm-up are not capped: they do not grow with the context
    try:
        while True:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                what, value = queue.get(timeout=wait)
            except queue_mod.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    proc.kill()
                    return {"status": f"stopped: over {time_cap:g} s", "seconds": None}
                if not proc.is_alive():
                    return {"status": _exit_status(proc.exitcode), "seconds": None}
                continue
            if what == "phase":
                deadline = time.monotonic() + time_cap
            elif what == "failed":  # its peak: how far it got
                return {**value, "seconds": None}
            else:
                over = value["seconds"] > time_cap
                return {**value, "status": f"stopped: over {time_cap:g} s" if over else "ok"}
    finally:  # a child that reported is exiting; give it a moment, then make sure
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
