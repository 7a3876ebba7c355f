"""Pixel-level predictions: the argmax of bilinearly upsampled grid logits, without upsampling.

Scoring a probe at pixel level means upsampling (C, g, g) grid logits to every (H, W) original
pixel and taking the argmax: C * H * W values per stage and image (52M for ADE20K's 150 classes
at 512 x 683), which costs more than the model's forward pass. ``upsampled_argmax`` gives the
same class ids, bit for bit, while interpolating only the few classes that can win at a pixel.

Why that is exact: inside one cell of the bilinear grid (between four token centres) a class's
value is a bilinear function of the pixel position, and so is the difference of two classes,
or of a class and the mean of several; a bilinear function is largest at a corner of any
rectangle. At a rectangle's four corners take the classes that win a corner and their mean: at
every pixel inside, the mean is at most the best of those classes. A class below the mean at all
four corners (by a margin that covers float32 rounding) is therefore below some class at every
pixel: it never wins there. Whole cells are tested first (most are decided there, with one
class left), then the ``SUBDIVISIONS``^2 sub-cells of the others. The classes left in a
sub-cell (about 1-4, even for noise) are interpolated at its pixels with
``Transform.logits_to_original``'s expression, so their values are the same float32 numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from seglens.data.geometry import Transform, lerp

MAX_ELEMENTS = {"cpu": 20_000_000, "other": 400_000_000}  # default budgets of temporaries
SUBDIVISIONS = 4  # sub-cells per cell side: a power of two, so the sub-corner weights are exact
# The four corners of each sub-cell in an (s + 1, s + 1) grid of sub-cell corners, in
# ``_survivors``' order: (top, left), (bottom, left), (top, right), (bottom, right).
_QUARTERS = [(slice(None, -1), slice(None, -1)), (slice(1, None), slice(None, -1))]
_QUARTERS += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(1, None))]

# Two float32 lerps round a value by at most ~6 units of 2^-24 of the largest |corner| they read,
# both at a sub-corner and at a pixel; the margin allows 32 per class and per mean (the mean's
# own rounding is < 4), so a class ruled out can never win, nor tie, in float32.
_SLACK = 2.0**-19


def upsampled_argmax(
    grid_logits: torch.Tensor, transform: Transform, max_elements: int | None = None
) -> torch.Tensor:
    """(..., C, g, g) grid logits -> (..., H, W) int64: ``logits_to_original(...).argmax(-3)``.

    Equal to the argmax of ``transform.logits_to_original(grid_logits)`` over classes (ties to
    the lower class), computed as the module docstring says. Leading dimensions (e.g. stages)
    share the transform. At most about ``max_elements`` values are formed at once, whatever
    C, H and W (default ``MAX_ELEMENTS``: 2e7 on CPU, 4e8, about 1.6 GB, on an accelerator,
    where fewer, larger steps mean fewer host syncs). Logits must be finite, within +-1e38
    (evaluation clamps -inf to -1e30).
    """
    if grid_logits.dim() < 3 or grid_logits.shape[-1] != grid_logits.shape[-2]:
        raise ValueError(
            f"grid_logits has shape {tuple(grid_logits.shape)}; expected (..., C, g, g)"
        )
    *lead, C, g, _ = grid_logits.shape
    logits = grid_logits.float().reshape(-1, C, g, g)  # (S, C, g, g)
    # Rows (columns) with the same taps get the same values: the band a crop removed and the
    # border beyond the outermost token centres. Solve the distinct ones, then expand.
    y0, _, wy, x0, _, wx = transform.taps(g)  # the second tap follows from the first
    (y0, wy), rows = _distinct(y0, wy)
    (x0, wx), cols = _distinct(x0, wx)
    taps = _Taps(y0, wy, x0, wx, g, logits.device)
    if max_elements is None:
        max_elements = MAX_ELEMENTS["cpu" if grid_logits.device.type == "cpu" else "other"]
    per_stage = 4 * C * (g * SUBDIVISIONS) ** 2  # the sub-cell tests' temporaries, at most
    step = max(1, max_elements // per_stage)
    pred = torch.cat([_argmax(part, taps, max_elements) for part in logits.split(step)])
    rows, cols = _to_device(rows, pred.device), _to_device(cols, pred.device)
    return pred[:, rows][:, :, cols].reshape(*lead, transform.height, transform.width)


def _distinct(lo: np.ndarray, w: np.ndarray) -> tuple[tuple, np.ndarray]:
    """The distinct (lo, w) taps, in order, and the index of each original one among them."""
    key = np.stack([lo, w.view(np.int32)], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return (lo[first], w[first]), inverse.reshape(-1)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; pinned and non-blocking to a GPU (no host sync)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class _Taps:
    """The first grid row and weight of every row (``Transform.taps``'s y0, wy), likewise of
    every column, on the logits' device, and the rows (columns) of each sub-cell row (column).

    Everything is built on the host (it depends only on the geometry) and copied once, pinned
    and non-blocking: reading sizes back from the device would cost a host sync per image."""

    def __init__(self, y0, wy, x0, wx, g: int, device: torch.device):
        s = SUBDIVISIONS
        # Row i lies in sub-row y0 * s + floor(wy * s) of the fine (g * s) grid; likewise columns.
        fine_y = y0 * s + np.minimum((wy * np.float32(s)).astype(np.int64), s - 1)
        fine_x = x0 * s + np.minimum((wx * np.float32(s)).astype(np.int64), s - 1)
        rows, has_rows = _members(fine_y, g * s)
        cols, has_cols = _members(fine_x, g * s)
        host = (wy, wx, fine_y, fine_x, rows, has_rows, cols, has_cols)
        moved = [_to_device(a, device) for a in host]
        self.wy, self.wx, self.fine_y, self.fine_x = moved[:4]
        self.rows, self.has_rows, self.cols, self.has_cols = moved[4:]


def _members(fine: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (rows or columns) of each of n sub-rows, from the non-decreasing (H,) sub-row
    of every pixel: (n, m) indices, padded by repeating the sub-row's last pixel (which gets
    the same value twice), and whether the sub-row has any pixel (n,)."""
    size = np.bincount(fine, minlength=n)  # (n,)
    first = np.cumsum(size) - size
    offset = np.arange(int(size.max()))
    index = first[:, None] + np.minimum(offset, np.maximum(size[:, None] - 1, 0))
    return np.minimum(index, len(fine) - 1), size > 0


def _argmax(logits: torch.Tensor, taps: _Taps, max_elements: int) -> torch.Tensor:
    """(S, C, g, g) -> (S, H, W) class ids (see ``upsampled_argmax``)."""
    S, _, g, _ = logits.shape
    s, dev = SUBDIVISIONS, logits.device
    nxt = torch.arange(1, g + 1, device=dev).clamp_max(g - 1)  # the clamped next row / column
    last = logits.permute(0, 2, 3, 1).contiguous()  # (S, g, g, C): classes last, contiguous
    corners = _corners_of(last, nxt)  # 4 x (S, g, g, C): each cell's corners
    slack = torch.stack(_corners_of(last.abs(), nxt)).amax(0) * _SLACK  # per class and cell
    # First whole cells: most are decided there. Then the sub-cells of the others (with pixels).
    best = torch.stack(_corners_of(last.argmax(-1), nxt), -1)  # (S, g, g, 4): corner winners
    candidate = _survivors(corners, slack, best)  # (S, g, g, C)
    winner = best[..., 0].repeat_interleave(s, 1).repeat_interleave(s, 2)  # (S, g s, g s)
    has_rows, has_cols = taps.has_rows.view(g, s), taps.has_cols.view(g, s)
    open_cells = (candidate.sum(-1) > 1) & has_rows.any(1)[:, None] & has_cols.any(1)[None]
    stage, row, col = open_cells.nonzero().unbind(1)  # (A,) each
    if len(stage):
        fine = _sub_corner_values([v[stage, row, col] for v in corners])  # (A, s+1, s+1, C)
        sub_corners = [fine[:, y, x] for y, x in _QUARTERS]
        best = torch.stack([fine.argmax(-1)[:, y, x] for y, x in _QUARTERS], -1)  # (A, s, s, 4)
        candidate = _survivors(sub_corners, slack[stage, row, col][:, None, None], best)
        winner.view(S, g, s, g, s)[stage, row, :, col] = best[..., 0]  # (A, s, s)
    pred = winner[:, taps.fine_y][:, :, taps.fine_x]  # (S, H, W): right where one candidate is
    if not len(stage):
        return pred
    # Sub-cells with several candidates (and pixels): interpolate their pixels, for the
    # candidates only, in buckets of up to 2, 4, 8, ... candidates and in chunks.
    count = candidate.sum(-1)  # (A, s, s)
    ambiguous = (count > 1) & has_rows[row][:, :, None] & has_cols[col][:, None, :]
    cell, a, b = ambiguous.nonzero().unbind(1)  # the order of ``[ambiguous]``
    stage, row, col = stage[cell], row[cell], col[cell]
    fine_row, fine_col = row * s + a, col * s + b
    # Integer indices, not the boolean mask again: each boolean index is a host sync on CUDA.
    ids, table = _candidates(last, candidate[cell, a, b], stage, row, col, nxt)
    need = count[cell, a, b]
    per_cell = taps.rows.shape[1] * taps.cols.shape[1]
    low = 1
    for width in _bucket_widths(ids.shape[1]) if len(ids) else ():
        chosen = ((need > low) & (need <= width)).nonzero()[:, 0]
        ids_w, table_w = ids[:, :width], table[:, :, :width]
        for part in chosen.split(max(1, max_elements // (width * per_cell))):
            rows, cols = taps.rows[fine_row[part]], taps.cols[fine_col[part]]  # (P, m), (P, n)
            win = _best_candidate(ids_w[part], table_w[part], taps.wy[rows], taps.wx[cols])
            pred[stage[part][:, None, None], rows[:, :, None], cols[:, None]] = win
        low = width
    return pred


def _corners_of(cells: torch.Tensor, nxt: torch.Tensor) -> list[torch.Tensor]:
    """(S, g, g, ...) per grid point -> its value at the four corners of each cell, in
    ``_survivors``' order."""
    return [cells, cells[:, nxt], cells[:, :, nxt], cells[:, nxt][:, :, nxt]]


def _survivors(
    corners: list[torch.Tensor], slack: torch.Tensor, best: torch.Tensor
) -> torch.Tensor:
    """(..., C) bool: the classes that can win somewhere in each rectangle (the corner winners
    always among them), from their values at its four corners (4 x (..., C), in the order
    (top, left), (bottom, left), (top, right), (bottom, right)), their rounding margins
    (broadcastable to (..., C)) and the (..., 4) class winning each corner."""
    # At each corner, the mean of the distinct classes that win a corner (one winning several
    # counts once), less the largest of their margins.
    share = 1 / (best[..., :, None] == best[..., None, :]).sum(-1)  # (..., 4)
    margin = slack.expand_as(corners[0]).gather(-1, best).amax(-1, keepdim=True)
    candidate = torch.zeros_like(corners[0], dtype=torch.bool)
    for v in corners:
        floor = (v.gather(-1, best) * share).sum(-1, keepdim=True) / share.sum(-1, keepdim=True)
        candidate |= v + slack >= floor - margin
    return candidate


def _candidates(
    last: torch.Tensor,
    candidate: torch.Tensor,
    stage: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    nxt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ambiguous sub-cell (its (A, C) ``candidate`` mask, in cell (``row``, ``col``)
    of ``stage``), its candidates by ascending class id, padded with C: (A, K); and their
    logits at the four corners of the cell, in ``_survivors``' order: (A, 4, K), the lowest
    float32 for padding."""
    C, dev = last.shape[-1], last.device
    if not len(candidate):
        return candidate.new_zeros((0, 0), dtype=torch.long), last.new_zeros((0, 4, 0))
    K = int(candidate.sum(-1).max())
    slot = torch.where(candidate, candidate.cumsum(-1) - 1, K)  # the rest go to a spare slot
    ids = torch.full((len(candidate), K + 1), C, dtype=torch.long, device=dev)
    ids.scatter_(-1, slot, torch.arange(C, device=dev).expand_as(slot))
    ids = ids[:, :K]
    at = ids.clamp_max(C - 1)
    rows_cols = ((row, col), (nxt[row], col), (row, nxt[col]), (nxt[row], nxt[col]))
    table = torch.stack([last[stage, y, x].gather(-1, at) for y, x in rows_cols], dim=1)
    # Padding reads the lowest float32 at every corner: its value (that, or -inf if the lerp
    # overflows) never beats a real candidate, and a tie goes to the real one, in a lower slot.
    table.masked_fill_((ids == C)[:, None], torch.finfo(torch.float32).min)
    return ids, table


def _sub_corner_values(cell_corners: list[torch.Tensor]) -> torch.Tensor:
    """The four (A, C) corner logits of A cells -> each class at the (s + 1) x (s + 1) corners
    of their s x s sub-cells: (A, s + 1, s + 1, C) (``_QUARTERS`` picks each sub-cell's four).

    Sub-cell corner (a, b) sits at fraction (a / s, b / s) of its cell (a, b in 0..s), with
    ``Transform.logits_to_original``'s expression (across columns, then rows), so its rounding
    is a pixel's.
    """
    top_left, bottom_left, top_right, bottom_right = (v[:, None, :] for v in cell_corners)
    s, dev = SUBDIVISIONS, top_left.device
    w = (torch.arange(s + 1, device=dev, dtype=torch.float32) / s)[:, None]  # exact: s = 2^k
    top, bottom = lerp(top_left, top_right, w), lerp(bottom_left, bottom_right, w)  # (A, s+1, C)
    fine = lerp(top[:, None], bottom[:, None], w[:, :, None])  # (A, s + 1, s + 1, C)
    return fine


def _bucket_widths(k_max: int):
    width = 2
    while width < k_max:
        yield width
        width *= 2
    yield k_max


def _best_candidate(
    cls: torch.Tensor, corner: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor
) -> torch.Tensor:
    """(A, m, n): for each of A sub-cells, the class of each of its m x n pixels: the argmax
    over the candidates ``cls`` (A, K) of the pixel's upsampled logits, from the candidates'
    (A, 4, K) cell-corner logits and the pixels' row and column weights (A, m), (A, n), with
    ``Transform.logits_to_original``'s expression (the same float32 values)."""
    top_left, bottom_left, top_right, bottom_right = corner[:, :, None].unbind(1)  # (A, 1, K)
    w = wx[:, :, None]  # (A, n, 1)
    top, bottom = lerp(top_left, top_right, w), lerp(bottom_left, bottom_right, w)  # (A, n, K)
    value = lerp(top[:, None], bottom[:, None], wy[:, :, None, None])  # (A, m, n, K)
    best = value.argmax(-1)  # (A, m, n)
    return cls.gather(1, best.flatten(1)).view_as(best)
