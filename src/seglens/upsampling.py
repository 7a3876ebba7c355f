"""Pixel-level predictions: the argmax of bilinearly upsampled grid logits, without upsampling.

Scoring a probe at pixel level means upsampling (C, g, g) grid logits to every (H, W) original
pixel and taking the argmax: C * H * W values per stage and image (52M for ADE20K's 150 classes
at 512 x 683), which costs more than the model's forward pass. ``upsampled_argmax`` gives the
same class ids, bit for bit, while interpolating only the few classes that can win at a pixel.

Why that is exact: inside one cell of the bilinear grid (between four token centres) a class's
value is a bilinear function of the pixel position, and so is the difference of two classes,
or of a class and the mean of several; a bilinear function is largest at a corner of any
rectangle. Split each cell into ``SUBDIVISIONS``^2 sub-cells. At a sub-cell's four corners take
the classes that win a corner and their mean: at every pixel of the sub-cell the mean is at most
the best of those classes. A class below the mean at all four corners (by a margin that covers
float32 rounding) is therefore below some class at every pixel: it never wins there. The classes
left (about 1-4 per sub-cell, even for noise) are interpolated per pixel with
``Transform.logits_to_original``'s expression, so their values are the same float32 numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from seglens.data.geometry import Transform, lerp

SUBDIVISIONS = 4  # sub-cells per cell side: a power of two, so the sub-corner weights are exact

# Two float32 lerps round a value by at most ~6 units of 2^-24 of the largest |corner| they read,
# both at a sub-corner and at a pixel; the margin allows 32 per class and per mean (the mean's
# own rounding is < 4), so a class ruled out can never win, nor tie, in float32.
_SLACK = 2.0**-19


def upsampled_argmax(
    grid_logits: torch.Tensor, transform: Transform, max_elements: int = 20_000_000
) -> torch.Tensor:
    """(..., C, g, g) grid logits -> (..., H, W) int64: ``logits_to_original(...).argmax(-3)``.

    Equal to the argmax of ``transform.logits_to_original(grid_logits)`` over classes (ties to
    the lower class), computed as the module docstring says. Leading dimensions (e.g. stages)
    share the transform. At most about ``max_elements`` values are formed at once, whatever
    C, H and W. Logits must be finite, within +-1e38 (evaluation clamps -inf to -1e30).
    """
    if grid_logits.dim() < 3 or grid_logits.shape[-1] != grid_logits.shape[-2]:
        raise ValueError(
            f"grid_logits has shape {tuple(grid_logits.shape)}; expected (..., C, g, g)"
        )
    *lead, C, g, _ = grid_logits.shape
    logits = grid_logits.float().reshape(-1, C, g, g)  # (S, C, g, g)
    # Rows (columns) with the same taps get the same values: the band a crop removed and the
    # border beyond the outermost token centres. Solve the distinct ones, then expand.
    y0, y1, wy, x0, x1, wx = transform.taps(g)
    (y0, y1, wy), rows = _distinct(y0, y1, wy)
    (x0, x1, wx), cols = _distinct(x0, x1, wx)
    taps = _Taps((y0, y1, wy, x0, x1, wx), g, logits.device)
    per_stage = 4 * C * (g * SUBDIVISIONS) ** 2  # the sub-corner tests' largest temporaries
    step = max(1, max_elements // per_stage)
    pred = torch.cat([_argmax(part, taps, max_elements) for part in logits.split(step)])
    rows, cols = torch.from_numpy(rows).to(pred.device), torch.from_numpy(cols).to(pred.device)
    return pred[:, rows][:, :, cols].reshape(*lead, transform.height, transform.width)


def _distinct(lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> tuple[tuple, np.ndarray]:
    """The distinct (lo, hi, w) taps, in order, and the index of each original one among them."""
    key = np.stack([lo, w.view(np.int32)], axis=1)  # hi follows from lo
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return (lo[first], hi[first], w[first]), inverse.reshape(-1)


class _Taps:
    """Bilinear taps of rows and columns (as ``Transform.taps`` gives them) on the logits'
    device, and the rows (columns) of each sub-cell row (column)."""

    def __init__(self, taps: tuple[np.ndarray, ...], g: int, device: torch.device):
        y0, y1, wy, x0, x1, wx = (torch.from_numpy(t).to(device) for t in taps)
        self.g, self.y0, self.y1, self.wy, self.x0, self.x1, self.wx = g, y0, y1, wy, x0, x1, wx
        s = SUBDIVISIONS
        # Row i lies in sub-row y0 * s + floor(wy * s) of the fine (g * s) grid; likewise columns.
        self.fine_y = y0 * s + (wy * s).long().clamp_max(s - 1)
        self.fine_x = x0 * s + (wx * s).long().clamp_max(s - 1)
        self.rows, self.has_rows = _members(self.fine_y, g * s)
        self.cols, self.has_cols = _members(self.fine_x, g * s)


def _members(fine: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels (rows or columns) of each of n sub-rows, from the non-decreasing (H,) sub-row
    of every pixel: (n, m) indices, padded by repeating the sub-row's last pixel (which gets
    the same value twice), and whether the sub-row has any pixel (n,)."""
    size = torch.bincount(fine, minlength=n)  # (n,)
    first = torch.cumsum(size, 0) - size
    offset = torch.arange(int(size.max()), device=fine.device)
    index = first[:, None] + torch.minimum(offset, (size[:, None] - 1).clamp_min(0))
    return index.clamp_max(len(fine) - 1), size > 0


