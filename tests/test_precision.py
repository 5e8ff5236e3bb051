"""``--precision auto``: bf16 mixed precision where the hardware computes bf16 natively, else 32-bit,
decided from the CPU's flags or the GPU's compute capability (faked here), never from a name."""

from __future__ import annotations

import warnings

import pytest
import torch

from cifar_lightning import trainer as trainer_module
from cifar_lightning.trainer import Trainer, cpu_flags, resolve_precision


@pytest.mark.parametrize(
    ("flags", "expected", "why"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed", "avx512_bf16"),
        ({"avx2", "amx_bf16", "amx_tile"}, "bf16-mixed", "amx_bf16"),
        ({"fp", "asimd", "bf16"}, "bf16-mixed", "bf16"),  # Arm's FEAT_BF16
        ({"avx2", "avx512f", "avx512_vnni"}, "32-true", "no native bf16"),  # AVX-512 alone emulates bf16
        ({"avx2"}, "32-true", "no native bf16"),
        (None, "32-true", "cannot be read"),
    ],
)
def test_auto_on_a_cpu_follows_its_flags(monkeypatch, flags, expected, why):
    monkeypatch.setattr(trainer_module, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    precision, reason = resolve_precision("auto", "cpu")
    assert precision == expected and reason.startswith("auto: ") and why in reason


@pytest.mark.parametrize(
    ("capability", "expected"), [((8, 0), "bf16-mixed"), ((9, 0), "bf16-mixed"), ((7, 5), "32-true")]
)
def test_auto_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision, reason = resolve_precision("auto", "cuda")
    assert precision == expected and f"{capability[0]}.{capability[1]}" in reason


def test_an_explicit_precision_is_kept():
    assert resolve_precision("16-mixed", "cpu") == ("16-mixed", "as asked")
    assert resolve_precision(32, "cpu") == (32, "as asked")


def test_the_trainer_resolves_auto_and_keeps_why(monkeypatch):
    monkeypatch.setattr(trainer_module, "cpu_flags", lambda: frozenset({"avx2"}))
    t = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert t.precision == "32-true" and "no native bf16" in t.precision_reason
    monkeypatch.setattr(trainer_module, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    t = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert t.precision == "bf16-mixed" and "amx_bf16" in t.precision_reason


def test_bf16_asked_for_on_a_cpu_without_it_runs_with_one_warning(monkeypatch):
    monkeypatch.setattr(trainer_module, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(UserWarning, match="without native bf16.*several times slower") as caught:
        t = Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    assert t.precision == "bf16-mixed" and len([w for w in caught if "native bf16" in str(w.message)]) == 1
    monkeypatch.setattr(trainer_module, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*native bf16.*")  # none where the CPU has it
        Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)


def test_this_machines_flags_are_read():
    flags = cpu_flags()
    assert flags is None or len(flags) > 5  # a Linux CPU lists dozens; elsewhere None, and auto is 32-true
