"""Long-context tasks of the ReRoPE benchmarks: SmolLM2-135M switched between rotary variants (plain RoPE,
transformers' YaRN and dynamic NTK, hf_ext's ReRoPE and Leaky ReRoPE), long Python-documentation windows and
passkey-retrieval prompts."""

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ext  # noqa: F401  (registers hfx_rerope / hfx_leaky_rerope)

from .assets import PYTHON_DOC_SOURCES, python_doc_files, smollm2_gguf_path

BUILTIN_METHODS = ("plain", "yarn", "dynamic")  # transformers' own; run with sdpa
RE_ROPE_METHODS = ("hfx_rerope", "hfx_leaky_rerope")  # hf_ext's attention implementations
METHODS = BUILTIN_METHODS + RE_ROPE_METHODS
# Switching changes logits by much more than this; the equalities it relies on hold to float rounding.
SAME_TOLERANCE = 1e-4

# Long, mostly prose sources first (each is 30k+ tokens, so one file is one document even at 16k); any further
# documents come from the largest remaining files.
PREFERRED_DOCUMENTS = ("reference/datamodel.rst.txt", "whatsnew/2.7.rst.txt", "whatsnew/3.2.rst.txt")
PASSKEY_DOCS_FILLER = "library/stdtypes.rst.txt"  # for passkey_filler="docs"
CLASSIC_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


# ----------------------------------------------------------------------------------------------------------------
# Rotary variants of one loaded model


def rope_parameters_for(method: str, length: int, training_length: int, base_rope: dict, dynamic_factor: float) -> dict:
    """The rotary embedding's ``rope_parameters`` for ``method`` at context ``length`` (plain RoPE for hf_ext's)."""
    theta = base_rope["rope_theta"]
    if method == "yarn" and length > training_length:
        # The keys transformers' _compute_yarn_parameters reads (and validate_rope requires).
        return {"rope_type": "yarn", "factor": length / training_length,
                "original_max_position_embeddings": training_length, "rope_theta": theta}
    if method == "dynamic":
        return {"rope_type": "dynamic", "factor": dynamic_factor, "rope_theta": theta}
    return copy.deepcopy(base_rope)


def same_as_plain(method: str, length: int, training_length: int, window: int) -> bool:
    """Whether ``method`` computes exactly what plain RoPE computes for a context of ``length`` tokens."""
    if method in ("yarn", "dynamic"):
        return length <= training_length
    if method in RE_ROPE_METHODS:
        return length <= window  # and window <= training_length, so the log-n factor is 1 as well
    return method == "plain"


class MethodSwitch:
    """Puts one loaded Llama-type model into any of `METHODS`.

    The built-in scalings live entirely in the rotary embedding module, so it is rebuilt from a copy of the config
    with the new ``rope_parameters``; ``model.config`` keeps the checkpoint's plain RoPE, which `hfx_rerope` reads to
    rotate keys back. The ReRoPE options are ``model.config`` attributes, read at every call.
    """

    def __init__(self, model, *, training_length: int, window: int, leaky_factor: float, logn_scaling: bool,
                 dynamic_factor: float):
        self.model = model
        self.training_length = training_length
        self.window = window
        self.dynamic_factor = dynamic_factor
        self.base_config = copy.deepcopy(model.config)  # the checkpoint's, before any switch
        self.base_rope = dict(model.config.rope_parameters)
        config = model.config
        config.rerope_window = window
        config.rerope_leaky_factor = leaky_factor
        config.logn_scaling = logn_scaling
        config.logn_training_length = training_length
        self.current = None

    def use(self, method: str, length: int) -> None:
        """Switch to ``method`` for contexts of ``length`` tokens (YaRN's factor depends on it)."""
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
        rope = rope_parameters_for(method, length, self.training_length, self.base_rope, self.dynamic_factor)
        rotary_config = copy.deepcopy(self.base_config)
        rotary_config.rope_parameters = rope
        # YaRN: the extended length, so that transformers' consistency check (factor = max / original) holds.
        # Dynamic NTK: the training length, from which it measures how far the input goes beyond.
        rotary_config.max_position_embeddings = max(length, self.training_length) if method == "yarn" \
            else self.training_length
        rotary_config.validate_rope()
        rotary_class = type(self.model.model.rotary_emb)
        self.model.model.rotary_emb = rotary_class(config=rotary_config).to(self.model.device)
        self.model.set_attn_implementation(method if method in RE_ROPE_METHODS else "sdpa")
        self.current = (method, length)


