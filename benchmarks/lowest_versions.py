"""The lowest versions ``setup.cfg`` allows, installed and tested: are its lower bounds true?

``python scripts/check_lowest_versions.py --venv ../venv-lowest`` makes a new virtual environment
outside the clone, installs the package with its ``dev`` extra there through uv's
``--resolution lowest-direct`` (every direct dependency at the lowest version its range allows,
everything else at its newest), runs the default tests from the clone with that environment's
Python, reruns any test that failed with the Python that runs the check (``failures_rerun``,
with its versions: a test that fails there too fails for another reason than the bounds), and
writes ``benchmarks/lowest_versions.json``: each direct dependency's range and the version
installed, every package installed, the test counts and time, the bounds this check raised and
why (``RAISED``), the verdict (``bounds_hold``) and the provenance. uv is the only tool needed
outside the environment (``pip install uv`` into any other one; ``--uv`` names it).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from benchmarks import REPO
from cifar_lightning.errors import UserError, exit_on_user_error
from cifar_lightning.report import write_report

#: The extra installed beside the package: the default tests need it.
EXTRA = "dev"

#: Lower bounds this check raised, from what, and why (the result repeats them).
RAISED = {
    "torch": (
        ">=2.3",
        "cifar_lightning/export.py passes external_data and dynamic_shapes to torch.onnx.export, "
        "arguments new in torch 2.5; benchmarks/gpu_sections.py's "
        "torch.cuda.is_bf16_supported(including_emulation=False) needs 2.4",
    ),
    "torchvision": (">=0.18", "the release paired with torch 2.5 (each torchvision requires its own torch)"),
    "lightning": (">=2.4", "callbacks/averaging.py imports EMAWeightAveraging, new in Lightning 2.6.0"),
    "torchmetrics": (">=1.4", 'module.py\'s MeanMetric(nan_strategy="disable") is new in torchmetrics 1.6.2'),
    "jsonargparse": (
        ">=4.27",
        "Lightning 2.6's CLI calls jsonargparse's instantiators with "
        "applied_instantiation_links, which 4.27.7 does not take; 4.39 is what Lightning 2.6's "
        "own extras ask for",
    ),
    "numpy": (
        "any",
        "unbounded, the lowest release does not build on Python 3.11; 1.23.2, the first with wheels "
        "for it, holds ml_dtypes (under onnxscript) at 0.0.1, which onnxscript cannot import, and that "
        "fails `import torch._dynamo`; ml_dtypes 0.2 and later need numpy 1.23.3 on Python 3.11",
    ),
    "pillow": (
        "any",
        "unbounded, the lowest release does not build on Python 3.11; 9.2.0 is the first with wheels for it",
    ),
    "matplotlib": (
        "any",
        "unbounded, the lowest release (0.86) does not build on Python 3; 3.6.0 is the first with "
        "wheels for Python 3.11",
    ),
    "filelock": (
        "any",
        "data/archives.py locks a file in a folder not made yet, and FileLock makes missing folders "
        "from 3.12.3 on (3.0.6, the oldest wheel, raises FileNotFoundError)",
    ),
    "pyyaml": (
        "not declared",
        "the package imports yaml (sweep specs, checkpoints); 6.0 is the first release with wheels for Python 3.11",
    ),
    "onnxscript": (
        "any",
        "under torch 2.5, exporting a network with a dynamic batch (export.py) fails in aten.view "
        "with onnxscript 0.1.0 to 0.4.0; 0.5.0 converts it",
    ),
}

#: The test that checks this check's result against setup.cfg: it reads the file this run writes.
OWN_TEST = "tests/test_metadata.py::test_every_lower_bound_is_a_version_the_tests_passed_with"

_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")


def direct_requirements(setup_cfg: Path = REPO / "setup.cfg", extra: str = EXTRA) -> list[Requirement]:
    """The package's direct dependencies and those of ``extra``, as ``setup.cfg`` states them."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"][extra].splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def lower_bound(req: Requirement) -> Version | None:
    """The lowest version ``req`` allows by its ``>=``/``==`` clause (None when it states none)."""
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(bounds, default=None)


def parse_summary(line: str) -> dict[str, int]:
    """pytest's closing line (``3 passed, 1 skipped in 2.1s``) as counts: ``{"passed": 3, ...}``."""
    counts: dict[str, int] = {}
    for number, word in _SUMMARY.findall(line):
        key = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[key] = counts.get(key, 0) + int(number)
    return counts


def summary_line(output: str) -> str:
    """The last line of pytest's output that holds its counts."""
    lines = [ln.strip(" =") for ln in output.splitlines() if _SUMMARY.search(ln) and " in " in ln]
    return lines[-1] if lines else ""


