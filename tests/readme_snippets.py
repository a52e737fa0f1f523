"""The README's code: the first ```python block under a `### heading`, run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(heading: str) -> str:
    """The first python code block after the line ``### {heading}`` of the README."""
    section = README.read_text().split(f"### {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_readme_snippet(heading: str) -> dict:
    """Execute that block in a fresh namespace (in the current directory) and return the namespace."""
    namespace: dict = {}
    exec(compile(readme_snippet(heading), f"README: {heading}", "exec"), namespace)
    return namespace
