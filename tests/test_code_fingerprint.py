"""The digits benchmark's code fingerprint (tools/code_fingerprint.py): which modules a row's code is,
and which edits change it (code) and which do not (comments, docstrings)."""
from __future__ import annotations

import shutil
import sys

from conftest import load_tool


def test_a_preset_names_its_objectives_and_its_hybrids_parts():
    cf = load_tool("code_fingerprint")
    spec = {"name": "hybrid", "base": {"name": "scm", "p_mean": 0.0}, "terms": [{"name": "dmd2", "weight": 0.04}]}
    assert cf.objective_names(spec) == ["hybrid", "scm", "dmd2"]


def test_the_closure_follows_imports_and_leaves_out_package_init_files():
    cf = load_tool("code_fingerprint")
    mods = cf.closure(["stepdistill.objectives.tcd"])
    # tcd imports these directly (one of them through a function of another module's: sampling -> schedules)
    assert {"stepdistill.objectives.tcd", "stepdistill.export.scheduler", "stepdistill.sampling",
            "stepdistill.objectives.common", "stepdistill.schedules"} <= set(mods)
    assert "stepdistill.objectives" not in mods and "stepdistill" not in mods
    assert "stepdistill.objectives.dmd" not in mods  # another family's module is not tcd's code


def test_code_changes_change_the_fingerprint_comments_and_docstrings_do_not(tmp_path, monkeypatch):
    cf = load_tool("code_fingerprint")
    pkg = tmp_path / "stepdistill"
    (pkg / "objectives").mkdir(parents=True)
    for f in ("__init__.py", "objectives/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "helper.py").write_text('"""Helper."""\nSCALE = 2\n')
    mod = pkg / "objectives" / "toy.py"
    mod.write_text('"""Toy objective."""\nfrom ..helper import SCALE\n\n\ndef loss(x):\n    """Doc."""\n'
                   '    return SCALE * x  # eq. 1\n')
    for name in [m for m in sys.modules if m == "stepdistill" or m.startswith("stepdistill.")]:
        monkeypatch.delitem(sys.modules, name)  # find the toy package, not the installed one
    monkeypatch.syspath_prepend(str(tmp_path))

    def fingerprint():
        return sorted(cf.closure(["stepdistill.objectives.toy"]).items())

    first = fingerprint()
    assert [m for m, _ in first] == ["stepdistill.helper", "stepdistill.objectives.toy"]
    mod.write_text(mod.read_text().replace("# eq. 1", "# eq. 2, the paper's").replace('"""Doc."""', '"""Other."""'))
    assert fingerprint() == first
    (pkg / "helper.py").write_text('"""Helper."""\nSCALE = 3\n')  # an imported module's code
    assert fingerprint() != first
    shutil.rmtree(tmp_path / "stepdistill")
