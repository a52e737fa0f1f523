"""Positions of interleaved text and image tokens (RoPE-Tie, kexue.fm posts 10040 and 10352), as pure functions.

A sequence is a list of segments: text runs and image grids of h rows × w columns of patch tokens (row-major). Each
layout gives every token a position per axis; text tokens get the same value on every axis, so on pure text every
layout reduces to RoPE-1D positions 0, 1, 2, … With L the position of the last token before an image (start − 1 if
the image comes first) and a patch at row r, column c (1-based):

==============  ==================================================  =====================================
layout          patch (r, c)                                         next token after the image
==============  ==================================================  =====================================
flatten         L + (r − 1)·w + c                                    L + wh + 1
mrope           (L + 1, L + r, L + c)   (Qwen2-VL: time, row, col)   L + max(h, w) + 1
rope_tie_v1     (L + r·(w + 1), L + c·(h + 1))                       L + (w + 1)(h + 1)
rope_tie_v2     (L + (wh − h)/2 + r, L + (wh − w)/2 + c)             L + wh + 1
==============  ==================================================  =====================================

RoPE-Tie-v2 positions can be half-integers, so positions are float64. Nothing is remembered between calls: the
positions of any token follow from the segments before it, so decoding needs no `rope_deltas` state.
No transformers imports here: this file travels with checkpoints (the HfExt model computes its positions here).
"""

import itertools
import operator

import torch

POSITION_LAYOUTS = ("flatten", "mrope", "rope_tie_v1", "rope_tie_v2")
POSITION_AXES = {"flatten": 1, "mrope": 3, "rope_tie_v1": 2, "rope_tie_v2": 2}


def _check_layout(layout: str) -> int:
    if layout not in POSITION_AXES:
        raise ValueError(f"unknown position layout {layout!r}; allowed layouts are {list(POSITION_LAYOUTS)}.")
    return POSITION_AXES[layout]


def _image_positions(layout: str, last: float, height: int, width: int) -> tuple[torch.Tensor, float]:
    """Positions [axes, h·w] of an image's patches after a token at position `last`, and the next token's position."""
    rows = torch.arange(1, height + 1, dtype=torch.float64).repeat_interleave(width)
    cols = torch.arange(1, width + 1, dtype=torch.float64).repeat(height)
    area = height * width
    if layout == "flatten":
        return (last + torch.arange(1, area + 1, dtype=torch.float64))[None], last + area + 1
    if layout == "mrope":
        return torch.stack([torch.full_like(rows, last + 1), last + rows, last + cols]), last + max(height, width) + 1
    if layout == "rope_tie_v1":
        return torch.stack([last + rows * (width + 1), last + cols * (height + 1)]), last + (width + 1) * (height + 1)
    row_start, col_start = last + (area - height) / 2, last + (area - width) / 2  # rope_tie_v2
    return torch.stack([row_start + rows, col_start + cols]), last + area + 1


def segment_positions(segments: list, layout: str, start: float = 0.0) -> torch.Tensor:
    """Positions [axes, tokens] (float64) of one sequence.

    Args:
        segments: in order, `int` n for n text tokens, or `(height, width)` for an image of that many patch rows and
            columns (row-major patch tokens).
        layout: one of `POSITION_LAYOUTS`.
        start: position of the first token.

    Example (the worked example of RoPE-Tie-v2: 3 text tokens, a 2×3 image, 2 text tokens):
        >>> segment_positions([3, (2, 3), 2], "rope_tie_v2")[:, 3:6].tolist()
        [[5.0, 5.0, 5.0], [4.5, 5.5, 6.5]]
    """
    axes = _check_layout(layout)
    pieces, next_position = [], float(start)
    for index, segment in enumerate(segments):
        if isinstance(segment, int) and not isinstance(segment, bool):
            if segment < 0:
                raise ValueError(f"segments[{index}]: a text run needs a non-negative length, got {segment}.")
            text = next_position + torch.arange(segment, dtype=torch.float64)
            pieces.append(text.expand(axes, -1))
            next_position += segment
        elif (isinstance(segment, (tuple, list)) and len(segment) == 2
              and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in segment)):
            positions, next_position = _image_positions(layout, next_position - 1, *segment)
            pieces.append(positions)
        else:
            raise ValueError(f"segments[{index}] must be a text length (int) or an image grid (height, width) of "
                             f"positive ints, got {segment!r}.")
    if not pieces:
        return torch.zeros(axes, 0, dtype=torch.float64)
    return torch.cat(pieces, dim=1)


