"""HWFA (hybrid window-full attention, kexue.fm post 9603) and HWFA+ReRoPE (post 9731) as `HfExtConfig` layouts.

* ``"hwfa"``: every layer but the last is a sliding-window RoPE layer; the last is full attention with no position
  encoding and log-n scaling. Window default: the largest w with (w − 1)(L − 1) + 1 ≤ ¾·N, so that the stacked
  receptive field of the window layers stays inside the training length N.
* ``"hwfa_rerope"``: sliding-window RoPE layers plus `num_full_layers` full-attention layers that use RoPE while
  training and ReRoPE at inference (`config.rerope_mode = "rerope"`), with log-n scaling. Full layers sit at
  L·i/(f+1) (f = 1: the middle layer; f = 2: L/3 and 2L/3). Window default 2·N/L; ReRoPE window N/2.

The window layers keep a sliding-window cache (memory O(window)); only the full layers grow with the context.
"""

from .models.hfext import HfExtConfig

HWFA_VARIANTS = ("hwfa", "hwfa_rerope")


def full_layer_indices(num_hidden_layers: int, num_full_layers: int) -> list[int]:
    """Where HWFA+ReRoPE puts its full layers: evenly inside the stack (L//2 for one, L//3 and 2L//3 for two)."""
    if not 1 <= num_full_layers < num_hidden_layers:
        raise ValueError(
            f"`num_full_layers` must be between 1 and num_hidden_layers - 1 ({num_hidden_layers - 1}), "
            f"got {num_full_layers}."
        )
    return sorted({(i + 1) * num_hidden_layers // (num_full_layers + 1) for i in range(num_full_layers)})


def hwfa_window(num_hidden_layers: int, training_length: int, fraction: float = 0.75) -> int:
    """Largest w with (w − 1)(L − 1) + 1 ≤ fraction · N: the HWFA v1 window rule."""
    return max(2, int((fraction * training_length - 1) // max(1, num_hidden_layers - 1)) + 1)


def hwfa_config(variant: str = "hwfa_rerope", *, num_hidden_layers: int, max_position_embeddings: int,
                num_full_layers: int = 1, sliding_window: int | None = None, rerope_window: int | None = None,
                **config_kwargs) -> HfExtConfig:
    """An `HfExtConfig` with the HWFA or HWFA+ReRoPE layer layout; other keyword arguments go to the config.

    Example:
        >>> config = hwfa_config("hwfa_rerope", num_hidden_layers=8, max_position_embeddings=512, num_full_layers=2,
        ...                      vocab_size=4096, hidden_size=256, intermediate_size=688, num_attention_heads=4)
        >>> config.layer_types[2], config.layer_types[5], config.sliding_window
        ('full_attention', 'full_attention', 128)
    """
    if variant not in HWFA_VARIANTS:
        raise ValueError(f"`variant` is {variant!r}; allowed values are {list(HWFA_VARIANTS)}.")
    layers, length = num_hidden_layers, max_position_embeddings
    if variant == "hwfa":
        full = [layers - 1]
        window = hwfa_window(layers, length) if sliding_window is None else sliding_window
        position = lambda i: "none" if i in full else "rope"  # noqa: E731
    else:
        full = full_layer_indices(layers, num_full_layers)
        window = max(2, 2 * length // layers) if sliding_window is None else sliding_window
        position = lambda i: "rope"  # noqa: E731
    return HfExtConfig(
        num_hidden_layers=layers,
        max_position_embeddings=length,
        layer_types=["full_attention" if i in full else "sliding_attention" for i in range(layers)],
        sliding_window=window,
        position_encodings=[position(i) for i in range(layers)],
        logn_scaling=[i in full for i in range(layers)],
        logn_training_length=length,
        rerope_window=max(1, length // 2) if rerope_window is None else rerope_window,
        **config_kwargs,
    )
