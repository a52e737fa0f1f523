"""RoPE-Tie position builder: the spec's worked examples, text-only = RoPE-1D, the v2
properties (symmetry, equivalence), M-RoPE = transformers' Qwen2-VL `get_rope_index`, padding, errors."""

import types

import pytest
import torch
from conftest import merged_qwen2_vl_tables

from hf_ext.models.hfext.positions_hfext import POSITION_LAYOUTS, build_position_ids, segment_positions

EXAMPLE = [3, (2, 3), 2]  # 3 text tokens, an image of 2 rows × 3 columns, 2 text tokens


@pytest.mark.smoke
def test_rope_tie_v2_worked_example():
    expected = [[0, 1, 2, 5, 5, 5, 6, 6, 6, 9, 10],
                [0, 1, 2, 4.5, 5.5, 6.5, 4.5, 5.5, 6.5, 9, 10]]
    assert segment_positions(EXAMPLE, "rope_tie_v2").tolist() == expected


def test_rope_tie_v1_worked_example():
    expected = [[0, 1, 2, 6, 6, 6, 10, 10, 10, 14, 15],
                [0, 1, 2, 5, 8, 11, 5, 8, 11, 14, 15]]
    assert segment_positions(EXAMPLE, "rope_tie_v1").tolist() == expected