def build_position_ids(image_token_mask: torch.Tensor, image_grids, layout: str,
                       attention_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Positions [axes, batch, seq] of a batch of interleaved sequences (what `segment_positions` gives each row).

    Args:
        image_token_mask: [batch, seq] bool, True at image patch tokens.
        image_grids: the (height, width) of each row's images in order: per row a list (a row without images: an
            empty list), or a [batch, max_images, 2] integer tensor padded with (0, 0); None: no images.
        layout: one of `POSITION_LAYOUTS`.
        attention_mask: [batch, seq], 0 at padding; padding is left out of the layout (its positions are 0), so a
            left-padded row gets the positions it would have alone.
        dtype: of the positions (float64 by default; RoPE-Tie-v2's half-integers are exact in either float).

    Runs where `image_token_mask` lives, in whole-batch tensor operations: no value goes back to the host (that
    would make the host wait for the device at every forward) but the one flag of its check (see `_refuse_if`).
    Decoding: the positions of new tokens are the last columns of the positions of the whole sequence so far;
    nothing is carried over between calls.
    """
    _check_layout(layout)
    batch, device = image_token_mask.shape[0], image_token_mask.device
    grids = _grid_tensor(image_grids, batch, device)
    is_patch = image_token_mask.bool()
    keep = torch.ones_like(is_patch) if attention_mask is None else _to_device(attention_mask, device).bool()
    doubled, malformed = _doubled_positions(layout, is_patch & keep, keep, grids)
    _refuse_if(malformed.any(), lambda: _layout_problem(is_patch, keep, grids))
    # Positions are multiples of 1/2: twice them are integers, exact until this division (in float32 too).
    return doubled.to(dtype) / 2


def _grid_tensor(image_grids, batch: int, device: torch.device) -> torch.Tensor:
    """The grids as a [batch, max_images + 1, 2] int64 tensor on `device`, padded with (0, 0); the extra column
    keeps "the image after the last one" a valid index."""
    if image_grids is None:
        image_grids = [[] for _ in range(batch)]
    if isinstance(image_grids, torch.Tensor):
        if image_grids.dim() != 3 or image_grids.shape[0] != batch or image_grids.shape[-1] != 2:
            raise ValueError(f"image_grid_hw must be [batch={batch}, max_images, 2] (height, width per image, (0, 0) "
                             f"for no image), got shape {tuple(image_grids.shape)}.")
        grids = _to_device(image_grids, device, torch.long)
    else:
        if len(image_grids) != batch:
            raise ValueError(f"image_grids needs one list of grids per row ({batch}), got {len(image_grids)}.")
        checked = [[_checked_grid(grid, f"image_grids[{row}][{index}]") for index, grid in enumerate(row_grids)]
                   for row, row_grids in enumerate(image_grids)]
        most = max(map(len, checked), default=0)
        padded = [row_grids + [(0, 0)] * (most - len(row_grids)) for row_grids in checked]
        grids = _to_device(torch.tensor(padded, dtype=torch.long).reshape(batch, most, 2), device)
    return torch.cat([grids, grids.new_zeros(batch, 1, 2)], dim=1)


def _checked_grid(grid, name: str) -> tuple[int, int]:
    """A (height, width) pair of positive integers (Python, NumPy or one-element tensors) as Python ints."""
    try:
        values = list(grid)
        height, width = map(operator.index, values)
    except (TypeError, ValueError):
        values, height, width = [], 0, 0
    if isinstance(grid, (str, bytes)) or any(isinstance(n, bool) for n in values) or height <= 0 or width <= 0:
        raise ValueError(f"{name} must be an image grid (height, width) of positive ints, got {grid!r}.")
    return height, width


def _to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device`. From the host to an accelerator the copy does not make the host wait for the device (a
    blocking copy would); to the CPU it must block, or the values could be read before they land."""
    return tensor.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def _image_advance(layout: str, height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """How much further than after a single text token the token after an image is placed (the module
    docstring's table: its position minus L + 1)."""
    if layout == "mrope":
        return torch.maximum(height, width)
    if layout == "rope_tie_v1":
        return (width + 1) * (height + 1) - 1
    return height * width  # flatten, rope_tie_v2


def _doubled_patch_positions(layout: str, last: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                             height: torch.Tensor, width: torch.Tensor) -> list[torch.Tensor]:
    """Twice the position, per axis, of the patch at (row, col) (1-based); `last` is twice L (the module
    docstring's table)."""
    if layout == "flatten":
        return [last + 2 * ((row - 1) * width + col)]
    if layout == "mrope":
        return [last + 2, last + 2 * row, last + 2 * col]
    if layout == "rope_tie_v1":
        return [last + 2 * row * (width + 1), last + 2 * col * (height + 1)]
    area = height * width  # rope_tie_v2
    return [last + (area - height) + 2 * row, last + (area - width) + 2 * col]


def _exclusive_cumsum(flags: torch.Tensor) -> torch.Tensor:
    """Per token, how many tokens before it in its row are flagged."""
    counts = flags.long()
    return counts.cumsum(dim=1) - counts


def _previous_kept_is(flags: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per token, whether the closest kept token before it (padding skipped) is flagged; False for the first."""
    index = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    last_kept = torch.where(keep, index, -1).cummax(dim=1).values  # the last kept token at or before each token
    before = torch.cat([last_kept.new_full((keep.shape[0], 1), -1), last_kept], dim=1)[:, :-1]
    return flags.gather(1, before.clamp(min=0)) & (before >= 0)


def _doubled_positions(layout: str, patch: torch.Tensor, keep: torch.Tensor,
                       grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Twice the positions [axes, batch, seq] (int64) of the kept tokens (0 at padding), and per row whether its
    patch tokens fail to match its grids. `patch`: the kept patch tokens; `grids`: from `_grid_tensor`.

    A token's position is the number of text tokens before it plus what the images before it add
    (`_image_advance`); the p-th patch token of a row (from 0) belongs to the first image whose patches end after p.
    """
    height, width = grids.unbind(dim=-1)
    present = (height > 0) & (width > 0)  # (0, 0) pads; like it, a non-positive size means no image
    height, width = height.where(present, 0), width.where(present, 0)
    area = height * width
    ends = area.cumsum(dim=1)
    advance = _image_advance(layout, height, width)
    advance_before = advance.cumsum(dim=1) - advance

    patches_before = _exclusive_cumsum(patch)
    # At a patch token: its own image. At a text token: the first image after it (past the last: the pad column).
    image = torch.searchsorted(ends, patches_before, right=True).clamp(max=grids.shape[1] - 1)
    base = _exclusive_cumsum(keep & ~patch) + advance_before.gather(1, image)  # a text token's position; L + 1
    within = patches_before - (ends - area).gather(1, image)  # the patch's index inside its image
    image_width = width.gather(1, image).clamp(min=1)  # ≥ 1: a malformed row must not divide by zero
    row, col = within // image_width + 1, within % image_width + 1
    patch_axes = _doubled_patch_positions(layout, 2 * (base - 1), row, col, height.gather(1, image), image_width)
    doubled = torch.stack([torch.where(patch, axis, 2 * base) for axis in patch_axes]).where(keep, 0)

    # The grids fit when they hold exactly the row's patch tokens and every run of patch tokens begins an image (a
    # run may hold several images back to back; text inside an image would begin a run in the image's middle).
    run_starts_mid_image = patch & ~_previous_kept_is(patch, keep) & (within != 0)
    malformed = (patch.sum(dim=1) != area.sum(dim=1)) | run_starts_mid_image.any(dim=1)
    return doubled, malformed


def _refuse_if(problem: torch.Tensor, describe) -> None:
    """Raise ValueError(describe()) if the one-element bool tensor `problem` is True.

    Reading the flag makes the host wait for the device once per check, after the positions are queued: a scalar,
    not the copies and Python loops of a host-side builder. It is kept on CUDA too, because the alternative, a
    queued device-side assertion, would leave the user's CUDA context unusable on malformed input instead of
    naming the problem.
    """
    if problem:
        raise ValueError(describe())


def _layout_problem(is_patch: torch.Tensor, keep: torch.Tensor, grids: torch.Tensor) -> str:
    """The error message for the first row whose patch tokens do not match its grids (an error path: host loops)."""
    for row in range(is_patch.shape[0]):
        kept = keep[row].nonzero().flatten()
        row_grids = [(h, w) for h, w in grids[row].tolist() if h > 0 and w > 0]
        problem = _row_layout_problem(is_patch[row, kept].tolist(), row_grids, row)
        if problem is not None:
            return problem
    return "the image patch tokens do not match the image grids."


def _row_layout_problem(is_image: list[bool], grids: list, row: int) -> str | None:
    """What is wrong with one row, if anything: its runs of image tokens must be covered, in order, by whole grids."""
    position, remaining = 0, list(grids)
    while position < len(is_image):
        end = position
        while end < len(is_image) and is_image[end] == is_image[position]:
            end += 1
        run, covered = end - position, 0
        while is_image[position] and covered < run:
            if not remaining:
                return (f"row {row}: {run} image tokens at positions {position}..{end - 1} but no image grid left "
                        "for them; pass one (height, width) per image.")
            height, width = remaining.pop(0)
            covered += height * width
        if is_image[position] and covered != run:
            return (f"row {row}: the image grids cover {covered} patch tokens but the run at positions "
                    f"{position}..{end - 1} has {run}; each grid's height × width must equal its number of patch "
                    "tokens.")
        position = end
    if remaining:
        return f"row {row}: {len(remaining)} image grid(s) {remaining} left without patch tokens."
    return None


def check_image_markers(input_ids: torch.Tensor, image_token_id: int, start_token_id: int, end_token_id: int,
                        attention_mask: torch.Tensor | None = None) -> None:
    """Raise a ValueError unless every image is `start, patch tokens…, end` and no marker is left without its pair.

    Checked in whole-batch tensor operations where `input_ids` lives; one flag is read (`_refuse_if`). Counting the images open after each kept token: 0 or 1 everywhere, 1 at patch tokens, 0 at text
    tokens; an end marker needs a patch token just before it, and each row must close every image it opens.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_start, is_patch, is_end = ((input_ids == token) & keep for token in (start_token_id, image_token_id,
                                                                           end_token_id))
    is_text = keep & ~(is_start | is_patch | is_end)
    open_images = is_start.long().cumsum(dim=1) - is_end.long().cumsum(dim=1)
    wrong = keep & ((open_images < 0) | (open_images > 1))
    wrong |= (is_patch & (open_images != 1)) | (is_text & (open_images != 0))
    wrong |= is_end & ~_previous_kept_is(is_patch, keep)
    malformed = wrong.any(dim=1) | (is_start.sum(dim=1) != is_end.sum(dim=1))
    _refuse_if(malformed.any(), lambda: _marker_problem(input_ids, keep, image_token_id, start_token_id,
                                                        end_token_id))


def _marker_problem(input_ids: torch.Tensor, keep: torch.Tensor, image_token_id: int, start_token_id: int,
                    end_token_id: int) -> str:
    """The error message for the first row whose markers are wrong (an error path: it walks the tokens)."""
    for row in range(input_ids.shape[0]):
        state, opened_at = "text", None  # text -> started (after start) -> patches (after ≥ 1 patch) -> text
        for index in keep[row].nonzero().flatten().tolist():
            token = int(input_ids[row, index])
            if token == start_token_id:
                if state != "text":
                    return (f"row {row}: image-start marker at index {index} inside the image opened at index "
                            f"{opened_at}; close each image with image_end_token_id first.")
                state, opened_at = "started", index
            elif token == image_token_id:
                if state == "text":
                    return (f"row {row}: image patch token at index {index} outside an image; patch tokens must sit "
                            "between image_start_token_id and image_end_token_id.")
                state = "patches"
            elif token == end_token_id:
                if state != "patches":
                    what = "an image without patch tokens" if state == "started" else "no open image"
                    return f"row {row}: image-end marker at index {index} closes {what}."
                state = "text"
            elif state != "text":
                return (f"row {row}: the image opened at index {opened_at} is not closed before the text token at "
                        f"index {index}; each image-start marker needs its image-end marker.")
        if state != "text":
            return f"row {row}: the image-start marker at index {opened_at} has no image-end marker."
    return "the image markers are not paired."


FREQUENCY_ASSIGNMENTS = ("interleaved", "sections")
LAYOUT_FREQUENCY_ASSIGNMENT = {"flatten": "interleaved", "mrope": "sections", "rope_tie_v1": "interleaved",
                               "rope_tie_v2": "interleaved"}


def multi_axis_angles(positions: torch.Tensor, inv_freq: torch.Tensor, assignment: str = "interleaved",
                      sections: list[int] | None = None) -> torch.Tensor:
    """Rotary angles [batch, seq, d/2] when frequency f follows one axis of the positions [axes, batch, seq].

    `assignment="interleaved"` (RoPE-Tie): frequency f follows axis f mod axes, so text (equal axes) gets exactly
    RoPE-1D. `assignment="sections"` (Qwen2-VL M-RoPE): contiguous blocks of `sections` frequencies, block i following
    axis i mod axes. Angles are computed in `inv_freq`'s dtype, as transformers' rotary modules do; build the tables
    as cos/sin of cat(angles, angles).
    """
    if assignment not in FREQUENCY_ASSIGNMENTS:
        raise ValueError(f"unknown frequency assignment {assignment!r}; allowed: {list(FREQUENCY_ASSIGNMENTS)}.")
    axes, count = positions.shape[0], inv_freq.shape[0]
    # Made on the device from Python ints: a table copied from the host would make the host wait at every forward.
    frequency = torch.arange(count, device=positions.device)
    if assignment == "interleaved":
        axis_of_frequency = frequency % axes
    else:
        if sections is None or sum(sections) != count or any(s < 0 for s in sections):
            raise ValueError(f"`sections` must be non-negative block sizes summing to the {count} rotary frequencies, "
                             f"got {sections!r}.")
        block = torch.zeros_like(frequency)  # each frequency's section: how many sections end at or before it
        for end in itertools.accumulate(sections[:-1]):
            block += frequency >= end
        axis_of_frequency = block % axes
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [axes, batch, seq, d/2]
    index = axis_of_frequency.expand(*angles.shape[1:3], count)[None]
    return angles.gather(0, index)[0]
