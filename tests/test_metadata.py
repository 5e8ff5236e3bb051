"""What the repository states about itself: its licence, how to cite it, and dependency ranges
whose lower bounds a test run backs (``benchmarks/lowest_versions.json``)."""

from __future__ import annotations

import configparser
import datetime
import json
import re
import sys

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import cifar_lightning
from benchmarks import lowest_versions as lv

#: The top-level keys of Citation File Format 1.2.0, and those it requires.
CFF_KEYS = {
    "abstract",
    "authors",
    "cff-version",
    "commit",
    "contact",
    "date-released",
    "doi",
    "identifiers",
    "keywords",
    "license",
    "license-url",
    "message",
    "preferred-citation",
    "references",
    "repository",
    "repository-artifact",
    "repository-code",
    "title",
    "type",
    "url",
    "version",
}
CFF_REQUIRED = {"authors", "cff-version", "message", "title"}

#: The MIT licence's grant, condition and disclaimer, which a file naming MIT holds word for word.
MIT_TEXT = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
    'associated documentation files (the "Software"), to deal in the Software without restriction',
    "The above copyright notice and this permission notice shall be included in all copies or substantial "
    "portions of the Software.",
    'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND',
)


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def licence_of(text: str) -> str | None:
    """The SPDX identifier of a licence file's text: ``MIT`` for the MIT licence with a copyright
    line, None for anything else."""
    flat = " ".join(text.split())
    if (
        flat.startswith("MIT License")
        and re.search(r"Copyright \(c\) \d{4} \S", flat)
        and all(p in flat for p in MIT_TEXT)
    ):
        return "MIT"
    return None


def test_the_licence_file_is_the_licence_setup_cfg_names():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert licence_of(text) == setup_cfg()["metadata"]["license"] == "MIT"
    assert "Copyright (c) 2026 the cifar-lightning authors" in text


def test_a_licence_without_its_disclaimer_is_not_mit():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert licence_of(text.replace("WITHOUT WARRANTY", "WITH WARRANTY")) is None
    assert licence_of(text.replace("Copyright (c) 2026 the", "Copyright (c) the")) is None


def test_the_citation_file_is_valid_cff_for_this_release():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert CFF_REQUIRED <= set(cff) <= CFF_KEYS, set(cff) - CFF_KEYS
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert all(isinstance(cff[k], str) and cff[k].strip() for k in ("message", "title"))
    assert cff["authors"] and all(a.get("name") or a.get("family-names") for a in cff["authors"])
    assert cff["version"] == cifar_lightning.__version__
    assert cff["license"] == setup_cfg()["metadata"]["license"]
    assert isinstance(cff["date-released"], datetime.date)
    assert cff["keywords"] and all(isinstance(k, str) for k in cff["keywords"])


# ---------------------------------------------------------------------------------------------
# Lower bounds that were tested
# ---------------------------------------------------------------------------------------------


def test_every_direct_dependency_states_a_lower_bound():
    unbounded = [str(r) for r in lv.direct_requirements() if lv.lower_bound(r) is None]
    assert unbounded == [], "a lowest-version resolve picks ancient releases for these"


def test_the_lowest_versions_run_matches_setup_cfg_and_the_readme():
    # setup.cfg's ranges as they stand now against the last lowest-direct run: a bound changed, or
    # a dependency added, since that run fails here until scripts/check_lowest_versions.py reruns.
    result = json.loads((REPO / "benchmarks" / "lowest_versions.json").read_text())
    tests, rerun = result["tests"], result["failures_rerun"]
    assert tests["counts"]["passed"] > 0
    assert tests["counts"].get("failed", 0) + tests["counts"].get("errors", 0) == len(tests["failed"])
    reqs = lv.direct_requirements()
    assert sorted(result["direct"]) == sorted(canonicalize_name(r.name) for r in reqs)
    for req in reqs:
        row = result["direct"][canonicalize_name(req.name)]
        assert row["range"] == str(req.specifier), req.name
        assert row["at_lower_bound"] == (Version(row["installed"]) == lv.lower_bound(req)), req.name
    assert result["all_at_lower_bound"] == all(row["at_lower_bound"] for row in result["direct"].values())
    # A failure counts against the bounds only where the lock's versions pass it.
    from_bounds = set(tests["failed"]) - set(rerun["failed"] if rerun else ())
    assert set(result["failures_from_the_lower_bounds"]) == from_bounds
    assert result["bounds_hold"] == (not from_bounds)
    # The README states what that run found: that the bounds hold, or how many tests fail there.
    readme = (REPO / "README.md").read_text()
    if result["bounds_hold"]:
        assert "lowest versions the default tests passed with" in readme
    else:
        assert f"{len(from_bounds)} default tests fail<!-- lowest-failures -->" in readme


def test_failures_are_read_from_pytests_record(tmp_path):
    (tmp_path / "test_sample.py").write_text("def test_passes():\n    pass\n\n\ndef test_fails():\n    assert False\n")
    log = tmp_path / "run.log"
    log.write_text("")
    run = lv.run_tests(sys.executable, 1, tmp_path / "cache", log, None, [str(tmp_path / "test_sample.py")])
    assert run["counts"] == {"failed": 1, "passed": 1} and run["returncode"] == 1
    assert [f.split("::")[-1] for f in run["failed"]] == ["test_fails"]
    assert "cache_dir=<outside>" in run["command"] and str(tmp_path) not in run["command"]
    assert "1 failed, 1 passed" in log.read_text()


def test_lower_bounds_and_installed_versions_are_compared_as_versions():
    torch_req, numpy_req = Requirement("torch>=2.4,<=2.14.1"), Requirement("numpy>=1.23.3")
    assert lv.lower_bound(torch_req) == Version("2.4") and lv.lower_bound(Requirement("numpy")) is None
    rows = lv.direct_versions([torch_req, numpy_req], {"torch": "2.4.0", "numpy": "1.24.0"})
    assert rows["torch"]["at_lower_bound"] and not rows["numpy"]["at_lower_bound"]
    assert rows["torch"]["range"] == "<=2.14.1,>=2.4" and "why" in rows["torch"]
    assert not lv.direct_versions([numpy_req], {})["numpy"]["at_lower_bound"]


def test_pytest_summary_is_read_into_counts():
    output = (
        "....\n== short test summary info ==\nSKIPPED [1] tests/a.py:3: no GPU\n"
        "= 3 failed, 500 passed, 20 skipped, 1 deselected, 2 warnings, 1 error in 901.23s (0:15:01) =\n"
    )
    line = lv.summary_line(output)
    assert line.startswith("3 failed") and line.endswith("(0:15:01)")
    counts = lv.parse_summary(line)
    assert counts == {"failed": 3, "passed": 500, "skipped": 20, "deselected": 1, "warnings": 2, "errors": 1}
    assert lv.summary_line("collected 0 items\n") == ""


def test_the_environment_must_be_new_and_outside_the_clone(tmp_path):
    with pytest.raises(lv.UserError, match="inside the clone"):
        lv.check_folder(REPO / "venv-lowest")
    with pytest.raises(lv.UserError, match="exists"):
        lv.check_folder(tmp_path)
    assert lv.check_folder(tmp_path / "new") == (tmp_path / "new").resolve()


def test_a_missing_uv_is_one_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lv.main(["--venv", str(tmp_path / "venv"), "--uv", str(tmp_path / "no-uv-here")])
    assert exit_info.value.code == 2 and "pip install uv" in capsys.readouterr().err
    assert not (tmp_path / "venv").exists()
