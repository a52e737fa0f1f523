"""HfExtProcessor: placeholder expansion, patch layout, batch-first padding, input kinds, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_ext import HfExtProcessor
from benchmarks.tasks.digit_canvas import build_processor, build_tokenizer


@pytest.mark.smoke
def test_placeholders_expand_to_marked_patch_runs_and_patches_are_row_major():
    processor = build_processor(patch_size=2)
    image = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)  # 2 × 3 patches of 2 × 2 pixels
    batch = processor(text=["how many <image> 3 ?", "<image> <image> left of 4"],
                      images=[[image], [torch.ones(2, 2), torch.full((6, 2), 0.5)]])
    ids = processor.model_config_kwargs
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    first = tokens.index("<image_start>")
    assert tokens[first:first + 8] == ["<image_start>"] + ["<image_patch>"] * 6 + ["<image_end>"]
    assert tokens[first - 2 : first] == ["how", "many"] and tokens[first + 8 :] == ["3", "?"]
    assert batch["image_grid_hw"].tolist() == [[[2, 3], [0, 0]], [[1, 1], [3, 1]]]
    assert batch["pixel_values"].shape == (2, 6, 4)
    # patch (r, c) holds pixels [2r:2r+2, 2c:2c+2], flattened row by row
    for r in range(2):
        for c in range(3):
            assert batch["pixel_values"][0, 3 * r + c].tolist() == image[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].flatten().tolist()
    assert batch["pixel_values"][1, :1].eq(1).all() and batch["pixel_values"][1, 1:4].eq(0.5).all()
    assert batch["pixel_values"][1, 4:].eq(0).all()  # padding
    # one patch token per patch, per row
    patches = (batch["input_ids"] == ids["image_token_id"]).sum(1)
    assert patches.tolist() == [6, 4]
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][0].all()  # 12 vs 11 tokens: left padding


def test_images_as_numpy_pil_and_integers():
    processor = build_processor(patch_size=2)
    pixels = np.array([[0, 255, 0, 255], [255, 0, 255, 0]], dtype=np.uint8)
    from_numpy = processor(text="<image>", images=pixels)["pixel_values"]
    from_pil = processor(text="<image>", images=Image.fromarray(pixels))["pixel_values"]
    assert torch.equal(from_numpy, from_pil)
    assert from_numpy[0, 0].tolist() == [0.0, 1.0, 1.0, 0.0]  # uint8 scaled to [0, 1]
    rgb = build_processor(patch_size=2, image_channels=3)
    colour = rgb(text="<image>", images=Image.fromarray(np.zeros((2, 4, 3), dtype=np.uint8)))
    assert colour["pixel_values"].shape == (1, 2, 12) and colour["image_grid_hw"].tolist() == [[[1, 2]]]


def test_text_only_gives_no_image_tensors():
    batch = build_processor()(text=["what is at row 1 col 1 ?"])
    assert set(batch) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("call, message", [
    (lambda p: p(text=["<image> <image>"], images=[[torch.zeros(2, 2)]]), "2 `<image>` placeholder"),
    (lambda p: p(text=["a", "b"], images=[[]]), "one list of images per text"),
    (lambda p: p(text="<image>", images=torch.zeros(3, 4)), "multiples of patch_size=2"),
    (lambda p: p(text="<image>", images=torch.zeros(3, 2, 2)), "expected \\[1, height, width\\]"),
    (lambda p: p(images=[torch.zeros(2, 2)]), "`text` is required"),
])
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(build_processor(patch_size=2))


def test_a_tokenizer_without_the_image_tokens_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                    unk_token="<unk>")
    with pytest.raises(ValueError, match="no token for `image_patch_token`"):
        HfExtProcessor(plain, patch_size=2)
    with pytest.raises(ValueError, match="`patch_size` must be a positive integer"):
        HfExtProcessor(build_tokenizer(), patch_size=0)
