"""EleutherAI's lm-evaluation-harness on a TerraByte: the ``terrabyte`` model type.

    python -m terrabyte.pretrain.eval.harness run --model terrabyte --model_args pretrained=RUN_OR_FILE --tasks hellaswag
    terrabyte eval --checkpoint RUN_OR_FILE --tasks hellaswag [--include-path my_tasks/]
    import terrabyte.pretrain.eval.harness; lm_eval.simple_evaluate(model="terrabyte", model_args="pretrained=...")

lm-eval (0.4) finds model types only in its own registry, with no plugin discovery, so importing this
module is what registers ``terrabyte``; ``python -m terrabyte.pretrain.eval.harness`` is lm-eval's own
command line with it registered. Text is UTF-8 bytes, one id per byte, no tokenizer:

- ``loglikelihood(context, continuation)``: the continuation's bytes scored after the context's, in
  one forward over both (left-truncated to the model's context), with whether greedy decoding
  would have produced it;
- ``loglikelihood_rolling(text)``: the document scored byte by byte with ``terrabyte eval``'s own
  scorer (``evaluate.score_document``; mode ``basic`` by default, ``mode=sliding`` etc. in
  model_args), so the two report the same bits per byte;
- ``generate_until``: cached decoding (``model.generate``) of each batch of contexts at once, until
  one of the request's ``until`` strings, EOS or ``max_gen_toks`` bytes.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.system import atomic_write

from .bits_per_byte import MODES, score_document
from .generate_cli import DTYPES, generate_batch, resolve_dtype
from ..model.terrabyte import TerraByte

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8
DEFAULT_GEN_BYTES = 256


@register_model("terrabyte")
class TerraByteLM(LM):
    """A TerraByte behind lm-eval's three request types."""

    tokenizer_name = "utf-8-bytes"  # lm-eval keys its request cache on it

    def __init__(self, pretrained: str | TerraByte, device: Optional[str] = None, dtype: str = "fp32",
                 batch_size: int | str | None = DEFAULT_BATCH, mode: str = "basic", stride: Optional[int] = None,
                 max_gen_toks: int = DEFAULT_GEN_BYTES, seed: int = 0, trust_checkpoint: bool | str = False,
                 **unused):
        super().__init__()
        if unused:
            log.warning("terrabyte model: ignoring model_args %s", sorted(unused))
        if mode not in MODES:
            raise ConfigError(f"model_args mode={mode!r} must be one of {', '.join(MODES)}")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda unless told otherwise
            log.warning("terrabyte model: device %s asked for but no GPU is available; using the CPU", device)
            device = None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(pretrained, TerraByte):
            self.model = pretrained.eval()
        else:
            self.model = TerraByte.from_pretrained(str(pretrained), device=device,
                                                   dtype=DTYPES[resolve_dtype(dtype, device)],
                                                   trust_checkpoint=_flag(trust_checkpoint, "trust_checkpoint"))
        self._device = self.model.to_logits.weight.device
        self.batch_size = _batch_size(batch_size)
        self.mode, self.stride, self.max_gen_toks = mode, (int(stride) if stride else None), int(max_gen_toks)
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    # ---------------------------------------------------------------- loglikelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(ctx.encode("utf-8"), cont.encode("utf-8")) for ctx, cont in (r.args for r in requests)]
        results = continuation_log_likelihoods(self.model, pairs, self.batch_size, disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from tqdm.auto import tqdm

        results = []
        for request in tqdm(requests, desc="terrabyte rolling", disable=disable_tqdm):
            (text,) = request.args
            data = text.encode("utf-8")
            if not data:
                results.append(0.0)
                continue
            ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
            logps, _ = score_document(self.model, ids, self.mode, self.stride, self.batch_size)
            results.append(float(logps.sum()))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, results[-1])
        return results

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        groups: dict[tuple, list[int]] = defaultdict(list)
        settings = []
        for i, request in enumerate(requests):
            setting = self._generation_setting(request.args[1])
            settings.append(setting)
            groups[setting].append(i)
        results: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="terrabyte generate", disable=disable_tqdm)
        for (until, max_new, temperature), members in groups.items():
            for lo in range(0, len(members), self.batch_size):
                batch = members[lo : lo + self.batch_size]
                prompts = [self._fit_prompt(requests[i].args[0].encode("utf-8"), max_new) for i in batch]
                done = generate_batch(self.model, prompts, max_new, [u.encode("utf-8") for u in until],
                                      temperature=temperature, filter_thres=None, generator=self.generator)
                for i, completion in zip(batch, done):
                    results[i] = completion.completion.decode("utf-8", errors="replace")
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return results

    def _generation_setting(self, kwargs: dict) -> tuple:
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        max_new = max(1, min(max_new, self.model.context_length - 1))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        return until, max_new, temperature

    def _fit_prompt(self, prompt: bytes, max_new: int) -> bytes:
        """The prompt's last bytes, leaving room for ``max_new`` in the model's context."""
        keep = self.model.context_length - max_new
        return prompt[-keep:] if len(prompt) > keep else prompt


