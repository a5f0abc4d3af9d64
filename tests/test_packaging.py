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


def test_a_folder_shadowing_a_dependency_is_named_in_one_line(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    argv = [sys.executable, "-m", "minillm.prune", "--out", str(tmp_path / "out")]
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert f"'{tmp_path / 'kernels'}' shadows the installed package 'kernels'" in out.stderr
    assert not (tmp_path / "out").exists()


def test_missing_requirements_are_listed():
    from minillm.environment import missing

    wanted = ["surely-not-installed-xyz>=1", "torch>=2", "triton>=3; platform_system == 'Nope'"]
    assert missing(wanted) == ["surely-not-installed-xyz>=1"]