def test_mrope_and_flatten_on_the_worked_example():
    assert segment_positions(EXAMPLE, "flatten").tolist() == [list(range(11))]
    assert segment_positions(EXAMPLE, "mrope").tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
                                                            [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
                                                            [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("layout", POSITION_LAYOUTS)
def test_text_only_is_rope_1d_on_every_axis(layout):
    positions = segment_positions([7], layout, start=4)
    assert torch.equal(positions, torch.arange(4, 11, dtype=torch.float64).expand(positions.shape[0], -1))


@pytest.mark.parametrize("height, width", [(2, 3), (3, 2), (4, 4), (1, 5)])
def test_rope_tie_v2_is_symmetric_and_equivalent(height, width):
    positions = segment_positions([2, (height, width), 1], "rope_tie_v2")
    first, last, after = positions[:, 2], positions[:, 1 + height * width], positions[:, -1]
    torch.testing.assert_close(first - positions[:, 1], after - last)  # the gap into the image = the gap out of it
    assert after.tolist() == [2 + height * width] * 2  # an h×w image spans what h·w text tokens span
    # unit spacing inside the image: neighbours one row / one column apart
    grid = positions[:, 2: 2 + height * width].view(2, height, width)
    assert (grid[0, 1:] - grid[0, :-1] == 1).all() and (grid[1, :, 1:] - grid[1, :, :-1] == 1).all()


@pytest.mark.parametrize("size", [4, 6, 8])
def test_row_axis_distance_from_the_token_after_an_image_to_each_row(size):
    """The row-axis distance from the first token after a size × size image to row r (column 1), per layout, as
    benchmarks/about/ropetie_digit_canvas.md states it: it grows with the image in every layout."""
    positions = {layout: segment_positions([1, (size, size), 2], layout) for layout in POSITION_LAYOUTS}
    after_image = 1 + size * size  # one text token, the patches, then the first token after them
    expected = {
        "flatten": lambda r: size * size - (r - 1) * size,
        "rope_tie_v1": lambda r: (size + 1) * (size + 1 - r),
        "rope_tie_v2": lambda r: (size * size + size) / 2 + 1 - r,
        "mrope": lambda r: size + 1 - r,
    }
    for layout, distance in expected.items():
        row_axis = positions[layout][1 if layout == "mrope" else 0]  # mrope: (time, row, column)
        for r in range(1, size + 1):
            assert float(row_axis[after_image] - row_axis[1 + (r - 1) * size]) == distance(r), (layout, r)


def test_positions_are_shift_invariant_in_start():
    for layout in POSITION_LAYOUTS:
        torch.testing.assert_close(segment_positions(EXAMPLE, layout, start=10),
                                   segment_positions(EXAMPLE, layout) + 10)


def _qwen2_vl_rope_index(input_ids, token_types, grids, attention_mask):
    """transformers' own M-RoPE positions (Qwen2VLModel.get_rope_index), spatial merge 1, one frame per image."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    model = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=1)))
    model.get_vision_position_ids = types.MethodType(Qwen2VLModel.get_vision_position_ids, model)
    grid_thw = torch.tensor([[1, h, w] for row in grids for h, w in row])
    return Qwen2VLModel.get_rope_index(model, input_ids, token_types, image_grid_thw=grid_thw,
                                       attention_mask=attention_mask)[0]


def test_mrope_layout_equals_qwen2_vl_rope_index_with_left_padding():
    rows = [[2, (2, 3), 1, (1, 2), 2], [0, (3, 1), 4]]
    grids = [[s for s in row if isinstance(s, tuple)] for row in rows]
    kinds = [[kind for s in row for kind in ([1] * (s[0] * s[1]) if isinstance(s, tuple) else [0] * s)] for row in rows]
    length = max(map(len, kinds))
    token_types = torch.tensor([[0] * (length - len(k)) + k for k in kinds])
    attention_mask = torch.tensor([[0] * (length - len(k)) + [1] * len(k) for k in kinds])
    input_ids = torch.ones_like(token_types)
    expected = _qwen2_vl_rope_index(input_ids, token_types, grids, attention_mask)
    ours = build_position_ids(token_types.bool(), grids, "mrope", attention_mask)
    assert torch.equal(ours[:, attention_mask.bool()], expected[:, attention_mask.bool()].double())


def test_batch_rows_equal_single_sequences_and_decoding_needs_no_state():
    rows = [[3, (2, 3), 2], [1, (2, 2), 3, (1, 3), 1]]
    kinds = [[1 if isinstance(s, tuple) else 0 for s in row for _ in range(s[0] * s[1] if isinstance(s, tuple) else s)]
             for row in rows]
    length = max(map(len, kinds))
    mask = torch.tensor([[False] * (length - len(k)) + [bool(x) for x in k] for k in kinds])
    attention = torch.tensor([[0] * (length - len(k)) + [1] * len(k) for k in kinds])
    grids = [[s for s in row if isinstance(s, tuple)] for row in rows]
    for layout in POSITION_LAYOUTS:
        batch = build_position_ids(mask, grids, layout, attention)
        for row, segments in enumerate(rows):
            alone = segment_positions(segments, layout)
            torch.testing.assert_close(batch[:, row, length - alone.shape[1]:], alone)
        # positions of a prefix are the prefix of the positions: the last tokens need nothing remembered
        prefix = build_position_ids(mask[:, :-1], grids, layout, attention[:, :-1])
        torch.testing.assert_close(prefix, batch[:, :, :-1])


@pytest.mark.parametrize("call, message", [
    (lambda: segment_positions([2], "rope_tie_v3"), r"unknown position layout 'rope_tie_v3'; allowed layouts are "
                                                    r"\['flatten', 'mrope', 'rope_tie_v1', 'rope_tie_v2'\]"),
    (lambda: segment_positions([2, (2, 0)], "flatten"), r"segments\[1\] must be a text length"),
    (lambda: build_position_ids(torch.tensor([[False, True, True, True]]), [[(2, 2)]], "rope_tie_v2"),
     "the image grids cover 4 patch tokens but the run at positions 1..3 has 3"),
    (lambda: build_position_ids(torch.tensor([[False, True]]), [[]], "mrope"), "no image grid left"),
    (lambda: build_position_ids(torch.tensor([[False, True]]), [[(1, 1), (2, 2)]], "mrope"),
     r"1 image grid\(s\) \[\(2, 2\)\] left without patch tokens"),
])
def test_bad_layouts_and_grids_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_sections_assignment_equals_qwen2_vl_rotary_tables():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    from hf_ext.models.hfext.positions_hfext import multi_axis_angles

    config = Qwen2VLConfig(text_config={"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
                                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                            "mrope_section": [4, 6, 6]}})
    rotary = Qwen2VLRotaryEmbedding(config.get_text_config())
    positions = build_position_ids(torch.tensor([[False, False, True, True, True, True, True, True, False]] * 2),
                                   [[(2, 3)], [(3, 2)]], "mrope")
    cos, sin = merged_qwen2_vl_tables(*rotary(torch.zeros(1, dtype=torch.float32), positions.long()), [4, 6, 6])
    angles = multi_axis_angles(positions, rotary.inv_freq, "sections", [4, 6, 6])
    assert torch.equal(torch.cat([angles, angles], -1).cos(), cos)
    assert torch.equal(torch.cat([angles, angles], -1).sin(), sin)


def test_interleaved_assignment_follows_axis_f_mod_axes_and_is_rope_1d_on_text():
    from hf_ext.models.hfext.positions_hfext import multi_axis_angles

    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    positions = segment_positions(EXAMPLE, "rope_tie_v2")[:, None]  # [2, 1, 11]
    angles = multi_axis_angles(positions, inv_freq)
    torch.testing.assert_close(angles[0, :, 0::2], positions[0, 0, :, None] * inv_freq[0::2], rtol=0, atol=0)
    torch.testing.assert_close(angles[0, :, 1::2], positions[1, 0, :, None] * inv_freq[1::2], rtol=0, atol=0)
    text = segment_positions([9], "rope_tie_v2")[:, None]
    torch.testing.assert_close(multi_axis_angles(text, inv_freq)[0], text[0, 0, :, None] * inv_freq, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`sections` must be non-negative block sizes summing to the 8"):
        multi_axis_angles(positions, inv_freq, "sections", [3, 3])