def _argmax(logits: torch.Tensor, taps: _Taps, max_elements: int) -> torch.Tensor:
    """(S, C, g, g) -> (S, H, W) class ids (see ``upsampled_argmax``)."""
    S, C, g, _ = logits.shape
    s, dev = SUBDIVISIONS, logits.device
    nxt = torch.arange(1, g + 1, device=dev).clamp_max(g - 1)  # the clamped next row / column
    last = logits.permute(0, 2, 3, 1)  # (S, g, g, C): classes last, for the reductions below
    slack = torch.stack([last, last[:, nxt], last[:, :, nxt], last[:, nxt][:, :, nxt]])
    slack = slack.abs().amax(0) * _SLACK  # (S, g, g, C): per class and cell
    slack = slack[:, :, None, :, None].expand(S, g, s, g, s, C)  # each cell's sub-cells
    fine = _sub_corner_values(last, nxt)  # (S, g s + 1, g s + 1, C)
    best_fine = fine.argmax(-1)  # (S, g s + 1, g s + 1)
    quarter = [(slice(None, -1), slice(None, -1)), (slice(1, None), slice(None, -1))]
    quarter += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(1, None))]
    corners = [fine[:, y, x] for y, x in quarter]  # 4 x (S, g s, g s, C)
    best = torch.stack([best_fine[:, y, x] for y, x in quarter], -1)  # (S, g s, g s, 4)
    # At each corner, the mean of the distinct classes that win a corner (one winning several
    # counts once), less the largest of their margins.
    share = 1 / (best[..., :, None] == best[..., None, :]).sum(-1)  # (S, g s, g s, 4)
    margin = slack.gather(-1, best.view(S, g, s, g, s, 4)).amax(-1).view(S, g * s, g * s)
    candidate = torch.zeros(S, g, s, g, s, C, dtype=torch.bool, device=dev)
    for v in corners:
        floor = (v.gather(-1, best) * share).sum(-1) / share.sum(-1) - margin  # (S, g s, g s)
        v, floor = v.reshape(S, g, s, g, s, C), floor.view(S, g, s, g, s, 1)
        candidate |= v + slack >= floor
    candidate = candidate.view(S, g * s, g * s, C)
    count = candidate.sum(-1)  # (S, g s, g s)
    fy, fx = taps.fine_y, taps.fine_x
    pred = best[..., 0][:, fy][:, :, fx]  # (S, H, W): right where a sub-cell has one candidate
    # Sub-cells with several candidates (and pixels): interpolate their pixels, for the
    # candidates only, in buckets of up to 2, 4, 8, ... candidates and in chunks.
    ambiguous = (count > 1) & taps.has_rows[:, None] & taps.has_cols[None, :]
    if not ambiguous.any():
        return pred
    stage, fine_row, fine_col = ambiguous.nonzero().unbind(1)  # the order of ``[ambiguous]``
    ids, table = _candidates(last, candidate, ambiguous, stage, fine_row, fine_col, nxt)
    need = count[ambiguous]
    per_cell = taps.rows.shape[1] * taps.cols.shape[1]
    low = 1
    for width in _bucket_widths(ids.shape[1]):
        chosen = ((need > low) & (need <= width)).nonzero()[:, 0]
        ids_w, table_w = ids[:, :width], table[:, :, :width]
        for part in chosen.split(max(1, max_elements // (width * per_cell))):
            rows, cols = taps.rows[fine_row[part]], taps.cols[fine_col[part]]  # (A, m), (A, n)
            win = _best_candidate(ids_w[part], C, table_w[part], taps.wy[rows], taps.wx[cols])
            pred[stage[part][:, None, None], rows[:, :, None], cols[:, None]] = win
        low = width
    return pred


def _candidates(
    last: torch.Tensor,
    candidate: torch.Tensor,
    ambiguous: torch.Tensor,
    stage: torch.Tensor,
    fine_row: torch.Tensor,
    fine_col: torch.Tensor,
    nxt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ambiguous sub-cell (at ``stage, fine_row, fine_col``, the ``[ambiguous]``
    order), its candidates by ascending class id, padded with C: (A, K); and their logits at
    the four corners of the sub-cell's cell, in the order (r, c), (r + 1, c), (r, c + 1),
    (r + 1, c + 1): (A, 4, K), the lowest float32 for padding."""
    C, dev = last.shape[-1], last.device
    cand = candidate[ambiguous]  # (A, C)
    K = int(cand.sum(-1).max())
    slot = torch.where(cand, cand.cumsum(-1) - 1, K)  # non-candidates go to a spare slot K
    ids = torch.full((len(cand), K + 1), C, dtype=torch.long, device=dev)
    ids.scatter_(-1, slot, torch.arange(C, device=dev).expand_as(slot))
    ids = ids[:, :K]
    r, c = fine_row // SUBDIVISIONS, fine_col // SUBDIVISIONS
    at = ids.clamp_max(C - 1)
    rows_cols = ((r, c), (nxt[r], c), (r, nxt[c]), (nxt[r], nxt[c]))
    table = torch.stack([last[stage, y, x].gather(-1, at) for y, x in rows_cols], dim=1)
    # Padding reads the lowest float32 at every corner: its value (that, or -inf if the lerp
    # overflows) never beats a real candidate, and a tie goes to the real one, in a lower slot.
    table.masked_fill_((ids == C)[:, None], torch.finfo(torch.float32).min)
    return ids, table


def _sub_corner_values(last: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """(S, g, g, C) -> (S, g s + 1, g s + 1, C): each class at every sub-cell corner.

    Point (r s + a, c s + b) of the fine grid sits at fraction (a / s, b / s) of cell (r, c)
    (for a, b in 0..s-1), the last point at the far edge of the last cell; with float32
    rounding like a pixel's (two lerps).
    """
    g, s, dev = last.shape[1], SUBDIVISIONS, last.device
    w = torch.arange(s, device=dev, dtype=torch.float32) / s  # exact: s is a power of two
    cell = torch.arange(g, device=dev).repeat_interleave(s)  # (g s,)
    w = w.repeat(g)
    cell, w = torch.cat([cell, cell[-1:]]), torch.cat([w, w.new_ones(1)])  # the far edge
    across = lerp(last[:, :, cell], last[:, :, nxt[cell]], w[:, None])  # (S, g, g s + 1, C)
    return lerp(across[:, cell], across[:, nxt[cell]], w[:, None, None])


def _bucket_widths(k_max: int):
    width = 2
    while width < k_max:
        yield width
        width *= 2
    yield k_max


def _best_candidate(
    cls: torch.Tensor, C: int, corner: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor
) -> torch.Tensor:
    """(A, m, n): for each of A sub-cells, the class of each of its m x n pixels: the argmax
    over the candidates ``cls`` (A, K; C marks padding) of the pixel's upsampled logits, from
    the candidates' (A, 4, K) cell-corner logits and the pixels' row and column weights (A, m),
    (A, n), with ``Transform.logits_to_original``'s expression (the same float32 values)."""
    top_left, bottom_left, top_right, bottom_right = corner[..., None].unbind(1)  # (A, K, 1)
    w = wx[:, None, :]  # (A, 1, n)
    top, bottom = lerp(top_left, top_right, w), lerp(bottom_left, bottom_right, w)  # (A, K, n)
    value = lerp(top[:, :, None], bottom[:, :, None], wy[:, None, :, None])  # (A, K, m, n)
    best = value.argmax(1)  # (A, m, n)
    return cls.gather(1, best.flatten(1)).view_as(best)
