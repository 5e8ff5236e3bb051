"""Raw argument lists, the vocabulary of ``scripts/fit.py``'s short flags, and argument errors
that read as one line.

``scan_args`` is the one reader of raw argument lists. ``FIT_ALIASES`` and ``FIT_SWITCHES`` map
each short flag to the CLI arguments it stands for; messages of the package name the short flags,
and ``in_cli_terms`` names the CLI's arguments instead for ``python -m cifar_lightning``.
``explain_parse_error`` turns jsonargparse's errors into one line that names the YAML file and the
key and suggests the nearest valid key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable


@dataclass(frozen=True)
class Arg:
    """One flag with its value as written (``--f=v`` or ``--f v``), or one bare token (``flag`` None)."""

    flag: str | None
    value: str | None
    tokens: tuple[str, ...]


def scan_args(argv: list[str], switches: Collection[str] = (), optional: Collection[str] = ()) -> list[Arg]:
    """Group ``argv`` into flags and their values.

    A flag takes ``=value`` or the next token. Flags in ``switches`` take no value; a flag in
    ``optional`` (``--resume [PATH]``), or any other flag, takes the next token only when that does
    not start with ``--``.
    """
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        if not token.startswith("--"):
            out.append(Arg(None, token, (token,)))
        elif eq:
            out.append(Arg(flag, value, (token,)))
        elif flag not in switches and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(Arg(flag, argv[i + 1], (token, argv[i + 1])))
            i += 1
        else:
            out.append(Arg(flag, None, (token,)))
        i += 1
    return out


def without_flag(argv: list[str], flag: str, switches: Collection[str] = ()) -> list[str]:
    """``argv`` without ``flag`` and its value."""
    return [t for a in scan_args(argv, switches) if a.flag != flag for t in a.tokens]


def value_of(argv: list[str], flag: str, switches: Collection[str] = ()) -> str | None:
    """The last value given to ``flag`` in ``argv``, else None."""
    return next((a.value for a in reversed(scan_args(argv, switches)) if a.flag == flag), None)


#: ``scripts/fit.py``'s short flag -> the CLI argument(s) it stands for. A flag never has its own
#: implementation. Messages of the package name the short flags; ``in_cli_terms`` turns them into
#: the CLI's arguments for ``python -m cifar_lightning``.
FIT_ALIASES: dict[str, tuple[str, ...]] = {
    "--arch": ("--model.arch",),
    "--epochs": ("--trainer.max_epochs",),
    "--batch-size": ("--data.batch_size",),
    "--lr": ("--model.lr",),
    "--optimizer": ("--model.optimizer",),
    "--sam-rho": ("--model.sam_rho",),
    "--scheduler": ("--model.scheduler",),
    "--weight-decay": ("--model.weight_decay",),
    "--label-smoothing": ("--model.label_smoothing",),
    "--augment": ("--data.augment",),
    "--randaugment-n": ("--data.randaugment_n",),
    "--randaugment-m": ("--data.randaugment_m",),
    "--rotate": ("--data.rotate",),
    "--cutout": ("--data.cutout",),
    "--random-erasing": ("--data.random_erasing",),
    "--mixup": ("--data.mixup",),
    "--cutmix": ("--data.cutmix",),
    "--data-dir": ("--data.data_dir",),
    "--dataset": ("--data.dataset",),
    "--image-size": ("--data.image_size",),
    "--val-size": ("--data.val_size",),
    "--num-workers": ("--data.num_workers",),
    "--devices": ("--trainer.devices",),
    "--num-nodes": ("--trainer.num_nodes",),
    "--accelerator": ("--trainer.accelerator",),
    "--precision": ("--trainer.precision",),
    "--seed": ("--seed_everything",),
    "--output-dir": ("--trainer.default_root_dir",),
    # A target holding {value} takes the value there; the others get "=value".
    "--ema": ('--trainer.callbacks+={"class_path": "cifar_lightning.callbacks.EMA", "init_args": {"decay": {value}}}',),
    "--swa": (
        '--trainer.callbacks+={"class_path": "cifar_lightning.callbacks.SWA", "init_args": {"swa_lrs": {value}}}',
    ),
}


#: Flags that take no value.
FIT_SWITCHES: dict[str, tuple[str, ...]] = {
    "--download": ("--data.download=true",),
    "--no-download": ("--data.download=false",),
    "--fast-dev-run": ("--trainer.fast_dev_run=true",),
    "--deterministic": ("--trainer.deterministic=true",),
    "--sam-adaptive": ("--model.sam_adaptive=true",),
    "--pretrained": ("--model.pretrained=true",),
}


def _flag_pattern(flag: str) -> str:
    return r"(?<![\w.-])" + re.escape(flag) + r"(?![\w-])"


def in_cli_terms(message: str) -> str:
    """``message`` with each ``scripts/fit.py`` short flag named by the CLI argument it stands for
    (``--data-dir`` -> ``--data.data_dir``), as a ``python -m cifar_lightning`` user types it."""
    table = {**FIT_ALIASES, **FIT_SWITCHES, "--resume": ("--ckpt_path",)}
    for flag, targets in table.items():
        if len(targets) == 1 and "{value}" not in targets[0]:
            message = re.sub(_flag_pattern(flag), lambda _, target=targets[0]: target, message)
    return message


def in_fit_terms(message: str) -> str:
    """``message`` with each CLI argument that has a short flag named by that flag instead
    (``--data.val_size`` -> ``--val-size``), as a ``scripts/fit.py`` user typed it."""
    for alias, targets in FIT_ALIASES.items():
        if len(targets) == 1:
            message = re.sub(re.escape(targets[0]) + r"(?![\w.])", alias, message)
    return message


# ---------------------------------------------------------------------------------------------
# Argument errors as one line
# ---------------------------------------------------------------------------------------------


_UNKNOWN_KEY = (
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept (?:option|nested key) '(?P<key>[\w.]+)'"),
    re.compile(r"(?:Subcommand '\w+'|Parser) does not accept (?:option|nested key) '(?P<key>[\w.]+)'"),
    re.compile(r"[Kk]ey '(?P<key>[\w.]+)' is not (?:expected|accepted)"),
)
_UNRECOGNISED = re.compile(r"unrecognized arguments: (?P<args>.*)")
_WRONG_VALUE = re.compile(r'Parser key "(?P<key>[\w.]+)":\s*(?P<why>.*)', re.S)


def config_files(argv: Iterable[str]) -> list[str]:
    """The ``--config`` / ``-c`` files named in ``argv``, in order."""
    argv = list(argv)
    files = []
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag in ("--config", "-c"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value:
                files.append(value)
    return files


def _holds_key(path: str, key: str) -> bool:
    import yaml

    try:
        node: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    for part in key.split("."):
        if isinstance(node, dict) and "init_args" in node and part not in node:
            node = node["init_args"]
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def nearest_key(key: str, valid: Iterable[str]) -> str | None:
    """The valid key closest to a mistyped ``key`` (``difflib``), preferring keys of its own group."""
    valid = sorted(set(valid))
    group = key.rpartition(".")[0]
    siblings = [v for v in valid if v.rpartition(".")[0] == group]
    for pool in (siblings, valid):
        found = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if found:
            return found[0]
    return None


def explain_parse_error(message: str, valid_keys: Iterable[str], argv: Iterable[str], command: str) -> str:
    """jsonargparse's ``message`` as one line: which YAML file or flag holds the unknown key, the
    nearest valid key, or which value of which key is wrong, and where the options are listed."""
    argv = list(argv)
    keys = list(valid_keys)
    help_hint = f"`{command} --help` lists every option."
    for pattern in _UNKNOWN_KEY:
        m = pattern.search(message)
        if m:
            key = ".".join(filter(None, [m.groupdict().get("group"), m.group("key")]))
            where = next((f for f in config_files(argv) if _holds_key(f, key)), None)
            near = nearest_key(key, keys)
            suggestion = f" Did you mean {near}?" if near else ""
            if where is None:  # typed as a flag
                return f"unknown option --{key}.{suggestion.replace('mean ', 'mean --')} {help_hint}"
            return f"{where}: unknown key {key}.{suggestion} {help_hint}"
    m = _UNRECOGNISED.search(message)
    if m:
        flag = m.group("args").split()[0]
        near = nearest_key(flag.lstrip("-").split("=")[0], keys)
        suggestion = f" Did you mean --{near}?" if near else ""
        return f"unknown option {flag.split('=')[0]}.{suggestion} {help_hint}"
    m = _WRONG_VALUE.search(message)
    if m:
        where = next((f for f in config_files(argv) if _holds_key(f, m.group("key"))), None)
        label = f"{where}: {m.group('key')}" if where else f"--{m.group('key')}"  # a flag when typed as one
        return f"{label}: {_plain_type_error(m.group('why'))}. {help_hint}"
    if "Problems parsing config" in message:
        broken = next((f for f in config_files(argv) if not _parses(f)), None)
        message = f"{broken}: not valid YAML ({message.split(':', 1)[1].strip()})" if broken else message
    return " ".join(message.split()).rstrip(".") + f". {help_hint}"


def _plain_type_error(why: str) -> str:
    """jsonargparse's "Expected a <class 'float'>. Got value: fast" as "expected a float, got 'fast'"."""
    why = " ".join(why.split())
    union = re.search(r"Subtypes: \[(?P<types>.*)\] Errors:.*Given value: (?P<value>.*)$", why)
    if union:
        # Literal[...] members are listed as plain choices, other types by name, each once.
        kinds: list[str] = []
        found = re.findall(r"(?:typing\.)?Literal\[([^\]]*)\]|<class '([\w.]+)'>", union.group("types"))
        for literal, other in found:
            names = [c.strip(" '\"") for c in literal.split(",")] if literal else [other.replace("NoneType", "null")]
            kinds += [k for k in names if k not in kinds]
        wanted = f"one of {', '.join(kinds)}" if any(lit for lit, _ in found) else " or ".join(kinds)
        return f"expected {wanted}, got {union.group('value')!r}"
    m = re.match(r"Expected a (?P<type>.+?)\. Got value: (?P<value>.*)", why)
    if not m:
        return why.rstrip(".")
    kind = re.sub(r"<class '([\w.]+)'>", r"\1", m.group("type"))
    choices = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", kind)
    kind = "one of " + ", ".join(c.strip(" '\"") for c in choices.group(1).split(",")) if choices else f"a {kind}"
    return f"expected {kind}, got {m.group('value')!r}"


def _parses(path: str) -> bool:
    import yaml

    try:
        yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return True
