"""Processor of HfExt image-text models: text with `<image>` placeholders plus images -> model inputs.

Each `<image>` in a text takes that row's next image. The image is cut into square patches of `patch_size` pixels
(row-major), and the placeholder becomes `<image_start>`, one `<image_patch>` token per patch, `<image_end>`: the
markers are ordinary text tokens (RoPE-Tie's [IMG] … [/IMG]), the patch tokens are replaced inside the model by the
embeddings of the pixel patches. The outputs are

* `input_ids`, `attention_mask` from the tokenizer (its padding side applies),
* `pixel_values` [batch, max_patches, channels · patch_size²], each row's patches in order, zero-padded,
* `image_grid_hw` [batch, max_images, 2], (height, width) in patches of each row's images, (0, 0) for padding.

Every tensor is batch-first, so slicing, collating and generate()'s beam expansion treat rows independently.
This file travels with checkpoints (`AutoProcessor.from_pretrained(..., trust_remote_code=True)`): it imports only
numpy, torch and transformers.
"""

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


class HfExtProcessor(ProcessorMixin):
    r"""
    Turns text with `<image>` placeholders and images into inputs of an HfExt model with `image_patch_size` set.

    Args:
        tokenizer: a tokenizer that knows `image_start_token`, `image_patch_token` and `image_end_token` as single
            tokens (add them as special tokens).
        patch_size (`int`): side of the square pixel patches; image heights and widths must be multiples of it.
        image_channels (`int`): channels of the images (1 for grey, 3 for RGB).
        image_token (`str`): the placeholder written in texts where an image goes.
        image_patch_token, image_start_token, image_end_token (`str`): the tokens the placeholder expands to.

    Images are torch tensors or numpy arrays of shape [channels, height, width] or [height, width] (one channel),
    or PIL images; float values are used as given, integer values (uint8, PIL) are divided by 255.

    Example:
        >>> processor = HfExtProcessor(tokenizer, patch_size=4, image_channels=1)  # doctest: +SKIP
        >>> batch = processor(text=["<image> what is at row 1 col 2 ?"], images=[[canvas]])  # doctest: +SKIP
        >>> model.generate(**batch, max_new_tokens=1)  # doctest: +SKIP
    """

    def __init__(self, tokenizer=None, patch_size: int = 8, image_channels: int = 3, image_token: str = "<image>",
                 image_patch_token: str = "<image_patch>", image_start_token: str = "<image_start>",
                 image_end_token: str = "<image_end>", chat_template=None):
        super().__init__(tokenizer, chat_template=chat_template)
        for name, value in (("patch_size", patch_size), ("image_channels", image_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.patch_size = patch_size
        self.image_channels = image_channels
        self.image_token = image_token
        self.image_patch_token = image_patch_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        for name in ("image_patch_token", "image_start_token", "image_end_token"):
            token = getattr(self, name)
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no token for `{name}`={token!r}; add it with "
                                 "`tokenizer.add_special_tokens({'additional_special_tokens': [...]})`.")

    @property
    def model_config_kwargs(self) -> dict:
        """The `HfExtConfig` fields that must agree with this processor."""
        tokens = self.tokenizer.convert_tokens_to_ids
        return {"image_patch_size": self.patch_size, "image_channels": self.image_channels,
                "image_token_id": tokens(self.image_patch_token), "image_start_token_id": tokens(self.image_start_token),
                "image_end_token_id": tokens(self.image_end_token), "vocab_size": len(self.tokenizer)}

    def __call__(self, text=None, images=None, return_tensors: str = "pt", **tokenizer_kwargs) -> BatchFeature:
        """Tokenize `text` (a string or a list of strings) with its `<image>` placeholders expanded, and patchify
        `images`: for one string, a list of images (or one image); for a list of strings, one list of images per
        string, in placeholder order. `tokenizer_kwargs` (padding, truncation=False, …) go to the tokenizer;
        padding defaults to True."""
        if text is None:
            raise ValueError("`text` is required: a string, or a list of strings, with one `<image>` per image.")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if images is None:
            rows_of_images = [[] for _ in texts]
        elif single:
            rows_of_images = [images if isinstance(images, (list, tuple)) else [images]]
        else:
            rows_of_images = list(images)
            if len(rows_of_images) != len(texts):
                raise ValueError(f"`images` needs one list of images per text ({len(texts)}), got {len(rows_of_images)}.")
        expanded, patches, grids = [], [], []
        for row, (sample, row_images) in enumerate(zip(texts, rows_of_images)):
            if not isinstance(row_images, (list, tuple)):
                row_images = [row_images]
            pieces = sample.split(self.image_token)
            if len(pieces) - 1 != len(row_images):
                raise ValueError(f"text {row} has {len(pieces) - 1} `{self.image_token}` placeholder(s) but "
                                 f"{len(row_images)} image(s) were given for it.")
            row_patches, row_grids, parts = [], [], [pieces[0]]
            for index, (image, after) in enumerate(zip(row_images, pieces[1:])):
                image_patches, (height, width) = self.patchify(image, f"images[{row}][{index}]")
                row_patches.append(image_patches)
                row_grids.append((height, width))
                # in place, no spaces added: the tokenizer sees the user's text around the image tokens unchanged
                parts.append(self.image_start_token + self.image_patch_token * (height * width) + self.image_end_token
                             + after)
            expanded.append("".join(parts))
            patches.append(torch.cat(row_patches) if row_patches else torch.zeros(0, self._patch_width))
            grids.append(row_grids)
        tokenizer_kwargs.setdefault("padding", True)
        data = dict(self.tokenizer(expanded, return_tensors=return_tensors, **tokenizer_kwargs))
        if any(grids):
            max_patches = max(p.shape[0] for p in patches)
            pixel_values = torch.zeros(len(texts), max_patches, self._patch_width)
            grid_hw = torch.zeros(len(texts), max(len(g) for g in grids), 2, dtype=torch.long)
            for row, (row_patches, row_grids) in enumerate(zip(patches, grids)):
                pixel_values[row, : row_patches.shape[0]] = row_patches
                if row_grids:
                    grid_hw[row, : len(row_grids)] = torch.tensor(row_grids)
            data["pixel_values"], data["image_grid_hw"] = pixel_values, grid_hw
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def _patch_width(self) -> int:
        return self.image_channels * self.patch_size**2

    def patchify(self, image, name: str = "image") -> tuple[torch.Tensor, tuple[int, int]]:
        """[h·w, channels · patch²] patches of one image (row-major) and its grid (h, w) in patches."""
        pixels = self._as_chw_tensor(image, name)
        channels, height, width = pixels.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"{name} is {height}×{width} pixels; height and width must be multiples of "
                             f"patch_size={p} (pad or resize the image).")
        rows, cols = height // p, width // p
        patches = pixels.reshape(channels, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)
        return patches, (rows, cols)

    def _as_chw_tensor(self, image, name: str) -> torch.Tensor:
        if not isinstance(image, (torch.Tensor, np.ndarray)):  # PIL images: [H, W] or [H, W, C]
            image = np.asarray(image)
            if image.ndim == 3:
                image = image.transpose(2, 0, 1)
        pixels = torch.as_tensor(image)
        if not pixels.is_floating_point():
            pixels = pixels.float() / 255.0
        pixels = pixels.float()
        if pixels.dim() == 2:
            pixels = pixels[None]
        if pixels.dim() != 3 or pixels.shape[0] != self.image_channels:
            raise ValueError(f"{name} has shape {tuple(pixels.shape)}; expected [{self.image_channels}, height, width]"
                             + (" or [height, width]" if self.image_channels == 1 else "")
                             + f" (image_channels={self.image_channels}).")
        return pixels

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["HfExtProcessor"]
