"""The code base's shape: modules of one concept, a short trainer, one op table, no private DDP API."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ftwt"


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules: {long}"


def test_the_trainer_class_is_under_200_lines():
    tree = ast.parse((PACKAGE / "train" / "trainer.py").read_text())
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno + 1 < 200


def test_no_private_ddp_api_and_no_files_outside_the_repository():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "_set_params_and_buffers_to_ignore_for_model" not in text, path
        assert "METHOD.md" not in text, path
