"""Process groups under torchrun, one setup for training and search."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
