"""ReRoPE cost: `hfx_rerope` against plain `sdpa` and against the dense two-matrix algorithm of the reference patch.

ReRoPE needs two logits per (query, key) pair: ordinary RoPE inside the window w, a query rotated to position w
against an un-rotated key outside it. The reference patch (bojone/rerope, eager attention) builds both as full L×L
matrices, so its memory grows with L²; hf_ext's kernel (`rerope_attention`) runs fused CPU attention passes (a causal
far pass, a near band per block of queries) and merges them by their log-sum-exp, so nothing quadratic is held.
This benchmark measures what that costs and saves, on a Llama model with SmolLM2-135M's attention shapes
(hidden 576, 9 query heads, 3 key/value heads, head_dim 64, rope_theta 1e5, SwiGLU 1536, vocab 49152) but only 4
layers and random weights: speed and memory do not depend on the weight values, and attention (what differs
between the methods) is the same per layer as in the real model. fp32, CPU, batch 1.

1. **Prefill**, one forward pass over L tokens (no cache, logits of the last token only: all L rows of a
   49152-word vocabulary would be 3 GB at 16k and would swamp what we measure), L = 1024 … 16384:

   ======================  ========================================================================================
   method                  what it is
   ======================  ========================================================================================
   `hfx_rerope` (ours)     hf_ext's attention function, window w = L/4, log-n query scaling on (N = 8192)
   `sdpa`                  plain RoPE attention, transformers' default (the speed goal: hfx_rerope ≤ 1.5× its time)
   `bench_dense_rerope`    the reference patch's algorithm, written below: two full L×L logit matrices a1 (RoPE) and
                           a2 (query at w, un-rotated keys), torch.where(|i − j| < w, a1, a2), causal mask, fp32
                           softmax; registered as an attention implementation like any other
   ======================  ========================================================================================

   Why w = L/4 rather than a fixed 2048: with w ≥ L every distance is inside the window and `hfx_rerope` simply
   calls sdpa, so a fixed w = 2048 would measure nothing at L ≤ 2048 (all of quick mode). L/4 is the usual rule of
   thumb (w ≈ N_train/4) applied to each length, keeps the near band a fixed share of the work, and at the decode
   context (8192) it is SmolLM2's own default, 8192/4 = 2048.

   The dense reference is run only where its estimated peak (`dense_peak_bytes`: three B·H·L² fp32 matrices, a1, a2
   and the selected logits, plus the L² masks) stays under 6 GiB, so that it never takes the shared machine down;
   beyond that the result records "skipped: would need X GiB" (the estimate matched the measured peak at 4096 to
   within the model's own activations, ~10 %). Before timing, its logits must match hfx_rerope's to 1e-4 at a small
   L (w < L, log-n active), otherwise it would not be the same computation. Goals: speed_ratio ≥ 0.67 against sdpa at
   every L, ≥ 2 against the dense reference from L = 2048 on (informational below, see `DENSE_GOAL_FROM`).

2. **Decode** at an 8192-token context (quick: 1024): the prompt is prefilled once into a `DynamicCache`; each timed
   call crops the cache back to the prompt and runs `decode_steps` greedy single-token forwards with it.
   * Llama `hfx_rerope` vs Llama `sdpa`: a transformers cache holds keys rotated at their own positions, so every
     step rotates the *whole* key cache back for the far logits (O(L·d) extra per layer and step).
   * HfExt `rerope_mode="rerope"` vs the same HfExt model with `rerope_mode="off"` (plain RoPE): HfExt layers cache
     keys un-rotated (ready for the far product) and rotate only the w most recent ones per step.
   A third row times HfExt ReRoPE against Llama `hfx_rerope` directly. The decode rows are informational (no goal).
   HfExt applies no log-n scaling here (its per-layer `logn_scaling` is off after `from_llama`); log-n is one
   multiplication of a single query per step and does not move the time.

Timing is `hf_ext.benchmarking.compare` (interleaved rounds, speed_ratio = peer time / candidate time, > 1 means
hfx_rerope is faster), memory `compare_peak_memory` (peak RSS growth during a call) after all timing. Growth with L is
fitted per method (bytes per token of a linear fit, and the log-log exponent: 1 = linear, 2 = quadratic). The
absolute peaks depend on the allocator's history in the process (the same sdpa pass at 4096 grew RSS by 110 MiB in a
fresh process, 140-220 MiB after the timing and decode phases), so compare sides within a row and the growth with L.
Results: ``benchmarks/results/rerope_speed_memory.json`` and ``.png`` (time and peak memory vs L, log-log); quick runs
go to ``results/quick/``, runs cut short with ``max_length`` to ``results/partial/`` (neither touches RESULTS.md).

Run with ``hf-ext bench rerope_speed_memory`` (estimated 4-6 minutes on an otherwise idle 2-core machine, a third
to a half of it the 16k passes) or ``--quick`` (under a minute); ``HF_EXT_BENCH_THREADS=N`` fixes torch's thread
count. On a machine shared with other busy processes use ``HF_EXT_BENCH_THREADS=1``: with 2 threads and one core
taken, every parallel op waits for the descheduled thread, which costs hfx_rerope's many small ops (per-block masks,
merges, rotations) far more than sdpa's few large ones (measured: 2.7x sdpa's time at 1024 instead of 1.15x).
"""