def check_switching(switch: MethodSwitch, ids: torch.Tensor) -> dict:
    """Each switch changes the logits where it should and nothing where it should not, and switching back to plain
    reproduces the first logits bit for bit; raises AssertionError otherwise.

    ``ids`` must be shorter than the training length and longer than the window it sets for the ReRoPE check.
    """
    model, length = switch.model, ids.shape[1]

    def logits(method, at_length=length):
        switch.use(method, at_length)
        return model(input_ids=ids, use_cache=False).logits

    def diff(a, b):
        return (a - b).abs().max().item()

    reference = logits("plain")
    window = switch.window
    model.config.rerope_window = max(1, length // 4)
    rerope_short_window = logits("hfx_rerope")
    leaky_short_window = logits("hfx_leaky_rerope")
    model.config.rerope_window = length  # covers every distance: sdpa's computation
    rerope_full_window = logits("hfx_rerope")
    model.config.rerope_window = window
    checks = {
        "tokens": length,
        "rerope_window_for_check": max(1, length // 4),
        "plain_vs_hfx_rerope_small_window": diff(reference, rerope_short_window),
        "plain_vs_hfx_leaky_rerope_small_window": diff(reference, leaky_short_window),
        "plain_vs_hfx_rerope_window_covering_input": diff(reference, rerope_full_window),
        # YaRN as it would be set for a context of 2N: changes every position's rotation.
        "plain_vs_yarn_2N": diff(reference, logits("yarn", 2 * switch.training_length)),
        # Dynamic NTK leaves inputs within N alone, which same_as_plain relies on.
        "plain_vs_dynamic_within_N": diff(reference, logits("dynamic")),
    }
    checks["plain_again_bitwise_equal"] = torch.equal(reference, logits("plain"))
    problems = []
    for name in ("plain_vs_hfx_rerope_small_window", "plain_vs_hfx_leaky_rerope_small_window", "plain_vs_yarn_2N"):
        if checks[name] <= SAME_TOLERANCE:
            problems.append(f"{name} = {checks[name]:.2e}: switching did not change the computation")
    for name in ("plain_vs_hfx_rerope_window_covering_input", "plain_vs_dynamic_within_N"):
        if checks[name] > SAME_TOLERANCE:
            problems.append(f"{name} = {checks[name]:.2e} > {SAME_TOLERANCE}: expected the plain computation")
    if not checks["plain_again_bitwise_equal"]:
        problems.append("switching back to plain did not reproduce the first logits")
    if problems:
        raise AssertionError("Method switching is broken: " + "; ".join(problems))
    checks["passed"] = True
    return checks


# ----------------------------------------------------------------------------------------------------------------
# Text


def load_model_and_tokenizer():
    """SmolLM2-135M straight from its GGUF file (fp32, eval mode) and its tokenizer."""
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _doc(relative: str) -> Path:
    return PYTHON_DOC_SOURCES / relative


def load_documents(tokenizer, count: int, min_tokens: int) -> list[tuple[str, list[int]]]:
    """``count`` (name, token ids) documents of at least ``min_tokens`` tokens: preferred files, then the largest."""
    files = python_doc_files()
    preferred = [_doc(name) for name in PREFERRED_DOCUMENTS if _doc(name) in set(files)]
    rest = sorted((f for f in files if f not in preferred), key=lambda f: f.stat().st_size, reverse=True)
    documents = []
    for path in preferred + rest:
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
        if len(ids) >= min_tokens:
            documents.append((path.relative_to(PYTHON_DOC_SOURCES).as_posix(), ids))
        if len(documents) == count:
            return documents
    raise ValueError(f"Only {len(documents)} documentation files have >= {min_tokens} tokens; asked for {count}.")


def passkey_filler_ids(tokenizer, kind: str) -> list[int]:
    """Token ids of the passkey filler: ``"classic"`` (grass is green, ...) or ``"docs"`` (documentation text)."""
    if kind == "classic":
        return tokenizer(CLASSIC_FILLER, add_special_tokens=False).input_ids
    return tokenizer(_doc(PASSKEY_DOCS_FILLER).read_text(), add_special_tokens=False).input_ids


def passkey_prompt(tokenizer, length: int, key: int, depth: float, filler_ids: list[int]) -> list[int]:
    """Token ids of a passkey prompt of exactly ``length`` tokens, the needle starting ``depth`` into the filler.

    The pieces are tokenised separately so the length is exact; each starts with a space or newline, as in the
    text as a whole. The filler is cut at its end, just before the question.
    """
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    intro, needle, question = encode(PASSKEY_INTRO), encode(PASSKEY_NEEDLE.format(key=key)), encode(PASSKEY_QUESTION)
    filler_length = length - len(intro) - len(needle) - len(question)
    if filler_length < 0:
        raise ValueError(f"A passkey prompt needs more than {length} tokens.")
    repeats = -(-filler_length // len(filler_ids))
    filler = (filler_ids * repeats)[:filler_length]
    before = int(depth * filler_length)
    prompt = intro + filler[:before] + needle + filler[before:] + question
    assert len(prompt) == length
    return prompt
