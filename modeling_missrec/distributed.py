"""The differentiable all-gathers of pre-training: every process's in-batch candidates and augmented views
become negatives of every other's, with gradients flowing back to their owners. One process (no process
group) is the identity, so the model runs unchanged on a laptop."""

from __future__ import annotations

import torch


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_sizes(size: int, device: torch.device) -> list[int]:
    """Every process's local batch size (the last batches of an epoch may differ between processes)."""
    _, world = rank_and_world_size()
    if world == 1:
        return [size]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([size], device=device))
    return [int(s) for s in sizes]


def pad_to(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor.contiguous()
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim).contiguous()


def gather_with_grad(tensor: torch.Tensor, sizes: list[int], dim: int = 0) -> torch.Tensor:
    """Concatenate `tensor` from every process along `dim`; gradients flow back to each owner."""
    if len(sizes) == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    pieces = all_gather(pad_to(tensor, max(sizes), dim))
    return torch.cat([piece.narrow(dim, 0, n) for piece, n in zip(pieces, sizes)], dim=dim)


def gather_no_grad(tensor: torch.Tensor, sizes: list[int], dim: int = 0) -> torch.Tensor:
    if len(sizes) == 1:
        return tensor
    padded = pad_to(tensor, max(sizes), dim)
    pieces = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(pieces, padded)
    return torch.cat([piece.narrow(dim, 0, n) for piece, n in zip(pieces, sizes)], dim=dim)