import copy
import json
import math
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import hf_ext  # noqa: F401  (registers hfx_rerope)
from hf_ext.benchmarking import (compare, compare_peak_memory, configure_threads, make_result, pyplot, save_figure,
                                 save_result)
from hf_ext.convert import from_llama

NAME = "rerope_speed_memory"
DENSE = "bench_dense_rerope"
PREFILL_GOAL = 0.67  # hfx_rerope may take at most 1.5x sdpa's time
DENSE_GOAL = 2.0  # and should be at least twice as fast as the dense algorithm it replaces …
# … once attention matters: below 2048 tokens the projections and the MLP take most of a forward pass whatever the
# attention does (measured: 1.8-2.0x at 1024, 2.4-2.8x at 2048, 4.3-5x at 4096), so shorter rows are informational.
DENSE_GOAL_FROM = 2048
DENSE_MEMORY_LIMIT = 6 * 2**30  # the machine is shared: never start a dense pass estimated above this
LOGIT_TOLERANCE = 1e-4
BENCH_DIR = Path(__file__).resolve().parent

# SmolLM2-135M's shapes (its config.json), 4 of its 30 layers.
MODEL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 9,
         "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
ROPE_THETA = 100000.0


def _schedule(rounds, dense_rounds, warmup, dense_warmup, memory):
    return {"rounds": rounds, "dense_rounds": dense_rounds, "warmup": warmup, "dense_warmup": dense_warmup,
            "memory_repeats": memory}


# Per length, how often each comparison runs. Long passes take seconds to tens of seconds and vary little relative
# to their length, so they get fewer rounds, and no warm-up from 8192 on (everything is warm from the shorter
# lengths by then). The dense rounds are cut hardest: its ratio is large (several x at 4096), so its noise does not
# matter, while one dense pass at 4096 costs as much as a whole rerope-vs-sdpa round. Memory is stable to a few
# percent between calls once the mmap threshold is fixed (see hf_ext.benchmarking), so one call per side suffices
# for the long passes.
FULL = {
    "lengths": {1024: _schedule(5, 3, 1, 1, 2), 2048: _schedule(5, 3, 1, 1, 2), 4096: _schedule(3, 2, 1, 0, 1),
                8192: _schedule(3, 2, 0, 0, 1), 16384: _schedule(2, 2, 0, 0, 1)},
    "decode_context": 8192, "decode_steps": 16, "decode_repeats": 5,
    "validation_length": 256, "validation_window": 64, "validation_logn_length": 128,
}
QUICK = {
    "lengths": {512: _schedule(3, 3, 1, 1, 2), 1024: _schedule(3, 3, 1, 1, 2)},
    "decode_context": 1024, "decode_steps": 8, "decode_repeats": 3,
    "validation_length": 256, "validation_window": 64, "validation_logn_length": 128,
}


