"""The robustness report: every aggregation rule against every attack, one simulation per cell.

``consortium robustness [CONFIG] --rules mean,median,krum --attacks none,sign-flip:scale=4
--fraction 0.2 --out DIR`` runs the matrix and writes into ``DIR``:

- ``robustness.json``: ``{rule: {attack: {"accuracy": ..., "backdoor_success": ... or null}}}``
  with the rule and attack specs exactly as given (``none`` for no attack);
- ``robustness.md``: the same as a table (also printed);
- ``robustness.png``: heat maps of final accuracy (and backdoor success where it applies).

With ``--out DIR`` every cell is appended to ``DIR/cells.jsonl`` as it finishes, and the
invocation is kept in ``DIR/robustness-args.json``: an interrupted matrix continues with
``consortium robustness --resume DIR`` (or the same command again); a cell already in
``cells.jsonl`` for the same experiment file contents, rule, attack and overrides is not run
again.

Every cell is the same experiment (same seed, data, malicious clients) with only the rule and
the attack changed. A rule that takes ``f`` (the number of faulty clients it tolerates) gets
the expected number of attackers in a round unless the spec sets it (or sets trimmed mean's
``beta``): the defender is assumed to know ``f``, as the papers assume. ``--no-f`` leaves every
rule at its own default instead, as a user who names only the rule gets it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from consortium.config import check_rule, load_config
from consortium.errors import ConfigError, ConsortiumError

__all__ = [
    "check_out", "load_cells", "load_invocation", "parse_rules", "robustness_matrix",
    "save_invocation", "write_report",
]

CELLS_FILE = "cells.jsonl"
ARGS_FILE = "robustness-args.json"
#: What ``consortium robustness`` writes into its ``--out``; any other file there is the user's.
OUTPUTS = frozenset({CELLS_FILE, ARGS_FILE, "robustness.json", "robustness.md", "robustness.png"})


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_rules(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"mean,trimmed-mean:f=2,krum"`` → ``[(spec, name, params), ...]``, every rule checked.

    A comma starts a new rule unless the item is a ``key=value`` without ``:`` (it continues
    the previous rule's parameters), as in ``--attacks``.

    Raises:
        ConfigError: an empty item, an unknown rule (the message lists them) or parameter.
    """
    groups: list[str] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            raise ConfigError(f"rule list {text!r} has an empty item")
        if "=" in item and ":" not in item:
            if not groups:
                raise ConfigError(f"rule list {text!r}: {item!r} comes before any rule name")
            groups[-1] += "," + item
        else:
            groups.append(item)
    out = []
    for spec in groups:
        name, _, rest = spec.partition(":")
        params: dict[str, Any] = {}
        for item in (p.strip() for p in rest.split(",")) if rest else ():
            key, eq, val = item.partition("=")
            if not eq or not key.strip() or not val.strip():
                raise ConfigError(f"rule spec {spec!r}: {item!r} is not key=value")
            params[key.strip().replace("-", "_")] = _value(val.strip())
        name = name.strip()
        check_rule(name, params)  # the parameters now, not after an hour of runs
        out.append((spec, name, params))
    return out


def _takes_f(name: str) -> bool:
    if name == "mean":
        return False
    from consortium.aggregation.robust import RULES

    return "f" in inspect.signature(RULES[name]).parameters


