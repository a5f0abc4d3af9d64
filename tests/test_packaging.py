"""The checkout imports what a user's install imports: from the repo root, no folder of this
repository shadows an installed package (transformers imports Hugging Face's ``kernels``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_repo_root_imports_transformers_kernels_and_minillm_kernels():
    code = (
        "import kernels, transformers.activations, minillm.kernels.ops, minillm\n"
        "print(kernels.__file__)\n"
        "print(minillm.kernels.ops.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    hub_kernels, ours = out.stdout.split()
    assert ROOT not in Path(hub_kernels).resolve().parents  # the installed package, not ours
    assert Path(ours).resolve().parent == ROOT / "minillm" / "kernels"


def test_only_minillm_is_an_importable_package_at_the_root():
    top = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"}
    assert top <= {"minillm", "setup.py"}