# ---------------------------------------------------------------------------------------------------------------
# The dense reference: the quadratic algorithm of the reference patch, as an attention implementation


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """R_p x for x [B, H, L, D] in the rotate-half layout, p = positions [L] (any sign)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()


def dense_rerope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """ReRoPE the way the reference patch computes it: two full L×L logit matrices and a per-element select.

    transformers hands over queries and keys already rotated at their own positions (R_i q, R_j k), which is a1's
    input as it is. a2 needs R_w q and the un-rotated k: rotating by w − i and by −j gets there (R_a R_b = R_{a+b}).
    Batch 1 without padding is assumed (positions 0 … Lk−1, queries the last Lq of them), which is all we time.
    """
    config = module.config
    if config.rope_parameters.get("rope_type", "default") != "default":
        raise ValueError(f"{DENSE} implements plain RoPE frequencies only.")
    window = config.rerope_window
    scaling = module.scaling if scaling is None else scaling
    q_len, k_len, head_dim = query.shape[2], key.shape[2], query.shape[3]
    inv_freq = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2) / head_dim)
    key_positions = torch.arange(k_len)
    query_positions = key_positions[k_len - q_len:]
    if getattr(config, "logn_scaling", True):  # same rule as hfx_rerope: max(1, log(p + 1) / log N)
        training_length = getattr(config, "logn_training_length", None) or config.max_position_embeddings
        factor = (torch.log(query_positions + 1.0) / math.log(training_length)).clamp(min=1.0)
        query = query * factor[:, None]
    # Grouped-query attention: the patch repeats the key/value heads before the products.
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    query_far = _rotate(query, window - query_positions, inv_freq)
    key_raw = _rotate(key, -key_positions, inv_freq)
    near_logits = query @ key.transpose(-1, -2)  # a1: [B, H, Lq, Lk]
    far_logits = query_far @ key_raw.transpose(-1, -2)  # a2: [B, H, Lq, Lk]
    near = (query_positions[:, None] - key_positions[None, :]).abs() < window
    logits = torch.where(near, near_logits, far_logits)
    # The patch keeps a1 and a2 alive to the end of its forward; dropping them here makes our dense peak 3 matrices
    # instead of 4, i.e. the reference as run here is, if anything, kinder than the original.
    del near_logits, far_logits
    logits.mul_(scaling)
    if attention_mask is not None:  # eager_mask: 0 where allowed, the dtype's minimum elsewhere ([B, 1, Lq, Lk])
        logits.add_(attention_mask)
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    del logits
    return (probabilities @ value).transpose(1, 2).contiguous(), None


def register_dense_reference() -> None:
    AttentionInterface.register(DENSE, dense_rerope_attention)
    AttentionMaskInterface.register(DENSE, eager_mask)  # the additive float causal mask the eager patch received


def dense_peak_bytes(length: int, heads: int, batch: int = 1) -> int:
    """Estimated peak of one dense pass: a1, a2 and the selected logits (B·H·L² fp32 each) live at once, plus the
    boolean window mask and the additive causal mask with its boolean source (L² each, 1 + 4 + 1 bytes)."""
    return 3 * batch * heads * length * length * 4 + length * length * (1 + 4 + 1)


# ---------------------------------------------------------------------------------------------------------------
# Models


def build_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The same random weights behind every method: Llama with sdpa / hfx_rerope / the dense reference, and the
    HfExt conversion with rerope_mode "off" and "rerope"."""
    register_dense_reference()
    torch.manual_seed(seed)
    config = LlamaConfig(**MODEL, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                         attn_implementation="sdpa")
    sdpa = LlamaForCausalLM(config).to(torch.float32).eval()
    models = {"sdpa": sdpa}
    for name in ("hfx_rerope", DENSE):
        model = copy.deepcopy(sdpa)
        model.set_attn_implementation(name)
        model.config.logn_scaling = True  # read at every call by both ReRoPE implementations
        models[name] = model
    # from_llama takes over the tensors of what it gets, hence the copies.
    models["hfext_off"] = from_llama(copy.deepcopy(sdpa)).eval()
    models["hfext_rerope"] = from_llama(copy.deepcopy(sdpa)).eval()
    models["hfext_rerope"].config.rerope_mode = "rerope"
    return models


def set_window(models: dict, window: int) -> None:
    """The ReRoPE window of every model (a config attribute, read at each call)."""
    for model in models.values():
        model.config.rerope_window = window


def prefill(model, input_ids):
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits


# ---------------------------------------------------------------------------------------------------------------
# Checks before timing


