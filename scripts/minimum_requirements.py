"""Print pip requirements that pin every dependency of pyproject.toml to its declared minimum (`name>=X` -> `name==X`).

CI's oldest lane installs hf_ext with these as constraints, so each direct dependency, and each one of the extras
named on the command line, runs at its lower bound.
Usage: python3 scripts/minimum_requirements.py [EXTRA ...] > constraints.txt      (needs Python >= 3.11: tomllib)
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.replace(" ", ""))
    if match:  # self-references (hf-ext[quant]) and bare names have no minimum to pin
        print(f"{match[1]}=={match[2]}")
