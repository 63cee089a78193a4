"""Resumable checkpoints that survive SIGKILL at any moment.

A checkpoint is a folder `checkpoint-<step>` holding the trainable weights and optimizer tensors
(safetensors) and everything else (step, data position, LR scheduler, grad scaler, optimizer
hyper-parameters) as JSON. It is written under a temporary name and renamed into place only once
complete, so a folder named `checkpoint-*` is always whole; rotation renames before deleting for the
same reason. No pickle anywhere: loading a checkpoint cannot execute code."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cxrcommon.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.safetensors", "state.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def trainable_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """`{model}.{param}` -> tensor for every parameter that requires grad."""
    return {f"{name}.{p_name}": p.detach().to("cpu", copy=True).contiguous()
            for name, model in models.items() for p_name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(models: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the matching trainable parameters; any mismatch is an error."""
    expected = set()
    for name, model in models.items():
        for p_name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = f"{name}.{p_name}"
            expected.add(key)
            if key not in tensors:
                raise ValueError(f"checkpoint lacks trainable parameter {key}: it was made with different "
                                 "--train/--lora-* options; resume with the same options or start fresh")
            with torch.no_grad():
                p.copy_(tensors[key].to(p.device, p.dtype))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"checkpoint has parameters this run does not train ({extra[0]}, ...): it was made "
                         "with different --train/--lora-* options")


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def clean_partial(root: str | os.PathLike) -> None:
    """Delete leftovers of a save or a rotation that a kill interrupted."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                log.info("removing interrupted checkpoint leftover %s", p)
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(root: str | os.PathLike, step: int, models: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest beyond `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    save_file(trainable_state(models), str(tmp / WEIGHTS))
    save_file(opt_tensors, str(tmp / OPTIMIZER))
    (tmp / STATE).write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1))
    for name in (WEIGHTS, OPTIMIZER, STATE):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step after a resume: replace it whole
        trash = root / f".trash-{final.name}-{os.getpid()}"
        final.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(final)
    _fsync_dir(root)
    if keep is not None and keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            trash = root / f".trash-{old.name}"
            old.rename(trash)
            shutil.rmtree(trash)
            log.info("removed old checkpoint %s (keeping the newest %d)", old.name, keep)
    return final


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it can: its JSON state parses and each
    safetensors file's header reads and covers the whole file (safe_open; no tensor is loaded, so this
    is cheap). A folder is renamed into place only once whole, but a disk that filled up, a copy that
    was cut short or a bad sector can still leave a truncated file behind."""
    path = Path(path)
    try:
        json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{STATE} is unreadable ({exc})"
    for name in (WEIGHTS, OPTIMIZER):
        try:
            with safe_open(str(path / name), framework="pt"):
                pass
        except (OSError, SafetensorError) as exc:
            return f"{name} is unreadable ({exc})"
    return None


def find_checkpoint(root: str | os.PathLike, resume: str) -> Path | None:
    """'latest' -> newest complete checkpoint (None if there is none); otherwise the given folder.

    With 'latest', a newest checkpoint that fails `checkpoint_problem` (e.g. truncated) is named in a
    warning and the next older one is tried; if every one is bad that is a UserError naming them (not a
    silent restart from step 0). A named folder that is not a whole checkpoint is a UserError naming it."""
    if resume == "latest":
        found = list_checkpoints(root)
        bad = []
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                if bad:
                    log.warning("resuming from %s, the newest complete checkpoint (skipped %d damaged newer one(s))",
                                path.name, len(bad))
                return path
            log.warning("checkpoint %s is damaged: %s — skipping it and trying an older one (it is left in place; "
                        "delete it once the run has resumed)", path, problem)
            bad.append(f"{path.name} ({problem})")
        if bad:
            raise UserError(f"no complete checkpoint in {root}: {'; '.join(bad)} — restore one from a backup, or move "
                            f"them away to start again from step 0")
        return None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise MissingFileError(f"--resume {path} is not a checkpoint (no {STATE}); pass 'latest' or a "
                                f"checkpoint-<step> folder from {root}")
    if problem := checkpoint_problem(path):
        raise UserError(f"--resume {path} is damaged: {problem} — pass another checkpoint-<step> folder from {root}, "
                        f"or 'latest' for the newest complete one")
    return path


def load_checkpoint(path: str | os.PathLike, models: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimizer in place; return the JSON state (step, data position, ...)."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
        weights = load_file(str(path / WEIGHTS))
        opt_tensors = load_file(str(path / OPTIMIZER))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"checkpoint {path} is unreadable ({exc}); delete it and resume from an older one") from exc
    load_trainable_state(models, weights)
    optimizer.load_state_dict(_join_optimizer(opt_tensors, state.pop("optimizer")))
    return state
