"""What a reader is shown works: every shell command of README.md and docs/*.md runs, every
relative link resolves, and README stays short.

How each block runs is said by the comment before it (``tests/doc_commands.py``; the reader's
version is in docs/architecture.md, "Tests"). Default blocks run in this process, as ``python``
would run them (``runpy``, ``sys.argv``, the exit code), so that torch and Lightning are imported
once; ``slow`` blocks run each command in a process of its own. Commands run from a scratch folder
that holds the clone's ``scripts/``, ``configs/``, ``notebooks/`` and ``hubconf.py``.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import tarfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, labelled_image, write_image_folder
from doc_commands import (
    PAGES,
    Block,
    anchors,
    github_slug,
    output_shows,
    page_blocks,
    relative_links,
    substitute,
)

from cifar_lightning.constants import CIFAR10_CLASSES

#: What README.md and .ci/run both hold: the install-and-test command a new user and CI run.
CI_COMMAND = "pip install -r requirements.txt -e . && pytest -n auto"
README_LIMIT = 12_000


def _collect() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for page in PAGES:
        try:
            blocks += page_blocks(page)
        except ValueError as err:
            problems.append(str(err))
    return blocks, problems


BLOCKS, PROBLEMS = _collect()


# ---------------------------------------------------------------------------------------------
# What the commands get: tiny data, a trained run, a scratch folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def documented_run(tmp_path_factory) -> Path:
    """A finished run of simple_cnn on a tiny folder: what ``run`` and ``checkpoint`` stand for."""
    from cifar_lightning.fit import fit_main

    root = tmp_path_factory.mktemp("documented-run")
    data = write_image_folder(root / "tiny")
    fit_main(
        [
            "--arch",
            "simple_cnn",
            "--epochs",
            "1",
            "--data-dir",
            str(data),
            "--output-dir",
            str(root / "runs"),
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return root / "runs" / "simple_cnn" / "version_0"


class Resources:
    """The resources a block's ``TEXT=RESOURCE`` names, made on first use."""

    def __init__(self, root: Path, request: pytest.FixtureRequest) -> None:
        self.root, self.request, self.made = root, request, {}

    def __call__(self, name: str) -> str:
        if name not in self.made:
            self.made[name] = str(getattr(self, f"_{name}")())
        return self.made[name]

    def _tiny(self) -> Path:
        return write_image_folder(self.root / "tiny")

    def _cifar10(self) -> Path:
        return write_image_folder(self.root / "cifar10", classes=CIFAR10_CLASSES, n_train=8, n_test=2)

    def _archive(self) -> Path:
        folder, out = Path(self("cifar10")), self.root / "cifar10.tar.gz"
        with tarfile.open(out, "w:gz") as tar:
            for split in ("train", "test"):
                tar.add(folder / split, split)
        return out

    def _image(self) -> Path:
        from PIL import Image

        path = self.root / "cat.jpg"
        Image.fromarray(labelled_image(0, np.random.default_rng(0))).save(path)
        return path

    def _images(self) -> Path:
        from PIL import Image

        folder = self.root / "images"
        folder.mkdir()
        for i in range(3):
            Image.fromarray(labelled_image(i, np.random.default_rng(i))).save(folder / f"{i}.png")
        return folder

    def _run(self) -> Path:
        return self.request.getfixturevalue("documented_run")

    def _checkpoint(self) -> Path:
        return Path(self("run")) / "checkpoints" / "last.ckpt"


def scratch_folder(root: Path) -> Path:
    """A folder to run commands from: the clone's scripts and recipes, nothing it can write to."""
    work = root / "work"
    work.mkdir()
    for name in ("scripts", "configs", "notebooks", "hubconf.py"):
        (work / name).symlink_to(REPO / name)
    (work / "docs").mkdir()
    return work


# ---------------------------------------------------------------------------------------------
# Running a command as a shell would
# ---------------------------------------------------------------------------------------------


def _python_target(tokens: list[str]) -> str | None:
    """``fit.py`` for ``python scripts/fit.py ...``, ``cifar_lightning`` for ``python -m cifar_lightning``."""
    if not tokens or tokens[0] not in ("python", "python3") or len(tokens) < 2:
        return None
    if tokens[1] == "-m":
        return tokens[2] if len(tokens) > 2 else None
    return Path(tokens[1]).name


def _run_in_process(argv: list[str], env: dict[str, str]) -> int:
    """Run ``python ARGV`` in this process; its exit code. State a script may change is restored."""
    import torch

    saved_argv, saved_path, saved_env = sys.argv[:], sys.path[:], dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    os.environ.update(env)
    try:
        with warnings.catch_warnings():
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, str(Path(argv[0]).resolve().parent))
                runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # an uncaught exception: Python prints it and exits with 1
        traceback.print_exc()
        return 1
    finally:
        sys.argv[:], sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads)


