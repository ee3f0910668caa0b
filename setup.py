"""The one packaging fact pyproject.toml cannot state: which packages the wheel holds.

The code is found as usual (`dataflows.*`, `protos`). The example models, contracts and data
in models/ ship as package data of `dataflows.examples` (mapped to models/ in
pyproject.toml), and every folder under models/ is a package of its own, found here, so
that a new one ships without a list to keep (setuptools warns about, and will one day
drop, data folders that are not listed as packages).
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

EXAMPLES = Path(__file__).parent / "models"

code = find_namespace_packages(include=["dataflows", "dataflows.*", "protos"])
folders = [f.relative_to(EXAMPLES).parts for f in sorted(EXAMPLES.rglob("*")) if f.is_dir()]
examples = [
    ".".join(("dataflows.examples", *parts))
    for parts in folders
    if not any(part.startswith((".", "_")) for part in parts)  # __pycache__, .ipynb_checkpoints
]
setup(packages=[p for p in code if "__pycache__" not in p] + ["dataflows.examples", *examples])