def validate(models: dict, settings: dict) -> dict:
    """Both ReRoPE implementations and the HfExt path must compute the same logits, or the timings compare
    different things. A short length with w < L and a small log-n training length exercises every branch."""
    length, window = settings["validation_length"], settings["validation_window"]
    ids = torch.randint(MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(2))
    set_window(models, window)
    for name in ("hfx_rerope", DENSE):
        models[name].config.logn_training_length = settings["validation_logn_length"]
    logits = {name: models[name](input_ids=ids, use_cache=False).logits
              for name in ("sdpa", "hfx_rerope", DENSE)}
    dense_diff = (logits[DENSE] - logits["hfx_rerope"]).abs().max().item()
    # HfExt's ReRoPE (keys cached for the far product) against hfx_rerope on the Llama, both without log-n.
    models["hfx_rerope"].config.logn_scaling = False
    rerope_no_logn = models["hfx_rerope"](input_ids=ids, use_cache=False).logits
    hfext_rerope = models["hfext_rerope"](input_ids=ids, use_cache=False).logits
    hfext_diff = (hfext_rerope - rerope_no_logn).abs().max().item()
    models["hfx_rerope"].config.logn_scaling = True
    for name in ("hfx_rerope", DENSE):
        models[name].config.logn_training_length = None  # back to max_position_embeddings
    checks = {
        "validation": f"L={length}, w={window}, logn_training_length={settings['validation_logn_length']}",
        "max_abs_logit_diff_dense_vs_hfx_rerope": dense_diff,
        "max_abs_logit_diff_hfext_rerope_vs_hfx_rerope_without_logn": hfext_diff,
        # Not a tolerance: shows that w < L changes the result, i.e. that the ReRoPE path really ran.
        "max_abs_logit_diff_hfx_rerope_vs_sdpa": (logits["hfx_rerope"] - logits["sdpa"]).abs().max().item(),
        "logit_tolerance": LOGIT_TOLERANCE,
    }
    for name in ("max_abs_logit_diff_dense_vs_hfx_rerope",
                 "max_abs_logit_diff_hfext_rerope_vs_hfx_rerope_without_logn"):
        if not checks[name] <= LOGIT_TOLERANCE:
            raise AssertionError(f"{name} = {checks[name]:.3g} > {LOGIT_TOLERANCE}: {checks}")
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Decode