def run_command(line: str, block: Block, subs: dict[str, str], work: Path, capfd) -> tuple[int, str, bool]:
    """Run one documented command line from ``work``: (exit code, its output, whether Python ran it)."""
    tokens = shlex.split(line, comments=True)
    segments: list[list[str]] = [[]]
    for t in tokens:
        segments.append([]) if t == "&&" else segments[-1].append(t)
    if not all(_python_target(_without_env(s)[1]) for s in segments):
        # Not Python: through bash, as written (a redirection or a pipe included).
        proc = subprocess.run(
            ["bash", "-c", substitute(line, subs)], cwd=work, capture_output=True, text=True, timeout=300
        )
        return proc.returncode, proc.stdout + proc.stderr, False
    output = ""
    for segment in segments:
        env, argv = _without_env(segment)
        target = _python_target(argv)
        for script, args in block.directives.add:
            if script in (target, "*"):
                argv = [*argv, *args]
        argv = [substitute(a, subs) for a in argv]
        redirect = None
        if ">" in argv:
            at = argv.index(">")
            argv, redirect = argv[:at], work / argv[at + 1]
        if block.directives.slow:
            proc = subprocess.run(
                [sys.executable, *argv[1:]],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=900,
                env={
                    **os.environ,
                    **env,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                },
            )
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        else:
            capfd.readouterr()
            code = _run_in_process(argv[1:], env)
            out, err = capfd.readouterr()
        if redirect is not None:
            redirect.write_text(out)
        output += out + err
        if code:
            return code, output, True
    return 0, output, True


