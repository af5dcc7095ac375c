"""Devices and process groups: one resolution of `--device` and one torchrun setup for train, search,
evaluation, baselines and the export's task check."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from qsamc.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def uses_cuda(device: str) -> bool:
    """Whether `config.device` resolves to a GPU: `cuda`, or `auto` where torch sees one."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """(rank, world) under torchrun; (0, 1) otherwise. CPU ranks use gloo, GPU ranks NCCL."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if uses_cuda(device) else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str = "auto", rank: int = 0) -> torch.device:
    """The torch device `--device` names for this rank: `cuda` (one GPU per rank under torchrun, made the
    current device so NCCL collectives use it), `cpu`, or `auto` (the GPU where torch sees one)."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA GPU here")
    if not uses_cuda(device):
        return torch.device("cpu")
    chosen = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(chosen)
    return chosen


def module_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its first parameter's or buffer's device (the CPU for one with neither)."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