def robustness_matrix(
    config: str | Path | None,
    *,
    rules: str,
    attacks: str,
    fraction: float,
    overrides: Sequence[str] = (),
    on_cell: Callable[[str, str, dict[str, Any]], None] | None = None,
    give_f: bool = True,
    out: Path | None = None,
    on_start: Callable[[], None] | None = None,
    on_reused: Callable[[str, str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Run every rule against every attack; ``{rule: {attack: {"accuracy", "backdoor_success"}}}``.

    ``give_f``: a rule that takes ``f`` and whose spec sets neither ``f`` nor ``beta`` gets the
    expected number of attackers in a round; False leaves it at the rule's default.

    ``out``: a folder (:func:`check_out`) where each finished cell is appended to
    ``cells.jsonl`` at once; cells found there for the same experiment (file contents, rule,
    attack, fraction and overrides) are taken from it instead of run again (and passed to
    ``on_reused`` instead of ``on_cell``). ``on_start`` is called once every argument has been
    checked, before the first cell.

    A cell whose run fails with a user error (a rule that needs more clients per round than the
    config has, say) gets ``{"accuracy": None, "backdoor_success": None, "error": message}``; the
    other cells still run.

    Raises:
        ConfigError: a bad rule or attack list, or a fraction outside [0, 1).
    """
    from consortium.attacks import parse_attacks
    from consortium.attacks.threat import malicious_count
    from consortium.simulation import simulate

    if not 0 <= fraction < 1:
        raise ConfigError(f"--fraction {fraction} must be in [0, 1): the share of malicious clients")
    rule_specs = parse_rules(rules)
    attack_names = [a.strip() for a in _attack_groups(attacks)]
    attack_specs = list(zip(attack_names, parse_attacks(attacks), strict=True))
    base = load_config(config, list(overrides))
    if base.attack.kind != "none":
        raise ConfigError("the config already has an [attack]; the matrix sets it per cell, remove it")
    from consortium.data import load_dataset

    population = len(load_dataset(base.data, seed=base.seed).clients)
    from consortium.server.sampling import UniformSampler

    # the round size the run's sampler draws (a fraction rounds up, as it does there)
    per_round = UniformSampler(base.sampling.clients_per_round, base.sampling.fraction).size(population)
    expected_f = math.floor(malicious_count(population, fraction) * per_round / population + 0.5)
    source = Path(config).read_bytes() if config is not None else b"(the embedded demo)"
    saved = load_cells(out) if out is not None else {}
    if on_start is not None:
        on_start()
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for rule_spec, rule, rule_params in rule_specs:
        row: dict[str, dict[str, Any]] = {}
        for attack_spec, (attack, attack_params) in attack_specs:
            params = dict(rule_params)
            if give_f and _takes_f(rule) and not {"f", "beta"} & set(params):
                params["f"] = max(expected_f, 1)
            cell_overrides = [*overrides, f'aggregation.rule="{rule}"']
            cell_overrides += [f"aggregation.{k}={_toml(v)}" for k, v in params.items()]
            if attack != "none":
                cell_overrides += [f'attack.kind="{attack}"', f"attack.fraction={fraction}"]
                cell_overrides += [f"attack.{k}={_toml(v)}" for k, v in attack_params.items()]
            key = _cell_key(source, cell_overrides)
            cell: dict[str, Any]
            if key in saved:
                cell = saved[key]
                if on_reused is not None:
                    on_reused(rule_spec, attack_spec, cell)
            else:
                try:
                    cfg = load_config(config, cell_overrides)
                    result = simulate(cfg, progress=False, report=False)
                    final = result.summary["final"]
                    cell = {
                        "accuracy": final.get("accuracy"),
                        "backdoor_success": final.get("backdoor_success"),
                    }
                except ConsortiumError as exc:
                    cell = {"accuracy": None, "backdoor_success": None, "error": str(exc)}
                if out is not None:
                    _append_cell(out, key, rule_spec, attack_spec, cell)
                if on_cell is not None:
                    on_cell(rule_spec, attack_spec, cell)
            row[attack_spec] = cell
        table[rule_spec] = row
    return table


def _cell_key(source: bytes, overrides: Sequence[str]) -> str:
    """What makes a cell's result: the experiment file's bytes and every override of the cell
    (rule, its parameters and ``f``, attack, fraction, the user's ``--set``)."""
    h = hashlib.sha256(source)
    h.update(json.dumps(list(overrides)).encode())
    return h.hexdigest()


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder that is not a robustness
    report's (its files could be overwritten).

    Raises:
        ConfigError: naming the folder and the fix.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; give a new or empty folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS) if out.is_dir() else []
    if foreign:
        raise ConfigError(
            f"--out {str(out)!r} is a folder that is not a robustness report: it holds "
            f"{', '.join(foreign[:4])}{' …' if len(foreign) > 4 else ''}, which the report could "
            f"overwrite; give a new or empty folder (e.g. --out {out / 'robustness'})"
        )


def load_cells(out: Path) -> dict[str, dict[str, Any]]:
    """The finished cells in ``out/cells.jsonl`` by key; a line cut short by an interrupt (the
    last one) is skipped and its cell runs again."""
    path = out / CELLS_FILE
    if not path.exists():
        return {}
    cells: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            cells[str(entry["key"])] = dict(entry["cell"])
        except (ValueError, KeyError, TypeError):
            continue
    return cells


def _append_cell(out: Path, key: str, rule: str, attack: str, cell: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"key": key, "rule": rule, "attack": attack, "cell": cell})
    with (out / CELLS_FILE).open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_invocation(out: Path, invocation: dict[str, Any]) -> None:
    """Keep the command's arguments in ``out/robustness-args.json`` for ``--resume``; the
    experiment file by its absolute path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ARGS_FILE).write_text(json.dumps(invocation, indent=2), encoding="utf-8")


def load_invocation(out: Path) -> dict[str, Any]:
    """The arguments :func:`save_invocation` kept.

    Raises:
        ConfigError: ``out`` holds no robustness run to resume.
    """
    try:
        data = json.loads((out / ARGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(
            f"--resume {str(out)!r}: no {ARGS_FILE} there, so it is not a robustness report to "
            "continue; give the --out of an interrupted `consortium robustness`"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--resume {str(out)!r}: {ARGS_FILE} is damaged; start the matrix again")
    return data


def _attack_groups(text: str) -> list[str]:
    groups: list[str] = []
    for item in (p.strip() for p in text.split(",")):
        if "=" in item and ":" not in item and groups:
            groups[-1] += "," + item
        else:
            groups.append(item)
    return groups


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def format_table(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A markdown table: one row per rule, one column per attack; ``acc`` or ``acc / bd``
    (backdoor success) per cell, ``error`` where the run failed."""
    attacks = list(next(iter(table.values())).keys()) if table else []
    lines = ["| rule | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for rule, row in table.items():
        cells = []
        for attack in attacks:
            c = row[attack]
            if c.get("error"):
                cells.append("error")
            elif c.get("backdoor_success") is not None:
                cells.append(f"{c['accuracy']:.3f} / bd {c['backdoor_success']:.2f}")
            else:
                cells.append(f"{c['accuracy']:.3f}" if c.get("accuracy") is not None else "–")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(table: dict[str, dict[str, dict[str, Any]]], out: Path, *, meta: dict[str, Any]) -> None:
    """Write ``robustness.json`` (the table only: its keys are the rules), ``robustness.md``
    (``meta`` as a list, then the table) and ``robustness.png`` (the heat maps)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    errors = [
        f"- {rule} × {attack}: {c['error']}"
        for rule, row in table.items() for attack, c in row.items() if c.get("error")
    ]
    md = ["# Robustness", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
          "Final accuracy (and backdoor success `bd` where the attack plants one).", "",
          format_table(table)]
    if errors:
        md += ["", "Cells that did not run:", *errors]
    (out / "robustness.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    try:
        _heat_map(table, out / "robustness.png")
    except ImportError:  # pragma: no cover - matplotlib is a core dependency today
        pass


def _heat_map(table: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = heat_map_figure(table)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cell_label(value: float) -> str:
    """A heat-map cell's text: two decimals (``0.87``)."""
    return f"{value:.2f}"


def label_colour(rgba: Sequence[float]) -> str:
    """``"black"`` or ``"white"``, whichever contrasts more with a cell of colour ``rgba``:
    the WCAG 2.1 contrast ratio (L₁ + 0.05) / (L₂ + 0.05) of relative luminances, so a label
    stays readable on any colour map, reversed ones included (``magma_r`` is light at 0)."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "white"


def heat_map_figure(table: dict[str, dict[str, dict[str, Any]]]) -> Any:
    """The matplotlib figure of ``robustness.png``: final accuracy, and backdoor success where
    an attack plants one; each cell labelled with its value in the colour that contrasts
    with it (:func:`label_colour`), ``error`` where the run failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rules = list(table)
    attacks = list(next(iter(table.values())).keys()) if table else []
    panels = [("final accuracy", "accuracy", "viridis")]
    if any(c.get("backdoor_success") is not None for row in table.values() for c in row.values()):
        panels.append(("backdoor success (lower is better)", "backdoor_success", "magma_r"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.4 * len(attacks) * len(panels) + 2, 0.5 * len(rules) + 2),
        squeeze=False,
    )
    for ax, (title, key, cmap) in zip(axes[0], panels, strict=True):
        grid = np.array([
            [np.nan if table[r][a].get(key) is None else float(table[r][a][key]) for a in attacks]
            for r in rules
        ])
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
        ax.set_yticks(range(len(rules)), rules)
        ax.set_title(title)
        for i, rule in enumerate(rules):
            for j, attack in enumerate(attacks):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, cell_label(grid[i, j]), ha="center", va="center", fontsize=9,
                            color=label_colour(im.cmap(im.norm(grid[i, j]))))
                elif table[rule][attack].get("error"):
                    ax.text(j, i, "error", ha="center", va="center", fontsize=8, color="grey")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
