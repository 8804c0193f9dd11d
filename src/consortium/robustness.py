"""The robustness report: every aggregation rule against every attack, one simulation per cell.

``consortium robustness [CONFIG] --rules mean,median,krum --attacks none,sign-flip:scale=4
--fraction 0.2 --out DIR`` runs the matrix and writes into ``DIR``:

- ``robustness.json``: ``{rule: {attack: {"accuracy": ..., "backdoor_success": ... or null}}}``
  with the rule and attack specs exactly as given (``none`` for no attack);
- ``robustness.md``: the same as a table (also printed);
- ``robustness.png``: heat maps of final accuracy (and backdoor success where it applies).

Every cell is the same experiment (same seed, data, malicious clients) with only the rule and
the attack changed. A rule that takes ``f`` (the number of faulty clients it tolerates) gets
the expected number of attackers in a round unless the spec sets it (or sets trimmed mean's
``beta``): the defender is assumed to know ``f``, as the papers assume. ``--no-f`` leaves every
rule at its own default instead, as a user who names only the rule gets it.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from consortium.config import check_rule, load_config
from consortium.errors import ConfigError, ConsortiumError

__all__ = ["parse_rules", "robustness_matrix", "write_report"]


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
) -> dict[str, dict[str, dict[str, Any]]]:
    """Run every rule against every attack; ``{rule: {attack: {"accuracy", "backdoor_success"}}}``.

    ``give_f``: a rule that takes ``f`` and whose spec sets neither ``f`` nor ``beta`` gets the
    expected number of attackers in a round; False leaves it at the rule's default.

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
            try:
                cfg = load_config(config, cell_overrides)
                result = simulate(cfg, progress=False, report=False)
                final = result.summary["final"]
                cell: dict[str, Any] = {
                    "accuracy": final.get("accuracy"),
                    "backdoor_success": final.get("backdoor_success"),
                }
            except ConsortiumError as exc:
                cell = {"accuracy": None, "backdoor_success": None, "error": str(exc)}
            row[attack_spec] = cell
            if on_cell is not None:
                on_cell(rule_spec, attack_spec, cell)
        table[rule_spec] = row
    return table


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rules = list(table)
    attacks = list(next(iter(table.values())).keys()) if table else []
    panels = [("final accuracy", "accuracy", "viridis")]
    if any(c.get("backdoor_success") is not None for row in table.values() for c in row.values()):
        panels.append(("backdoor success", "backdoor_success", "magma_r"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.4 * len(attacks) * len(panels) + 2, 0.5 * len(rules) + 2),
        squeeze=False,
    )
    for ax, (title, key, cmap) in zip(axes[0], panels):
        grid = np.array([
            [np.nan if table[r][a].get(key) is None else float(table[r][a][key]) for a in attacks]
            for r in rules
        ])
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
        ax.set_yticks(range(len(rules)), rules)
        ax.set_title(title)
        for i in range(len(rules)):
            for j in range(len(attacks)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] < 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
