"""torchrun / DistributedDataParallel plumbing; every function also works in a single plain process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the process group that torchrun describes in the environment (nccl on GPU, gloo on CPU).

    Without torchrun's variables (a plain ``python``/``nonlocalnet`` run) this is a single process of rank 0.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world == 1:
        return DistInfo(rank, world, local)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def resolve_device(name: str) -> torch.device:
    """ "auto" -> this process's GPU (LOCAL_RANK under torchrun) if CUDA is available, else the CPU; "cuda" -> this
    process's GPU; any other name (``cuda:1``, ``cpu``) as it is.

    Raises:
        ValueError: a name that is no device, or a GPU this machine does not have (naming it).
    """
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is no device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda devices are supported")
    return device


def process_group_info() -> DistInfo:
    """This process's place in the joined process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    """Whether this process is rank 0 of the process group (or the only process)."""
    return process_group_info().is_main


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself when it is not wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (the tensor itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all processes (the tensor itself in a single process)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return all_reduce_sum(tensor) / world if world > 1 else tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates along dim 0 the tensors of every process (they may differ in length)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n.item())] for g, n in zip(gathered, lengths)])


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (any picklable object) in rank order, on every process (``[value]`` alone)."""
    world = process_group_info().world_size
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: Any) -> Any:
    """Process 0's ``value`` (any picklable object), on every process; the others pass anything (e.g. None)."""
    if process_group_info().world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rng_states(device: torch.device) -> list[dict[str, torch.Tensor | None]]:
    """Every process's random-generator states (``{"torch": ..., "cuda": ...}``) in rank order, on every process."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    cpus = all_gather_cat(cpu.to(device).unsqueeze(0)).cpu()
    cudas = all_gather_cat(cuda.to(device).unsqueeze(0)).cpu() if cuda is not None else [None] * len(cpus)
    return [{"torch": c.clone(), "cuda": g.clone() if g is not None else None} for c, g in zip(cpus, cudas)]


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    """Restores one process's states as :func:`gather_rng_states` gave them."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_same_config(cfg: Any) -> None:
    """Under torchrun, raises :class:`~nonlocalnet.engine.config.ConfigError` in every process when any process's
    config differs from process 0's, naming the differing keys and each one's values: processes started with
    different configs (a node given another ``train.lr``) would train together on a mix. A single process passes.
    """
    if process_group_info().world_size == 1:
        return
    from .config import ConfigError, to_plain
    from .rundir import flatten  # the config's dotted keys

    flat = {k: repr(v) for k, v in flatten(to_plain(cfg)).items()}
    configs = all_gather_objects(flat)
    differing = []
    for key in sorted(set().union(*configs)):
        values = [c.get(key, "(unset)") for c in configs]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
            differing.append(f"{key} ({shown})")
    if differing:
        raise ConfigError(
            f"the processes of this job were started with different configs: {'; '.join(differing)}; "
            f"start every process with the same config and overrides"
        )


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