def _flag(value, name: str) -> bool:
    """A model_args boolean: lm-eval passes ``trust_checkpoint=True`` as the string "True"."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"model_args {name}={value!r} must be true or false")
    return text in ("true", "1", "yes")


def _batch_size(value) -> int:
    if value in (None, "auto") or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size={value!r} must be a positive integer or auto") from None
    if size < 1:
        raise ConfigError(f"batch_size={value!r} must be a positive integer or auto")
    return size


@torch.no_grad()
def continuation_log_likelihoods(model: TerraByte, pairs: Sequence[tuple[bytes, bytes]], batch: int,
                                 disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is it the greedy continuation) per (context, continuation)
    byte pair; the two are scored in one sequence, its oldest context bytes dropped past the
    model's context. Longest first, so a batch pads little."""
    from tqdm.auto import tqdm

    T, patch = model.context_length, model.unit_sizes[0]
    device = model.to_logits.weight.device
    seqs, scored = [], []
    for ctx, cont in pairs:
        if not cont:
            raise ConfigError("an lm-eval request has an empty continuation: nothing to score")
        seq = (ctx + cont)[-T:]
        seqs.append(seq)
        scored.append(min(len(cont), len(seq)))
    order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
    results: list = [None] * len(pairs)
    for lo in tqdm(range(0, len(order), batch), desc="terrabyte loglikelihood", disable=disable_tqdm):
        rows = order[lo : lo + batch]
        width = min(patch * math.ceil(len(seqs[rows[0]]) / patch), T)  # whole patches, where fixed
        x = torch.full((len(rows), width), model.pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, : len(seqs[i])] = torch.tensor(list(seqs[i]), dtype=torch.long)
        on_device = x.to(device)
        logp = model(on_device).float().log_softmax(dim=-1)
        # each byte's log-probability and whether it is the argmax, (rows, width): only these leave the device
        picked = logp.gather(-1, on_device[..., None]).squeeze(-1).cpu()
        greedy = (logp.argmax(dim=-1) == on_device).cpu()
        for r, i in enumerate(rows):
            end = len(seqs[i])
            start = end - scored[i]
            results[i] = (float(picked[r, start:end].double().sum()), bool(greedy[r, start:end].all()))
    return results


# --------------------------------------------------------------------------- `terrabyte eval --tasks`


def task_manager(tasks: Sequence[str], include_path: Optional[str] = None, include_defaults: bool = True):
    """lm-eval's TaskManager that knows every task asked for: the include path alone when it has them
    all (indexing lm-eval's ~15,000 built-in task names takes a while), else with the built-ins
    (unless ``include_defaults`` is false). A name it does not know stops with one line naming it."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path} is not a directory")
    if not include_path and not include_defaults:
        raise ConfigError("--no-default-tasks needs --include-path (where else would the tasks come from?)")
    manager = None
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if include_defaults and not all(t in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = " and in ".join(([f"lm-eval's built-in tasks"] if include_defaults else [])
                                + ([f"{include_path}"] if include_path else []))
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}: not among the "
                          f"{len(manager.all_tasks)} tasks in {where} (list them with `lm_eval ls tasks`)")
    return manager


def run_tasks(model: TerraByte, tasks: Sequence[str], include_path: Optional[str] = None,
              num_fewshot: Optional[int] = None, limit: Optional[float] = None,
              batch_size: int = DEFAULT_BATCH, mode: str = "basic", seed: int = 0,
              include_defaults: bool = True) -> dict:
    """lm_eval.simple_evaluate on ``tasks``; returns its output (``results`` per task, configs, ...)."""
    import lm_eval

    manager = task_manager(tasks, include_path, include_defaults)
    lm = TerraByteLM(model, batch_size=batch_size, mode=mode, seed=seed)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    return out


def run_cli(args) -> int:
    """``terrabyte eval --checkpoint RUN --tasks a,b``: the harness's table on stdout, its results to --out."""
    from lm_eval.utils import make_table

    from .generate_cli import load_model

    if args.data:
        raise ConfigError("give --data (bits per byte of shards or files) or --tasks (lm-evaluation-harness), not both")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"--tasks {args.tasks!r} names no task")
    model = load_model(args.checkpoint, args.device, DTYPES[resolve_dtype(args.dtype, args.device)],
                       args.trust_checkpoint)
    out = run_tasks(model, tasks, args.include_path, args.num_fewshot, args.limit, args.batch, args.mode, args.seed,
                    include_defaults=not args.no_default_tasks)
    sys.stdout.write(make_table(out) + "\n")
    if args.out:
        report = {"checkpoint": str(args.checkpoint), "tasks": tasks, "results": out["results"],
                  "versions": out.get("versions"), "n-shot": out.get("n-shot")}
        atomic_write(args.out, json.dumps(report, indent=2, default=str) + "\n")
    return 0


def main() -> None:
    """lm-eval's command line with the ``terrabyte`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
