"""DINO's label propagation written out as its ``eval_video_segmentation.py`` computes it: the neighbourhood mask
built by four nested loops over (row, column, row offset, column offset) and one dense (N x N) affinity per context
frame, the top-k taken over the stacked (context x source) axis. The oracle of ``test_eval_video_segmentation.py``
and the baseline of ``benchmarks/bench_video_segmentation.py``."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def loop_neighbourhood_mask(height: int, width: int, size: int) -> torch.Tensor:
    """1 where source (r, c) is within ``size`` rows and columns of target (i, j): (h * w, h * w), built patch by
    patch and offset by offset."""
    mask = torch.zeros(height, width, height, width)
    for i in range(height):
        for j in range(width):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    row, col = i - size + p, j - size + q
                    if 0 <= row < height and 0 <= col < width:
                        mask[i, j, row, col] = 1
    return mask.reshape(height * width, height * width)


def dino_propagation(target: torch.Tensor, sources: torch.Tensor, labels: torch.Tensor, grid: Tuple[int, int],
                     size: int, topk: int, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft labels (C, N) of the target patches, and the neighbourhood mask (built on the first call of a video,
    passed back in afterwards). ``target`` (N, D), ``sources`` (n, N, D), ``labels`` (n, C, N)."""
    height, width = grid
    contexts, classes = labels.shape[:2]
    query = F.normalize(target, dim=1, p=2)  # (N, D)
    keys = F.normalize(sources.transpose(1, 2), dim=1, p=2)  # (n, D, N)
    aff = torch.exp(torch.bmm(query.unsqueeze(0).repeat(contexts, 1, 1), keys) / 0.1)  # (n, N target, N source)
    if size > 0:
        if mask is None:
            mask = loop_neighbourhood_mask(height, width, size).unsqueeze(0)  # (1, N, N)
        aff *= mask
    aff = aff.transpose(2, 1).reshape(-1, height * width)  # (n * N source, N target)
    kth = torch.topk(aff, dim=0, k=topk).values.min(dim=0).values  # (N target,)
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)  # (n * N, N)
    segs = labels.transpose(2, 1).reshape(-1, classes).T  # (C, n * N)
    return segs @ aff, mask  # (C, N)
