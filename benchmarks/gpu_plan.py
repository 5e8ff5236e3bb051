"""The GPU command's plan: its sections, what each costs, and which of them a budget holds.

A GPU is lent for minutes (about 15 in all, at most 10 a command, a machine's start included),
so the command works out its plan before it starts, prints it (each section's estimated seconds
against the budget) and refuses one that cannot fit: a window spent on a run that stops half-way
is lost. ``DEFAULT_SECTIONS`` at ``DEFAULT_BUDGET`` fit one command of about 8 minutes with room
to spare; the other sections run with ``--sections``, in a later window (``--skip-done``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """Seconds a section takes on one H100 (bf16, channels-last, tensor loader on the GPU), its
    process's start (imports, CUDA) included. ``minimum``: its least useful run (the budget check);
    ``estimate``: its whole plan; ``cap``: the limit of its process."""

    minimum: float
    estimate: float
    cap: float


#: Estimated from public figures, not yet from a run of ours on an H100 (see benchmarks/README.md).
#: Process start ~10 s; warm-ups: cuDNN autotuning ~5-10 s, a cold torch.compile 20-40 s.
#: In order of priority: the cheapest decisive checks first, the compile sweep last.
COSTS: dict[str, Cost] = {
    # pytest's start and CUDA ~15 s; the tensor loader and the policy operations against the CPU
    # ~10 s; Muon in bf16 (fastnet, 6 tiny epochs) ~10 s; EMA ~3 s; a fit, evaluate, predict and
    # export ~20 s; a fastnet epoch under set_sync_debug_mode("error") with each augmentation
    # (8 fits of a few steps) ~30 s. No compilation: the compile sweep is the last section.
    "gpu_tests": Cost(90, 100, 200),
    # cifar10/*.pt ~3 s, warmup94 ~10 s, our two warm-up fits ~10 s; a round of seeds ~18 s
    # (airbench94 3.5 s on an A100 plus its per-epoch evaluation; fastnet ~8 s and fastnet_muon
    # ~6 s with the CLI's set-up and the TTA test); the compile check ~45 s. Minimum: 2 rounds;
    # estimate: 4 rounds and the compile check (5 when the check is skipped or fast).
    "airbench": Cost(75, 150, 240),
    # 3 fits of 24 steps (fastnet, batch 1024, fp32) each paired with a bare loop ~15 s; the
    # loaders ~15 s (the PIL ones read a few thousand images each).
    "overhead_data": Cost(45, 45, 120),
    # warmup95 ~12 s, a warm-up fit ~8 s, airbench95 ~11 s a seed (10.4 s on an A100), our
    # 18 epochs of ResNet-18 (3.3 GFLOP a training image) at ~4-5 s an epoch, with the TTA test
    # ~85 s. Minimum: one seed of each; estimate: 3 seeds of airbench95.
    "resnet18_fast": Cost(115, 135, 300),
    # resnet34_tutorial: 20 epochs of 45k at 7 GFLOP a training image, with validation, ~80 s;
    # mynet_tutorial ~20 s; then resnet20_paper where it fits: 64,000 steps of 128 images at ~5 ms
    # (ResNet-20 is too small to fill an H100: the framework's per-step cost dominates) and 182
    # validations, ~7 min.
    "recipes": Cost(110, 530, 600),
    # 11 variants of resnet18_fast cut to 4 epochs of 50k (~20 s each with the TTA test, SAM ~35 s)
    # and a warm-up fit ~8 s: a round of seeds ~250 s. Minimum: the baseline and one trick.
    "ablation": Cost(60, 520, 600),
    # Every network's fast_dev_run compiled with aot_eager (graph capture and AOT autograd's two
    # graphs, no code generation): ~5 s for a small network to ~20 s for resnet152 or densenet121,
    # ~240 s for the 25. It stops starting networks at its deadline (its own budget: the time the
    # plan leaves it, at most its estimate or --cap) and says which it did not reach.
    "compile_sweep": Cost(45, 240, 300),
}

SECTIONS = tuple(COSTS)

#: The sections a plain run takes: together they fit ``DEFAULT_BUDGET`` by their estimates.
DEFAULT_SECTIONS = ("gpu_tests", "airbench", "overhead_data", "compile_sweep")

#: Seconds of a plain run: one command of about 8 minutes holds it, with the machine's set-up
#: (wheels, data extraction: ~20 s) and a section's stop (10 s) to spare.
DEFAULT_BUDGET = 420.0

#: Before the first section: the command's imports, the machine's description, decoding the
#: image folder once (~20-25 s for CIFAR-10's 60,000 JPEG files).
PREPARE_SECONDS = 35.0

#: --quick: every section is a few CPU seconds after its ~5 s of imports.
QUICK_COST = Cost(5, 30, 300)
QUICK_PREPARE_SECONDS = 5.0

#: The output folder comes back from a GPU machine with at most 8 files: the sections that run,
#: ``summary.json`` and the log.
MAX_SECTIONS_A_RUN = 6


def section_costs(quick: bool, caps: dict[str, float]) -> dict[str, Cost]:
    """Each section's cost in a run: ``QUICK_COST`` with --quick, and a ``--cap`` bounding the
    section's minimum and estimate too."""
    costs = {name: QUICK_COST if quick else COSTS[name] for name in SECTIONS}
    for name, cap in caps.items():
        c = costs[name]
        costs[name] = Cost(min(c.minimum, cap), min(c.estimate, cap), cap)
    return costs