def _without_env(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """(``VAR=value`` prefixes, the command after them)."""
    env = {}
    while tokens and "=" in tokens[0] and tokens[0].split("=", 1)[0].isidentifier():
        key, _, value = tokens[0].partition("=")
        env[key] = value
        tokens = tokens[1:]
    return env, tokens


def run_block(block: Block, resources, work: Path, capfd) -> None:
    """Run every command of ``block``; ``AssertionError`` naming the command when one fails or
    does not show the output the page shows."""
    subs = {text: resources(name) for text, name in block.directives.subs.items()}
    for command in block.commands():
        code, output, python = run_command(command.line, block, subs, work, capfd)
        want = block.directives.exit if python else 0
        tail = "\n".join(output.splitlines()[-25:])
        assert code == want, f"{block.id}: `{command.line}` exited with {code}, not {want}:\n{tail}"
        for line in command.expected:
            assert output_shows(output, line), (
                f"{block.id}: `{command.line}` did not print\n  {line}\nIt printed:\n{tail}"
            )


def check_requirements(block: Block) -> str | None:
    """Why ``block`` cannot run yet (a ``requires:`` not met), or None."""
    from cifar_lightning.models import list_pretrained

    for need in block.directives.requires:
        kind, _, name = need.partition(" ")
        if kind == "weights":
            if name not in list_pretrained():
                return f"no shipped weights for {name} yet (cifar_lightning/weights/manifest.json)"
        elif not (REPO / need).exists():
            return f"{need} does not exist yet"
    return None


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def test_every_page_marks_its_blocks_in_the_known_words():
    assert PROBLEMS == []
    assert len({b.page for b in BLOCKS}) >= 10 and len(BLOCKS) > 30  # the pages were read


def test_a_command_that_cannot_run_says_so_to_the_reader():
    hidden = [
        b.id for b in BLOCKS if b.directives.skip and b.directives.skip.lower() not in (b.text + " " + b.above).lower()
    ]
    assert hidden == [], "these skipped blocks do not show their reason in the block or just above it"


def _block_params():
    for block in BLOCKS:
        yield pytest.param(block, id=block.id, marks=[pytest.mark.slow] if block.directives.slow else [])


@pytest.mark.parametrize("block", _block_params())
def test_documented_commands_run(block: Block, tmp_path, capfd, request, monkeypatch):
    if block.directives.skip:
        pytest.skip(f"not run: {block.directives.skip}")
    missing = check_requirements(block)
    if missing:
        pytest.skip(missing)
    work = scratch_folder(tmp_path)
    monkeypatch.chdir(work)
    run_block(block, Resources(tmp_path, request), work, capfd)


def _blocks_of(path: Path, named: Path) -> list[Block]:
    blocks = page_blocks(path)
    for b in blocks:
        b.page = named
    return blocks


@pytest.mark.parametrize(
    "text",
    [
        # a flag renamed in the page: the CLI refuses it
        "<!-- doc-test: DATA=tiny; add fit.py: --trainer.fast_dev_run=true -->\n```bash\n"
        "python scripts/fit.py --arch simple_cnn --epochz 1 --data-dir DATA\n```\n",
        # the output shown is not what the command prints
        "<!-- doc-test: exit: 2 -->\n```console\n$ python scripts/fit.py --arch resnet9000\n"
        "error: unknown architecture 'resnet9001'. Valid names: ...\n```\n",
        # an exit code other than the one the page promises
        "<!-- doc-test: exit: 3; DATA=tiny -->\n```console\n$ python scripts/fit.py --arch nonet --data-dir DATA\n```\n",
    ],
    ids=["renamed-flag", "wrong-output", "wrong-exit-code"],
)
def test_a_broken_command_fails(text, tmp_path, capfd, request, monkeypatch):
    (block,) = _blocks_of(_write(tmp_path, text), REPO / "docs" / "example.md")
    work = scratch_folder(tmp_path)
    monkeypatch.chdir(work)
    # Each break is found for its own reason: the exit code, or the output the page shows.
    why = {
        "renamed-flag": r"exited with 2, not 0",
        "wrong-output": r"did not print\s+error: unknown architecture 'resnet9001'",
        "wrong-exit-code": r"exited with 2, not 3",
    }[request.node.callspec.id]
    with pytest.raises(AssertionError, match=r"docs/example.md:.*" + why):
        run_block(block, Resources(tmp_path, request), work, capfd)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(text)
    return path


def test_the_markers_mean_what_the_pages_say(tmp_path):
    text = (
        "Training takes hours on a CPU.\n\n"
        "<!-- doc-test: skip: hours on a CPU -->\n```bash\npython scripts/fit.py --arch resnet18\n```\n\n"
        "<!-- doc-test: slow; DATA=tiny; photos=images; add fit.py: --epochs 1; requires: weights resnet20 -->\n"
        "```sh\npython scripts/fit.py --data-dir DATA \\\n    --lr 0.1   # a comment\n"
        "python scripts/predict.py resnet20 photos/ 'photos/*.png'\n```\n\n"
        "```python\nprint('not a shell block')\n```\n\n"
        "```console\n$ python scripts/fit.py --arch x\nerror: ...\n$ echo hi\nhi\n```\n"
    )
    blocks = page_blocks(_write(tmp_path, text))
    assert [b.lang for b in blocks] == ["bash", "sh", "console"]
    skipped, slow, console = blocks
    assert skipped.directives.skip == "hours on a CPU" and "takes hours on a CPU" in skipped.above
    d = slow.directives
    assert d.slow and d.subs == {"DATA": "tiny", "photos": "images"} and d.add == [("fit.py", ["--epochs", "1"])]
    assert d.requires == ["weights resnet20"] and d.exit == 0
    assert [c.line for c in slow.commands()] == [
        "python scripts/fit.py --data-dir DATA      --lr 0.1   # a comment",
        "python scripts/predict.py resnet20 photos/ 'photos/*.png'",
    ]
    assert [(c.line, c.expected) for c in console.commands()] == [
        ("python scripts/fit.py --arch x", ["error: ..."]),
        ("echo hi", ["hi"]),
    ]
    assert substitute("a DATA $DATA DATA_DIR photos/ 'photos/*.png' xphotos", {"DATA": "/d", "photos": "/p"}) == (
        "a /d $DATA DATA_DIR /p/ '/p/*.png' xphotos"
    )
    assert output_shows("x\nerror: the loss at epoch 3, step 9.\n", "error: the loss at epoch ..., step ....")
    assert not output_shows("error: the loss\n", "error: the gain ...")
    for bad in ("skip:", "DATA=nothing", "sometimes"):
        _write(tmp_path, f"<!-- doc-test: {bad} -->\n```bash\nls\n```\n")
        with pytest.raises(ValueError):
            page_blocks(tmp_path / "page.md")


def test_github_slugs():
    assert github_slug("Training options") == "training-options"
    assert github_slug("The CLI's validate, test and predict") == "the-clis-validate-test-and-predict"
    assert github_slug("Weight averaging: EMA and SWA") == "weight-averaging-ema-and-swa"
    assert github_slug("Time to accuracy (`time_to_accuracy_cpu.json`)") == "time-to-accuracy-time_to_accuracy_cpujson"
    assert github_slug("Speed and benchmarks") == "speed-and-benchmarks"


def broken_links(page: Path) -> list[str]:
    """``page``'s relative links whose file or heading does not exist, as ``line: target (why)``."""
    broken = []
    for line, target in relative_links(page):
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{line}: {target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{line}: {target} (no heading #{anchor} in {path.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert broken_links(page) == [], f"{page.relative_to(REPO)}: broken links"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# A heading\n\n## Another one\n")
    page = _write(tmp_path, "See [it](other.md#another-one), [this](#top) and `[code](nowhere.md)`.\n\n# Top\n")
    assert relative_links(page) == [(1, "other.md#another-one"), (1, "#top")]  # code spans hold no links
    assert anchors(tmp_path / "other.md") == {"a-heading", "another-one"}
    assert broken_links(page) == []
    page.write_text("[gone](missing.md), [no such heading](other.md#third-one) and [fine](#top)\n\n# Top\n")
    assert broken_links(page) == [
        "1: missing.md (no such file)",
        "1: other.md#third-one (no heading #third-one in other.md)",
    ]


def test_readme_is_short_and_keeps_the_command_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme) <= README_LIMIT, f"README.md has {len(readme):,} characters; move detail into docs/"
    assert CI_COMMAND in readme.splitlines()
    assert CI_COMMAND in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_readme_counts_the_networks_there_are():
    from cifar_lightning.models import list_models

    assert re.search(rf"(?<![\d,]){len(list_models())} networks", (REPO / "README.md").read_text())


def test_every_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for _, t in relative_links(REPO / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []
