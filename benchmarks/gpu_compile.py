"""The GPU command's last section: every network of the registry compiled, within its own budget.

Each network runs one ``fast_dev_run`` fit (a training step and a validation step: two graphs) as
the GPU recipes run, in mixed precision, channels-last, on the tensor loader, with
``ClassifierModule(compile=True, compile_backend=SWEEP_BACKEND)``. The recipes' networks go first.
The section starts a network only while its deadline leaves the longest time a network has taken
so far; those it does not reach are listed (status ``incomplete``), and a later run with
``--skip-done`` takes them up where this one stopped. With ``--quick`` (on a CPU) the graphs are
captured with the ``eager`` backend, as the airbench section's quick fits are.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch

from benchmarks.gpu_sections import Context, _free_memory, mixed_precision

#: dynamo's graph capture and AOT autograd's forward and backward graphs, run by eager kernels:
#: what a network needs to compile, without inductor's code generation (tens of seconds a network,
#: which no window holds for 25). fastnet, the recipes' compiled network, is compiled with inductor
#: by the airbench section's compile check.
SWEEP_BACKEND = "aot_eager"

#: Seconds assumed for the first network, before one has been timed.
FIRST_GUESS = {"gpu": 15.0, "cpu": 10.0}


def sweep_order(configs: Path) -> list[str]:
    """Every registered network, those of the recipes in ``configs`` first, in registry order."""
    import yaml

    from cifar_lightning.models import list_models

    used = set()
    for path in sorted(Path(configs).glob("*.yaml")):
        spec = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        used.add(spec.get("arch"))
    names = list_models()
    return [n for n in names if n in used] + [n for n in names if n not in used]


def compiled_fit(ctx: Context, arch: str, data: Path, backend: str) -> dict[str, float | int]:
    """One ``fast_dev_run`` of ``arch`` compiled with ``backend``: seconds, and the steps taken."""
    import lightning.pytorch as pl

    from cifar_lightning import CIFAR10DataModule, ClassifierModule

    start = time.perf_counter()
    model = ClassifierModule(arch=arch, num_classes=3, channels_last=True, compile=True, compile_backend=backend)
    dm = CIFAR10DataModule(str(data), download=False, val_size=6, batch_size=8, num_workers=0, loader="tensor")
    trainer = pl.Trainer(
        accelerator="gpu" if ctx.cuda else "cpu",
        devices=1,
        precision=mixed_precision(),
        benchmark=ctx.cuda,
        fast_dev_run=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(ctx.work_dir),
    )
    trainer.fit(model, datamodule=dm)
    if ctx.cuda:
        torch.cuda.synchronize()
    steps = trainer.global_step
    del trainer, model, dm
    torch._dynamo.reset()  # each network's graphs and guards go with it
    _free_memory()
    return {"seconds": round(time.perf_counter() - start, 2), "steps": steps}


def _earlier_networks(ctx: Context) -> dict[str, dict]:
    """The networks an earlier run of this section compiled (``--skip-done``)."""
    import json

    if ctx.earlier is None:
        return {}
    try:
        networks = json.loads(ctx.earlier.read_text())["results"]["networks"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: r for name, r in networks.items() if r.get("status") == "compiled"}


def section_compile_sweep(ctx: Context) -> None:
    """Every network compiled, while the section's deadline allows; fails if one of them fails."""
    from cifar_lightning.data.synthetic import write_image_folder

    backend = "eager" if ctx.quick and not ctx.cuda else SWEEP_BACKEND
    order = sweep_order(ctx.configs)
    data = write_image_folder(ctx.work_dir / "tiny", n_train=12, n_test=4)
    networks: dict[str, dict] = {}
    res = ctx.results
    res.update(
        backend=backend,
        order=order,
        networks=networks,
        precision=mixed_precision(),
        channels_last=True,
        run="fast_dev_run: one training and one validation step, batch 8",
    )
    earlier = _earlier_networks(ctx)
    expected = FIRST_GUESS["gpu" if ctx.cuda else "cpu"]
    ctx.command(
        f"ClassifierModule(arch=..., compile=True, compile_backend={backend!r}, channels_last=True); "
        f"Trainer(fast_dev_run=True, precision={mixed_precision()!r}) for each network in turn"
    )
    for arch in order:
        if arch in earlier:
            networks[arch] = earlier[arch] | {"earlier_run": True}
            continue
        if ctx.left() < expected:
            continue  # not reached: the networks an earlier run compiled are still carried over
        try:
            networks[arch] = {"status": "compiled", **compiled_fit(ctx, arch, data, backend)}
            expected = max(expected, networks[arch]["seconds"])
        except Exception as err:
            networks[arch] = {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}"[:1000],
                "traceback": traceback.format_exc()[-2000:],
            }
            torch._dynamo.reset()
        print(f"{arch}: {networks[arch]['status']} " + str(networks[arch].get("seconds", "")), flush=True)
        ctx.save()
    res["not_reached"] = [arch for arch in order if arch not in networks]
    ctx.save()
    failed = [arch for arch, r in networks.items() if r["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} network(s) failed compiled with {backend}: {', '.join(failed)}")
    if res["not_reached"]:
        missed = len(res["not_reached"])
        ctx.outcome(
            "incomplete",
            f"{len(order) - missed} of {len(order)} networks compiled within the section's "
            f"budget, {missed} not reached (--skip-done takes them up)",
        )