def direct_versions(reqs: Sequence[Requirement], installed: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each direct dependency's range, the version installed, and whether that is its lower bound."""
    out = {}
    for req in reqs:
        name = canonicalize_name(req.name)
        version, low = installed.get(name), lower_bound(req)
        row: dict[str, Any] = {"range": str(req.specifier) or "any", "installed": version}
        row["at_lower_bound"] = version is not None and low is not None and Version(version) == low
        if name in RAISED:
            row["raised_from"], row["why"] = RAISED[name]
        out[name] = row
    return out


def _run(cmd: list[str], log: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``cmd`` (output appended to ``log``); a failure ends the check with the log's tail."""
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, **kwargs)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{cmd[0]} {cmd[1]} failed (exit {done.returncode}); the end of {log}:\n{tail}")
    return done


def run_tests(
    python: str, workers: int, cache: Path, log: Path, env: dict[str, str] | None, args: Sequence[str]
) -> dict[str, Any]:
    """Run pytest from the clone with ``python`` (output appended to ``log``): its command (paths
    named by role), exit code, counts, summary, -ra's lines, and the ids of the tests that failed
    or errored (pytest's last-failed record, kept in ``cache`` outside the clone)."""
    from benchmarks.provenance import scrub, scrub_paths

    cmd = [python, "-m", "pytest", "-n", str(workers), "-q", "-o", f"cache_dir={cache}", *args]
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        offset = log.stat().st_size
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    output = log.read_bytes()[offset:].decode(errors="replace")
    line = summary_line(output)
    lastfailed = cache / "v" / "cache" / "lastfailed"
    failed = sorted(json.loads(lastfailed.read_text())) if lastfailed.is_file() else []
    return {
        "command": scrub_paths(" ".join(["python", *cmd[1:7], "cache_dir=<outside>", *args])),
        "returncode": done.returncode,
        "counts": parse_summary(line),
        "summary": line,
        # -ra's short summary: one line per failure, error and skip reason.
        "short_summary": scrub([ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR", "SKIPPED"))]),
        "failed": failed,
    }


def check_folder(venv: Path) -> Path:
    """The environment's folder, refused when it is inside the clone or already exists."""
    venv = venv.expanduser().resolve()
    if venv == REPO or REPO in venv.parents:
        raise UserError(f"--venv {venv} is inside the clone: give a folder outside it (e.g. ../venv-lowest)")
    if venv.exists():
        raise UserError(f"--venv {venv} exists: give a new folder, or remove it first (the check needs a fresh one)")
    return venv


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``scripts/check_lowest_versions.py``: install the lowest direct versions, test, save."""
    import argparse

    from benchmarks.provenance import describe_path, finish, provenance, versions

    p = argparse.ArgumentParser(description="Install the lowest versions setup.cfg allows and run the default tests.")
    p.add_argument("--venv", type=Path, required=True, help="the new environment's folder, outside the clone")
    p.add_argument("--python", default=sys.executable, help="the interpreter to base it on (default: this one)")
    p.add_argument("--uv", default="uv", help="the uv executable (default: uv on PATH)")
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "benchmarks" / "lowest_versions.json",
        help="the result (default: benchmarks/lowest_versions.json)",
    )
    args = p.parse_args(argv)
    uv = shutil.which(args.uv)
    if uv is None:
        raise UserError(f"no uv at {args.uv!r}: install it (pip install uv) and pass --uv PATH")
    venv = check_folder(args.venv)
    prov = provenance()
    log = venv.with_name(venv.name + ".log")  # beside the environment: uv wants its folder new
    log.write_text("")
    python = str(venv / "bin" / "python")
    _run([uv, "venv", "--python", args.python, str(venv)], log)
    install = [uv, "pip", "install", "--python", python, "--resolution", "lowest-direct", "-e", f".[{EXTRA}]"]
    _run(install, log, cwd=REPO)
    listed = subprocess.run(
        [uv, "pip", "list", "--python", python, "--format", "json"], capture_output=True, text=True, check=True
    ).stdout
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listed)}
    installed.pop("cifar-lightning", None)
    probe = "import json; from benchmarks.provenance import versions; print(json.dumps(versions()))"
    tested_versions = json.loads(
        subprocess.run([python, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    )

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    print(f"installed (torch {installed.get('torch')}); testing, output in {log}", flush=True)
    start = time.monotonic()
    run = run_tests(python, args.workers, venv / "pytest-cache", log, env, ["--deselect", OWN_TEST])
    seconds = time.monotonic() - start
    # A test that fails with the lowest versions and with this interpreter's (the lock's, where
    # the check runs from the clone's environment) fails for another reason than the bounds.
    rerun = None
    if run["failed"]:
        print(f"{len(run['failed'])} failed; rerunning them with {describe_path(sys.executable)}", flush=True)
        rerun = run_tests(sys.executable, args.workers, venv / "pytest-cache-rerun", log, None, run["failed"])
        rerun["versions"] = versions()
    from_bounds = sorted(set(run["failed"]) - set(rerun["failed"] if rerun else ()))
    prov = finish(prov) | {"versions": tested_versions}
    direct = direct_versions(direct_requirements(), installed)
    result = {
        "provenance": prov,
        "python": tested_versions["python"],
        "uv": subprocess.run([uv, "--version"], capture_output=True, text=True).stdout.split()[1],
        "install": " ".join(["uv", *install[1:4], "VENV/bin/python", *install[5:]]),
        "direct": direct,
        "all_at_lower_bound": all(row["at_lower_bound"] for row in direct.values()),
        "tests": run | {"seconds": round(seconds, 1)},
        "failures_rerun": rerun,
        "failures_from_the_lower_bounds": from_bounds,
        "bounds_hold": bool(run["counts"].get("passed")) and not from_bounds,
        "installed": dict(sorted(installed.items())),
    }
    write_report(result, args.output)
    verdict = "the lower bounds hold" if result["bounds_hold"] else f"{len(from_bounds)} failures from the lower bounds"
    print(f"{run['summary'] or 'no pytest summary'}: {verdict}; {describe_path(args.output)} written", flush=True)
    if not result["bounds_hold"]:
        raise SystemExit(1)
    return result