class Decoder:
    """A prompt prefilled once into a cache; each call decodes `steps` greedy tokens from that same state."""

    def __init__(self, model, prompt_ids, steps: int):
        self.model, self.steps, self.context = model, steps, prompt_ids.shape[1]
        self.cache = DynamicCache(config=model.config)
        logits = model(input_ids=prompt_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.first_token = logits[:, -1:].argmax(-1)

    def __call__(self) -> torch.Tensor:
        # Cropping returns views (no copy): every call starts from the prompt's cache, as in a fresh generation.
        extra = self.cache.get_seq_length() - self.context
        if extra:
            self.cache.crop(-extra)
        token, tokens = self.first_token, []
        for _ in range(self.steps):
            logits = self.model(input_ids=token, past_key_values=self.cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
        return torch.cat(tokens, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Growth fits and the plot


def fit_growth(lengths: list[int], values: list[float]) -> dict | None:
    """Least-squares lines value = a + b·L and log value = c + e·log L (e: 1 linear, 2 quadratic)."""
    points = [(n, v) for n, v in zip(lengths, values) if v and v > 0]
    if len(points) < 2:
        return None
    x = torch.tensor([float(n) for n, _ in points], dtype=torch.float64)
    y = torch.tensor([float(v) for _, v in points], dtype=torch.float64)
    design = torch.stack((torch.ones_like(x), x), dim=1)
    intercept, slope = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    log_design = torch.stack((torch.ones_like(x), x.log()), dim=1)
    exponent = torch.linalg.lstsq(log_design, y.log()[:, None]).solution.flatten()[1].item()
    residual = y - (intercept + slope * x)
    return {"per_token": slope, "intercept": intercept, "loglog_exponent": exponent,
            "linear_fit_max_relative_error": (residual.abs() / y).max().item(), "lengths": [n for n, _ in points]}


def plot(tables: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    lengths = tables["lengths"]
    styles = {"hfx_rerope": ("tab:blue", "o"), "sdpa": ("tab:green", "s"), DENSE: ("tab:red", "^")}
    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, (color, marker) in styles.items():
        ran = [(n, t, m) for n, t, m in zip(lengths, tables["seconds"][method], tables["peak_bytes"][method])
               if t is not None]
        if ran:
            time_axis.plot([n for n, _, _ in ran], [t for _, t, _ in ran], marker=marker, color=color, label=method)
            memory_axis.plot([n for n, _, _ in ran], [m / 2**20 for _, _, m in ran], marker=marker, color=color,
                             label=method)
    # Where the dense pass was skipped, its estimated need (hollow markers, dashed).
    estimates = [(n, tables["dense_estimated_bytes"][i]) for i, n in enumerate(lengths)]
    memory_axis.plot([n for n, _ in estimates], [b / 2**20 for _, b in estimates], linestyle="--", marker="^",
                     markerfacecolor="none", color="tab:red", alpha=0.6, label=f"{DENSE} (estimate)")
    memory_axis.axhline(DENSE_MEMORY_LIMIT / 2**20, color="gray", linestyle=":", label="dense run limit (6 GiB)")
    for length, estimate in estimates:
        if tables["dense"].get(str(length), "").startswith("skipped"):
            memory_axis.annotate("skipped", (length, estimate / 2**20), textcoords="offset points", xytext=(-20, 6),
                                 fontsize=7, color="tab:red")
    for axis, label in ((time_axis, "prefill time [s]"), (memory_axis, "peak RSS growth [MiB]")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length L (window w = L/4)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")  # the curves rise to the right: that corner stays free
    fig.suptitle("ReRoPE prefill, Llama with SmolLM2-135M attention shapes, 4 layers, fp32 CPU, batch 1")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def _output_dir(quick: bool, partial: bool) -> Path:
    directory = BENCH_DIR / "results" / ("quick" if quick else "partial" if partial else "")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def main(quick: bool = False, max_length: int | None = None) -> dict:
    """Run the benchmark; ``max_length`` cuts the length sweep (and the decode context) short, for a partial run
    whose results go to ``results/partial/`` and leave the real ones alone."""
    started = time.perf_counter()
    settings = copy.deepcopy(QUICK if quick else FULL)
    partial = max_length is not None and not quick
    if max_length is not None:
        settings["lengths"] = {n: s for n, s in settings["lengths"].items() if n <= max_length}
        if not settings["lengths"]:
            raise ValueError(f"max_length={max_length} leaves no length to measure.")
        settings["decode_context"] = min(settings["decode_context"], max_length)
    threads = configure_threads()
    schedule = settings.pop("lengths")
    lengths = sorted(schedule)
    models = build_models()
    heads = MODEL["num_attention_heads"]
    settings.update({
        "model": dict(MODEL, architecture="LlamaForCausalLM", rope_theta=ROPE_THETA),
        "weights": "random (seed 0): speed and memory do not depend on the weight values",
        "dtype": "float32", "device": "cpu", "batch": 1, "threads": threads, "partial": partial,
        "prefill": "one forward pass, use_cache=False, logits_to_keep=1",
        "rerope_window": "L / 4 for the prefill at length L; decode_context / 4 for decode",
        "logn_scaling": "on for hfx_rerope and the dense reference (N = max_position_embeddings = 8192); "
                        "off in the HfExt decode rows",
        "dense_memory_limit_bytes": DENSE_MEMORY_LIMIT,
        "lengths": {str(n): plan for n, plan in schedule.items()},
        "dense_goal": f"speed_ratio >= {DENSE_GOAL} from L = {DENSE_GOAL_FROM} on; informational below",
    })
    metrics, tables = {}, {"lengths": lengths, "dense": {}, "dense_estimated_bytes": []}
    sections = {}

    with torch.inference_mode():
        checks = validate(models, settings)
        print(f"validation: {checks}")

        # 1. Prefill timing. The dense pass runs only where its estimated peak is affordable.
        runnable_dense = {}
        for length in lengths:
            section_start = time.perf_counter()
            plan = schedule[length]
            set_window(models, length // 4)
            ids = torch.randint(MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
            estimate = dense_peak_bytes(length, heads)
            tables["dense_estimated_bytes"].append(estimate)
            runnable_dense[length] = estimate <= DENSE_MEMORY_LIMIT
            if not runnable_dense[length]:
                tables["dense"][str(length)] = f"skipped: would need {estimate / 2**30:.1f} GiB"
            metrics[f"prefill_{length}_vs_sdpa"] = compare(
                lambda: prefill(models["hfx_rerope"], ids), lambda: prefill(models["sdpa"], ids),
                work=length, unit="tokens/s", repeats=plan["rounds"], warmup=plan["warmup"],
                min_speed_ratio=PREFILL_GOAL,
                description=f"prefill {length} tokens (w={length // 4}): hfx_rerope vs sdpa")
            if runnable_dense[length]:
                metrics[f"prefill_{length}_vs_dense"] = compare(
                    lambda: prefill(models["hfx_rerope"], ids), lambda: prefill(models[DENSE], ids),
                    work=length, unit="tokens/s", repeats=plan["dense_rounds"], warmup=plan["dense_warmup"],
                    min_speed_ratio=DENSE_GOAL if length >= DENSE_GOAL_FROM else None,
                    description=f"prefill {length} tokens (w={length // 4}): hfx_rerope vs dense two-matrix reference")
            sections[f"prefill_{length}_timing"] = time.perf_counter() - section_start
            print(_prefill_line(length, metrics))

        # 2. Decode timing at the long context.
        section_start = time.perf_counter()
        context, steps = settings["decode_context"], settings["decode_steps"]
        set_window(models, context // 4)
        prompt = torch.randint(MODEL["vocab_size"], (1, context), generator=torch.Generator().manual_seed(3))
        decoders = {name: Decoder(models[name], prompt, steps)
                    for name in ("hfx_rerope", "sdpa", "hfext_rerope", "hfext_off")}
        sections["decode_prefills"] = time.perf_counter() - section_start
        decode_timing = {"work": steps, "unit": "tokens/s", "repeats": settings["decode_repeats"], "warmup": 1}
        decode_pairs = {f"decode_{context}_hfx_rerope_vs_sdpa": ("hfx_rerope", "sdpa"),
                        f"decode_{context}_hfext_rerope_vs_hfext_off": ("hfext_rerope", "hfext_off")}
        for metric_name, (candidate, peer) in decode_pairs.items():
            metrics[metric_name] = compare(
                decoders[candidate], decoders[peer],
                description=f"{steps} greedy decode steps after a {context}-token prompt (w={context // 4}): "
                            f"{candidate} vs {peer}", **decode_timing)
        # The two ReRoPE paths against each other (informational): how much the window-only rotation saves.
        metrics[f"decode_{context}_hfext_rerope_vs_hfx_rerope"] = compare(
            decoders["hfext_rerope"], decoders["hfx_rerope"],
            description=f"{steps} decode steps, {context}-token prompt: HfExt rerope_mode='rerope' vs Llama hfx_rerope",
            **decode_timing)
        sections["decode_timing"] = time.perf_counter() - section_start

        # 3. Memory, after all timing (it fixes glibc's mmap threshold for the rest of the process).
        for length in lengths:
            section_start = time.perf_counter()
            memory_repeats = schedule[length]["memory_repeats"]
            set_window(models, length // 4)
            ids = torch.randint(MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
            metrics[f"prefill_{length}_vs_sdpa"].update(compare_peak_memory(
                lambda: prefill(models["hfx_rerope"], ids), lambda: prefill(models["sdpa"], ids),
                repeats=memory_repeats, description=f"prefill {length} vs sdpa"))
            if runnable_dense[length]:
                metrics[f"prefill_{length}_vs_dense"].update(compare_peak_memory(
                    lambda: prefill(models["hfx_rerope"], ids), lambda: prefill(models[DENSE], ids),
                    repeats=memory_repeats, description=f"prefill {length} vs dense"))
                tables["dense"][str(length)] = "ran"
            sections[f"prefill_{length}_memory"] = time.perf_counter() - section_start
        set_window(models, context // 4)
        for metric_name, (candidate, peer) in decode_pairs.items():
            metrics[metric_name].update(compare_peak_memory(decoders[candidate], decoders[peer], repeats=2,
                                                            description=metric_name))

    tables.update(_prefill_tables(lengths, metrics, runnable_dense))
    tables["sections_seconds"] = sections
    tables["total_seconds"] = time.perf_counter() - started
    # One candidate/peer label per result file (the harness's layout); the metric name says which pair a row is.
    result = make_result(NAME, candidate="hf_ext ReRoPE (hfx_rerope; HfExt rows: rerope_mode='rerope')",
                         peer="sdpa, dense two-matrix ReRoPE, HfExt rerope_mode=off or hfx_rerope (per metric)",
                         settings=settings, metrics=metrics, checks=checks, quick=quick)
    result["partial"] = partial
    result["tables"] = tables
    result["markdown_tables"] = [_markdown_table(lengths, tables)]
    output = _output_dir(quick, partial)
    picture = plot(tables, output / f"{NAME}.png")
    if partial:  # save_result would rewrite RESULTS.md with an incomplete run
        path = output / f"{NAME}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
    else:
        if not quick and picture is not None:
            result["plots"] = [f"results/{NAME}.png"]
        path = save_result(result, BENCH_DIR)
    _print_summary(tables, metrics, path)
    return result


def _prefill_line(length: int, metrics: dict) -> str:
    row = metrics[f"prefill_{length}_vs_sdpa"]
    line = (f"L={length}: hfx_rerope {row['candidate_median_seconds']:.3f} s, sdpa {row['peer_median_seconds']:.3f} s, "
            f"speed_ratio {row['speed_ratio']:.3f} (goal >= {PREFILL_GOAL})")
    dense = metrics.get(f"prefill_{length}_vs_dense")
    if dense:
        line += f"; dense {dense['peer_median_seconds']:.3f} s, speed_ratio vs dense {dense['speed_ratio']:.2f}"
    return line


def _prefill_tables(lengths: list[int], metrics: dict, runnable_dense: dict) -> dict:
    """Per method and length: median seconds and peak bytes (None where not run), and the growth fits."""
    seconds = {"hfx_rerope": [], "sdpa": [], DENSE: []}
    peaks = {"hfx_rerope": [], "sdpa": [], DENSE: []}
    for length in lengths:
        row = metrics[f"prefill_{length}_vs_sdpa"]
        seconds["hfx_rerope"].append(row["candidate_median_seconds"])
        seconds["sdpa"].append(row["peer_median_seconds"])
        peaks["hfx_rerope"].append(row["candidate_peak_bytes"])
        peaks["sdpa"].append(row["peer_peak_bytes"])
        dense = metrics.get(f"prefill_{length}_vs_dense") if runnable_dense[length] else None
        seconds[DENSE].append(dense["peer_median_seconds"] if dense else None)
        peaks[DENSE].append(dense["peer_peak_bytes"] if dense else None)
    return {
        "seconds": seconds,
        "peak_bytes": peaks,
        "peak_bytes_per_token": {m: [None if p is None else p / n for p, n in zip(v, lengths)]
                                 for m, v in peaks.items()},
        "memory_growth_fit": {m: fit_growth(lengths, v) for m, v in peaks.items()},
        "time_growth_fit": {m: fit_growth(lengths, v) for m, v in seconds.items()},
    }


def _markdown_table(lengths: list[int], tables: dict) -> str:
    """Prefill seconds and peak memory per length and method, for benchmarks/RESULTS.md."""
    methods = ("hfx_rerope", "sdpa", DENSE)
    rows = ["Prefill of L tokens (batch 1, 4 layers with SmolLM2-135M attention shapes): median seconds / peak RSS "
            "growth in MiB.", "", "| L | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for i, length in enumerate(lengths):
        cells = []
        for method in methods:
            seconds, peak = tables["seconds"][method][i], tables["peak_bytes"][method][i]
            cells.append("skipped" if seconds is None else f"{seconds:.2f} s / {peak / 2**20:.0f} MiB")
        rows.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _print_summary(tables: dict, metrics: dict, path: Path) -> None:
    for method, fit in tables["memory_growth_fit"].items():
        if fit:
            print(f"peak memory {method}: {fit['per_token'] / 1024:.1f} KiB per token (linear fit), "
                  f"log-log exponent {fit['loglog_exponent']:.2f}")
    for length, status in tables["dense"].items():
        print(f"dense reference at L={length}: {status}")
    for name, row in metrics.items():
        if name.startswith("decode"):
            print(f"{name}: {row['candidate']:.1f} vs {row['peer']:.1f} tokens/s, speed_ratio {row['speed_ratio']:.3f}")
    print(f"total {tables['total_seconds']:.0f} s; results in {path}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-length", type=int, default=None, help="stop the sweep at this length (partial run)")
    arguments = parser.parse_args()
    main(quick=arguments.quick, max_length=arguments.max_length)
