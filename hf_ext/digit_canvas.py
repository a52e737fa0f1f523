"""A tiny image-text world for RoPE-Tie experiments: scikit-learn's 8×8 digit images on a canvas, with questions.

`build_processor()` gives an `HfExtProcessor` over a word-level tokenizer of this world's vocabulary (no download),
so a vision-language HfExt model can be built, trained and saved entirely offline (the demo's RoPE-Tie step and the
README example use it).
"""

from .models.hfext.processing_hfext import HfExtProcessor

SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<image>", "<image_patch>", "<image_start>", "<image_end>"]
WORDS = [str(n) for n in range(10)] + ["none", "what", "is", "at", "row", "col", "how", "many", "left", "right",
                                        "of", "above", "below", "?", ":"]


def build_tokenizer():
    """A whitespace word-level fast tokenizer of `WORDS` and `SPECIAL_TOKENS` (padding on the left, for generation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    return tokenizer


def build_processor(patch_size: int = 8, image_channels: int = 1) -> HfExtProcessor:
    """The processor of a digit-canvas model: 8-pixel patches (one digit cell each) of grey canvases by default."""
    return HfExtProcessor(build_tokenizer(), patch_size=patch_size, image_channels=image_channels)


__all__ = ["build_processor", "build_tokenizer", "SPECIAL_TOKENS", "WORDS"]
