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


def _segments_of_row(is_image: list[bool], grids: list, row: int) -> tuple[list, list]:
    """Split one row's token kinds into text runs and image grids, consuming `grids` in order."""
    segments, position, remaining = [], 0, list(grids)
    while position < len(is_image):
        end = position
        while end < len(is_image) and is_image[end] == is_image[position]:
            end += 1
        run = end - position
        if not is_image[position]:
            segments.append(run)
        else:
            covered = 0
            while covered < run:
                if not remaining:
                    raise ValueError(f"row {row}: {run} image tokens at positions {position}..{end - 1} but no image "
                                     "grid left for them; pass one (height, width) per image.")
                height, width = remaining.pop(0)
                segments.append((int(height), int(width)))
                covered += int(height) * int(width)
            if covered != run:
                raise ValueError(f"row {row}: the image grids cover {covered} patch tokens but the run at positions "
                                 f"{position}..{end - 1} has {run}; each grid's height × width must equal its number "
                                 "of patch tokens.")
        position = end
    return segments, remaining


def build_position_ids(image_token_mask: torch.Tensor, image_grids: list, layout: str,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions [axes, batch, seq] (float64) of a batch of interleaved sequences.

    Args:
        image_token_mask: [batch, seq] bool, True at image patch tokens.
        image_grids: per row, the (height, width) of its images in order (a row without images: an empty list).
        layout: one of `POSITION_LAYOUTS`.
        attention_mask: [batch, seq], 0 at padding; padding is left out of the layout (its positions are 0), so a
            left-padded row gets the positions it would have alone.

    Decoding: the positions of new tokens are the last columns of the positions of the whole sequence so far;
    nothing is carried over between calls.
    """
    axes = _check_layout(layout)
    batch, length = image_token_mask.shape
    if len(image_grids) != batch:
        raise ValueError(f"image_grids needs one list of grids per row ({batch}), got {len(image_grids)}.")
    positions = torch.zeros(axes, batch, length, dtype=torch.float64)
    keep = torch.ones_like(image_token_mask, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for row in range(batch):
        kept = keep[row].nonzero().flatten()
        segments, unused = _segments_of_row(image_token_mask[row, kept].tolist(), image_grids[row], row)
        if unused:
            raise ValueError(f"row {row}: {len(unused)} image grid(s) {unused} left without patch tokens.")
        positions[:, row, kept] = segment_positions(segments, layout)
    return positions


def image_grids_per_row(image_grid_hw: torch.Tensor | None, batch: int) -> list[list[tuple[int, int]]]:
    """The (height, width) grids of each row from a [batch, max_images, 2] tensor padded with (0, 0) rows."""
    if image_grid_hw is None:
        return [[] for _ in range(batch)]
    if image_grid_hw.dim() != 3 or image_grid_hw.shape[0] != batch or image_grid_hw.shape[-1] != 2:
        raise ValueError(f"image_grid_hw must be [batch={batch}, max_images, 2] (height, width per image, (0, 0) for "
                         f"no image), got shape {tuple(image_grid_hw.shape)}.")
    return [[(h, w) for h, w in row if h > 0 and w > 0] for row in image_grid_hw.tolist()]


def check_image_markers(input_ids: torch.Tensor, image_token_id: int, start_token_id: int, end_token_id: int,
                        attention_mask: torch.Tensor | None = None) -> None:
    """Raise a ValueError unless every image is `start, patch tokens…, end` and no marker is left without its pair."""
    markers = torch.tensor([image_token_id, start_token_id, end_token_id], device=input_ids.device)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = (torch.isin(input_ids, markers) & keep).any(dim=1).nonzero().flatten().tolist()
    for row in rows:
        state, opened_at = "text", None  # text -> started (after start) -> patches (after ≥ 1 patch) -> text
        for index in keep[row].nonzero().flatten().tolist():
            token = int(input_ids[row, index])
            if token == start_token_id:
                if state != "text":
                    raise ValueError(f"row {row}: image-start marker at index {index} inside the image opened at "
                                     f"index {opened_at}; close each image with image_end_token_id first.")
                state, opened_at = "started", index
            elif token == image_token_id:
                if state == "text":
                    raise ValueError(f"row {row}: image patch token at index {index} outside an image; patch tokens "
                                     "must sit between image_start_token_id and image_end_token_id.")
                state = "patches"
            elif token == end_token_id:
                if state != "patches":
                    what = "an image without patch tokens" if state == "started" else "no open image"
                    raise ValueError(f"row {row}: image-end marker at index {index} closes {what}.")
                state = "text"
            elif state != "text":
                raise ValueError(f"row {row}: the image opened at index {opened_at} is not closed before the text "
                                 f"token at index {index}; each image-start marker needs its image-end marker.")
        if state != "text":
            raise ValueError(f"row {row}: the image-start marker at index {opened_at} has no image-end marker.")


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
    if assignment == "interleaved":
        axis_of_frequency = torch.arange(count) % axes
    else:
        if sections is None or sum(sections) != count or any(s < 0 for s in sections):
            raise ValueError(f"`sections` must be non-negative block sizes summing to the {count} rotary frequencies, "
                             f"got {sections!r}.")
        axis_of_frequency = torch.cat([torch.full((size,), i % axes) for i, size in enumerate(sections)])
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [axes, batch, seq, d/2]
    index = axis_of_frequency.to(positions.device).expand(*angles.shape[1:3], count)[None]
    return angles.gather(0, index)[0]