@dataclass(frozen=True)
class Planned:
    """One section in the plan: its cost, the seconds it aims at and when it should end (seconds
    from the start), or why it does not run."""

    section: str
    cost: Cost
    seconds: float | None = None
    ends_at: float | None = None
    reason: str | None = None


def reserve(later: list[str], room: float, costs: dict[str, Cost]) -> float:
    """Seconds the later sections' minimums need, counting those that fit in ``room`` in order."""
    total = 0.0
    for name in later:
        if total + costs[name].minimum <= room:
            total += costs[name].minimum
    return total


def target(cost: Cost, left: float, later: list[str], costs: dict[str, Cost]) -> float:
    """Seconds a section aims at with ``left`` of the budget: its estimate, less what the later
    sections' minimums need, never under its own minimum."""
    return min(cost.estimate, max(cost.minimum, left - reserve(later, left - cost.minimum, costs)))


def make_plan(
    selected: list[str], costs: dict[str, Cost], budget: float, prepare: float, done: set[str] = frozenset()
) -> list[Planned]:
    """The plan of ``selected`` (in the order of ``SECTIONS``) within ``budget``: each section
    that runs takes ``target`` seconds, as the runner will aim it; the sections in ``done``
    (recorded ok by an earlier run) and those whose minimum no longer fits do not run."""
    todo = [n for n in selected if n not in done]
    rows, clock = [], prepare
    for k, name in enumerate(todo):
        cost, left = costs[name], budget - clock
        if left < cost.minimum:
            rows.append(
                Planned(
                    name,
                    cost,
                    reason=f"does not fit: needs at least {cost.minimum:.0f} s, "
                    f"{max(left, 0):.0f} s of the budget left",
                )
            )
            continue
        seconds = target(cost, left, todo[k + 1 :], costs)
        clock += seconds
        rows.append(Planned(name, cost, seconds, clock))
    by_name = {row.section: row for row in rows}
    return [by_name.get(n) or Planned(n, costs[n], reason="already recorded ok (--skip-done)") for n in selected]


def refusal(plan: list[Planned], budget: float, prepare: float) -> str | None:
    """Why the plan cannot run as asked, or None: a section left out for want of time (the window
    would end without it), or more sections than the output folder brings back."""
    todo = [row for row in plan if row.reason is None or row.reason.startswith("does not fit")]
    short = [row.section for row in todo if row.reason is not None]
    if short:
        need = prepare + sum(row.cost.minimum for row in todo)
        return (
            f"the plan does not fit the budget of {budget:.0f} s: {', '.join(short)} would not run. Its "
            f"{len(todo)} sections need at least {need:.0f} s (preparation {prepare:.0f} s and each section's "
            f"minimum): pass --budget {need:.0f} or more, or fewer --sections."
        )
    if len(todo) > MAX_SECTIONS_A_RUN:
        return (
            f"{len(todo)} sections in one run: the output folder brings back at most 8 files, "
            f"{MAX_SECTIONS_A_RUN} sections and the summary and log. Pass fewer --sections, and run "
            "the others later with --skip-done."
        )
    return None


def describe(plan: list[Planned], budget: float, prepare: float) -> list[str]:
    """The plan as printed before the run: one line per section, then the total."""
    lines = [
        f"   {'prepare':<14} {prepare:>5.0f} s  ends at {prepare:>4.0f} s  (imports, the machine, the data decoded)"
    ]
    for row in plan:
        c = row.cost
        costs = f"(minimum {c.minimum:.0f}, estimate {c.estimate:.0f}, cap {c.cap:.0f})"
        if row.reason is None:
            lines.append(f"   {row.section:<14} {row.seconds:>5.0f} s  ends at {row.ends_at:>4.0f} s  {costs}")
        else:
            lines.append(f"   {row.section:<14}     -           -      {row.reason}")
    total = max([prepare] + [row.ends_at for row in plan if row.ends_at is not None])
    lines.append(f"   {'total':<14} {total:>5.0f} s of the budget of {budget:.0f} s")
    return lines


def cuda_missing() -> str | None:
    """Why a run without --quick cannot start here (it measures a GPU), or None."""
    import torch

    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    return (
        f"no CUDA device is visible to this process (torch {torch.__version__}, built for CUDA "
        f"{torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES={visible}): the GPU command measures a GPU. "
        "Check nvidia-smi and the torch build, or pass --quick to run its sections on the CPU with tiny "
        "synthetic data."
    )
