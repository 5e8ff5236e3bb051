"""Every result says where it came from, and no committed file names a machine's folders."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from benchmarks import provenance as prov_mod
from benchmarks.provenance import (
    command_line,
    describe_data,
    describe_path,
    finish,
    provenance,
    scrub,
    scrub_paths,
)

#: The root of the sample machine paths below, joined at run time, so that this file names none.
S = "/"

#: An absolute POSIX path under a top-level folder that machines hold checkouts, homes, caches or
#: environments in, or a Windows user folder.
MACHINE_PATH = re.compile(
    r"(?<![\w.~<>/-])/(?:root|home|work|tmp|Users|opt|usr|mnt|var|srv|scratch|data|private)/[\w.+@-]"
    r"|[A-Za-z]:\\\\?Users\\"
)

#: Absolute paths tracked on purpose: (file, text), each with its reason.
ALLOWED = {
    # a test that an archive member naming an absolute path is refused, and nothing was written there
    ("tests/test_data.py", f"{S}tmp/absolute-escape.txt"),
    # where Debian's postgresql package installs initdb and pg_ctl (the sweep's PostgreSQL test)
    ("tests/test_sweep.py", f"{S}usr/lib/postgresql"),
    (".ci/run", f"{S}usr/lib/postgresql/"),
}


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = []
    for name in filter(None, out.split("\0")):
        path = REPO / name
        if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".ckpt", ".pt", ".onnx", ".gz"} or not path.is_file():
            continue
        files.append(path)
    return files


def machine_paths_in(path: Path) -> list[str]:
    rel = path.relative_to(REPO).as_posix()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if number == 1 and line.startswith("#!"):
            continue  # an interpreter line names the interpreter, not this machine
        for m in MACHINE_PATH.finditer(line):
            end = line.find(" ", m.start())
            token = line[m.start() : end if end > 0 else len(line)]
            if not any(rel == f and token.startswith(t) for f, t in ALLOWED):
                found.append(f"{rel}:{number}: {token[:80]}")
    return found


def test_no_tracked_file_names_an_absolute_path_of_a_machine():
    found = [hit for path in tracked_text_files() for hit in machine_paths_in(path)]
    assert found == [], "absolute paths in tracked files (name them by role: provenance.describe_path):\n" + "\n".join(
        found
    )


def test_no_tracked_file_names_this_checkout_or_home():
    # Whatever the machine calls its folders, this checkout's own path and the home folder appear nowhere.
    needles = {str(REPO), str(Path.home())} - {"/"}
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(REPO)}: {n}" for n in needles if n + "/" in text]
    assert found == []


def test_the_path_check_finds_what_it_looks_for(monkeypatch):
    # The check above must fail on a file that holds such a path (a file of the tree: the check
    # names files relative to it).
    sample = REPO / "tests" / "data" / "_path_check_sample.txt"
    sample.write_text(
        f'{{"data_dir": "{S}work/shared/data/x.tar.gz", "ok": "configs/a.yaml", "url": "https://a.org/b"}}\n'
    )
    try:
        assert machine_paths_in(sample) == [f'tests/data/_path_check_sample.txt:1: {S}work/shared/data/x.tar.gz",']
        monkeypatch.setattr(f"{__name__}.tracked_text_files", lambda: [sample])
        with pytest.raises(AssertionError, match="x.tar.gz"):
            test_no_tracked_file_names_an_absolute_path_of_a_machine()
    finally:
        sample.unlink()


def test_paths_are_named_by_role(tmp_path):
    assert describe_path(REPO / "configs" / "fastnet.yaml") == "configs/fastnet.yaml"
    # another checkout's folders are named from the repository's own folders down
    assert describe_path(f"{S}elsewhere/snap/benchmarks/reproduce/x.log") == "benchmarks/reproduce/x.log"
    assert describe_path(f"{S}opt/venv/lib/python3.11/site-packages/lightning/a.py") == "<site-packages>/lightning/a.py"
    assert describe_path(f"{S}usr/local/bin/python3.11") == "python"
    assert describe_path(tmp_path / "cifar10-jpeg.tar.gz") == "<outside>/cifar10-jpeg.tar.gz"
    # a cache folder named like the package is not the package
    assert describe_path(f"{S}root/.cache/cifar_lightning/extracted/x") == "<outside>/x"
    text = f"at {S}work/main/benchmarks/runs/a.ckpt and https://example.org/a/b, 1/2 of {S}root/x.tar"
    assert scrub_paths(text) == "at benchmarks/runs/a.ckpt and https://example.org/a/b, 1/2 of <outside>/x.tar"
    assert scrub({"a": [f"{S}srv/data/q.npz", 3]}) == {"a": ["<outside>/q.npz", 3]}


def test_command_line_is_relative():
    line = command_line(
        [
            str(REPO / "scripts" / "bench.py"),
            "--output",
            f"{S}tmp/q.json",
            "--sections=time_to_accuracy",
            "--quick",
            "--note",
            f"see {S}srv/logs/a.txt",
        ]
    )
    assert (
        line
        == "python scripts/bench.py --output '<outside>/q.json' --sections=time_to_accuracy --quick --note 'see <outside>/a.txt'"
    )


def test_provenance_records_commit_machine_versions_data_and_load(tmp_path):
    archive = tmp_path / "copy.tar.gz"
    archive.write_bytes(b"abc")
    p = finish(provenance(archive, argv=["scripts/bench.py", "--quick"]))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert p["commit"] == head and isinstance(p["uncommitted_changes"], bool)  # a checkout here
    assert p["uncommitted_changes"] == bool(p["changed_files"])
    assert p["command"] == "python scripts/bench.py --quick"
    m = p["machine"]
    assert m["cpu_cores"] == os.cpu_count() and m["cpu"]
    if Path("/proc/cpuinfo").is_file():
        flags = Path("/proc/cpuinfo").read_text()
        assert m["cpu_flags"]["avx512f"] == (" avx512f" in flags)
    assert p["versions"]["torch"] and p["versions"]["lightning"]
    # sha256 of b"abc"
    assert p["data"] == {
        "name": "copy.tar.gz",
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }
    assert p["load_average_1min_max"] is not None and p["finished"] >= p["started"][:19]
    assert MACHINE_PATH.search(json.dumps(p)) is None


def test_a_modified_or_new_file_is_recorded(monkeypatch):
    status = " M configs/fastnet.yaml\n?? cifar_lightning/new.py\n M README.md"
    monkeypatch.setattr(prov_mod, "_git", lambda *a: status if a[0] == "status" else "abc\n")
    state = prov_mod.git_state()
    assert state == {
        "commit": "abc",
        "uncommitted_changes": True,
        "changed_files": ["README.md", "cifar_lightning/new.py", "configs/fastnet.yaml"],
    }
    monkeypatch.setattr(prov_mod, "_git", lambda *a: None)  # no git: unknown, not clean
    assert prov_mod.git_state()["uncommitted_changes"] is None


def test_a_busy_machine_is_marked(monkeypatch):
    p = provenance(None, argv=["x"])
    monkeypatch.setattr(prov_mod, "load_average", lambda: float(os.cpu_count() + 3))
    assert finish(p, final=False)["machine_busy"] is True
    # a partial save keeps sampling: the final record still holds what the run saw
    prov_mod._SAMPLERS[p["started"]].samples.append(99.0)
    monkeypatch.setattr(prov_mod, "load_average", lambda: 0.0)
    final = finish(p)
    assert final["load_average_1min_max"] == 99.0 and final["machine_busy"] is True
    assert p["started"] not in prov_mod._SAMPLERS


@pytest.mark.parametrize("name", ["recipe_smoke.json", "time_to_accuracy_cpu.json", "cpu.json"])
def test_committed_results_carry_provenance(name):
    path = REPO / "benchmarks" / name
    if not path.is_file():
        pytest.fail(f"{name} is missing: regenerate it with its script (benchmarks/README.md)")
    p = json.loads(path.read_text())["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", p["commit"]) and p["command"].startswith("python scripts/")
    assert p["machine"]["cpu"] and p["versions"]["torch"] and "machine_busy" in p


def test_describe_data_of_a_folder(tmp_path):
    assert describe_data(tmp_path) == {"name": tmp_path.name}
    assert describe_data(None) is None


def _page_lines(page: str) -> list[str]:
    return (REPO / page).read_text().splitlines()


def _check_rows(page: str, lines: list[str], rows: dict[str, list[str]], source: str) -> None:
    """Each row of ``page`` that starts with a key shows every figure of its list (one such row each)."""
    for start, figures in rows.items():
        found = [line for line in lines if line.startswith(start)]
        assert len(found) == 1, f"{page} has {len(found)} rows starting {start!r}"
        missing = [f for f in figures if f not in found[0]]
        assert not missing, f"{page}'s row {start!r} does not show these figures of {source}: {missing}"


def _speed_rows_of_cpu_json(results: dict) -> dict[str, list[str]]:
    d, o = results["data"], results["overhead"]
    trivial = d["presets"]["presets"]["trivialaugment"]
    ms, se = o["framework_ms_per_step"], o["framework_ms_standard_error"]
    return {
        "| training images/s, tensor loader vs ImageFolder": [
            f"{d['tensor_loader']['images_per_s']:,.0f} vs {d['imagefolder_pil_2_workers']['images_per_s']:,.0f}: "
            f"{d['speedup']:.1f}x",
        ],
        "| `trivialaugment` on the tensor loader": [
            f"{trivial['tensor_loader_images_per_s']:,.0f} vs {trivial['per_image_2_workers_images_per_s']:,.0f} images/s: "
            f"{trivial['tensor_over_per_image']:.1f}x",
            f"{d['presets']['policy_over_resnet20_training']:.1f}x resnet20's "
            f"{d['presets']['resnet20_training_images_per_s']:,.0f} images/s",
        ],
        "| framework time a step": [
            f"bare step {o['bare_step_ms']:.1f} ms",
            f"{ms['defaults']:.2f} ± {se['defaults']:.2f} ms a step, ratio {o['ratio']:.3f}",
            f"{ms['bare_trainer']:.2f} ± {se['bare_trainer']:.2f} ms, {o['ratio_bare_trainer']:.3f}",
            f"{ms['lightning_floor']:.2f} ± {se['lightning_floor']:.2f} ms, {o['ratio_lightning_floor']:.3f}",
            f"takes {ms['lightning_floor']:.2f} ms, this package adds {o['ours_ms_per_step']:.2f} ms",
        ],
    }


def _accuracy(s: dict, seconds: bool = True) -> str:
    """``90.56% ± 0.02``, as the pages write a runner's mean (and std) of the time-to-accuracy summary."""
    return f"{100 * s['mean_test_acc']:.2f}%" + (
        f" ± {100 * s['std_test_acc']:.2f}" if s["std_test_acc"] is not None else ""
    )


def _speed_rows_of_time_to_accuracy(results: dict) -> dict[str, list[str]]:
    section = results["time_to_accuracy"]
    n = len(section["seeds"])
    figures = [f"{n} seed" + ("s" if n > 1 else "")]
    for runner, s in section["summary"].items():
        name = runner if runner == "airbench94" else f"`{runner}`"
        figure = f"{name} {_accuracy(s)} in {s['mean_seconds']:,.0f} s"
        vs = s.get("against_airbench94")
        if vs:
            time = f"{vs['time_ratio']:.3f}x" + (
                f" ± {vs['time_ratio_std']:.3f}" if vs["time_ratio_std"] is not None else ""
            )
            diff = f"{vs['accuracy_difference_points']:+.2f}" + (
                f" ± {vs['accuracy_difference_std']:.2f}" if vs["accuracy_difference_std"] is not None else ""
            )
            figure += f" (time {time}, {diff} points)"
        figures.append(figure)
    return {"| time to accuracy beside airbench94": figures}


@pytest.mark.parametrize("name", ["cpu.json", "time_to_accuracy_cpu.json"])
def test_speed_page_figures_are_those_of_the_committed_results(name):
    # docs/speed.md's table of CPU figures quotes these files, each figure in its own row: a file
    # regenerated without the page (or a figure typed by hand) fails here, with what the row
    # should show.
    results = json.loads((REPO / "benchmarks" / name).read_text())
    lines = _page_lines("docs/speed.md")
    rows = (_speed_rows_of_cpu_json if name == "cpu.json" else _speed_rows_of_time_to_accuracy)(results)
    if name == "cpu.json":  # and the tensor loader's sentence, wrapped over lines
        d = results["data"]
        prose = " ".join(" ".join(lines).split())
        sentence = (
            f"tensor loader made {d['speedup']:.1f} times as many training images a second as torchvision's "
            f"ImageFolder + PIL with 2 DataLoader workers on an idle 2-core CPU "
            f"({d['tensor_loader']['images_per_s']:,.0f} vs "
            f"{d['imagefolder_pil_2_workers']['images_per_s']:,.0f} images/s"
        )
        assert sentence in prose, f"docs/speed.md's tensor loader section should read: {sentence}"
    _check_rows("docs/speed.md", lines, rows, f"benchmarks/{name}")


def _reproduce_row(recipe: str) -> tuple[str, str]:
    """(our accuracy, the reference's) of ``recipe`` in benchmarks/reproduce.md, as ``77.88%``."""
    for line in _page_lines("benchmarks/reproduce.md"):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == recipe:
            ours = re.match(r"[\d.]+%", cells[3])
            reference = re.search(r"[\d.]+%", cells[2])
            assert ours, f"benchmarks/reproduce.md's row for {recipe} holds no accuracy: {cells[3]!r}"
            return ours.group(0), (reference.group(0) if reference else "")
    raise AssertionError(f"benchmarks/reproduce.md has no row for {recipe}")


def test_readme_results_are_those_of_the_committed_files():
    # README's results table and its speed sentence quote the committed files: a file regenerated
    # without README fails here.
    lines = _page_lines("README.md")
    tta = json.loads((REPO / "benchmarks" / "time_to_accuracy_cpu.json").read_text())["time_to_accuracy"]
    summary, n = tta["summary"], len(tta["seeds"])
    # Each row by its first cell (the weights table below it has a `fastnet` row of its own).
    first_cell = {"fastnet": "| `fastnet` (airbench94's recipe) |", "fastnet_muon": "| `fastnet_muon` |"}
    rows = {
        first_cell[runner]: [f"{_accuracy(summary[runner])} over {n} seeds in {summary[runner]['mean_seconds']:,.0f} s"]
        for runner in first_cell
    }
    air = summary["airbench94"]
    rows[first_cell["fastnet"]].append(
        f"airbench94's own code beside it: {100 * air['mean_test_acc']:.2f}% in {air['mean_seconds']:,.0f} s"
    )
    for recipe in ("mynet_tutorial", "simple_cnn_tutorial"):
        ours, reference = _reproduce_row(recipe)
        rows[f"| `{recipe}`"] = [ours] + ([reference] if reference else [])
    _check_rows("README.md", lines, rows, "benchmarks/time_to_accuracy_cpu.json and benchmarks/reproduce.md")
    d = json.loads((REPO / "benchmarks" / "cpu.json").read_text())["data"]
    vs = summary["fastnet"]["against_airbench94"]
    prose = " ".join(" ".join(lines).split())
    for figure in (
        f"{d['speedup']:.1f} times as many training images",
        f"takes {vs['time_ratio']:.3f}x the time",
        f"for {-vs['accuracy_difference_points']:.2f} points less",
    ):
        assert figure in prose, f"README.md should read: {figure}"


#: docs/training.md's row of each trick of benchmarks/tricks_cpu.json.
TRICK_ROWS = {
    "standard": "| none (crop + flip)",
    "ema": "| `--ema 0.99`",
    "swa": "| `--swa 0.05`",
    "mixup": "| `--mixup 1.0`",
    "cutmix": "| `--cutmix 1.0`",
    "cutout": "| `--cutout 16`",
    "random_erasing": "| `--random-erasing 0.5`",
    "autoaugment": "| `--augment autoaugment`",
    "randaugment": "| `--augment randaugment`",
    "trivialaugment": "| `--augment trivialaugment`",
    "sam": "| `--optimizer sam`",
}


def test_tricks_table_is_that_of_the_committed_results():
    results = json.loads((REPO / "benchmarks" / "tricks_cpu.json").read_text())["tricks"]
    assert set(TRICK_ROWS) == set(results["tricks"])
    rows = {
        TRICK_ROWS[name]: [f"| {t['images_per_s']:.0f} | {t['over_standard']:.2f}x |"]
        for name, t in results["tricks"].items()
    }
    lines = _page_lines("docs/training.md")
    _check_rows("docs/training.md", lines, rows, "benchmarks/tricks_cpu.json")
    rounds = results["tricks"]["cutout"]["rounds_images_per_s"]
    prose = " ".join(" ".join(lines).split())
    assert f"(cutout: {min(rounds):.0f} and {max(rounds):.0f} images/s)" in prose
    assert f"the fastest of {results['rounds']} rounds each" in prose


def test_the_quick_start_states_what_its_recipe_measured():
    # The quick start's training command, run by scripts/reproduce.py: its accuracy and minutes as
    # the kept report has them.
    report = json.loads((REPO / "benchmarks" / "reproduce" / "quickstart-seed0.json").read_text())
    prose = " ".join(" ".join(_page_lines("README.md")).split())
    minutes = (report["fit_seconds"] + report["test_seconds"]) / 60
    sentence = (
        f"took {minutes:.1f} min on a 2-core CPU (training {report['fit_seconds']:,.0f} s, test "
        f"{report['test_seconds']:,.0f} s) and reached {100 * report['test_acc']:.2f}% test accuracy"
    )
    assert sentence in prose, f"README.md's quick start should read: {sentence}"
