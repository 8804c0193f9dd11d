"""The report's "Feature importance" and "Calibration" sections (``summary.json``'s
``interpret``, :mod:`consortium.interpret`): tables, a bar chart of importances with the
per-site spread, and a reliability diagram per site and overall."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["interpret_figures", "interpret_sections"]

_TOP = 15  # features shown in the bar chart and the tables


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _importances(summary: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any],
                                                            Mapping[str, Any]]]:
    """(key, title, overall values, per-site values) for each importance present."""
    it = _mapping(summary.get("interpret"))
    out = []
    perm = _mapping(it.get("permutation"))
    if perm:
        out.append(("permutation", "permutation importance (loss increase)",
                    _mapping(perm.get("loss")), _mapping(perm.get("sites"))))
    shap = _mapping(it.get("shap"))
    if shap:
        out.append(("shap", "mean |SHAP| (probability)", _mapping(shap.get("mean_abs")),
                    _mapping(shap.get("sites"))))
    return out


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ranked(values: Mapping[str, Any]) -> list[str]:
    numbers = {str(f): v for f, v in values.items() if _float(v) is not None}
    return sorted(numbers, key=lambda f: -float(numbers[f]))[:_TOP]


def interpret_figures(run_dir: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    """Draw ``plots/importance_<kind>.png`` (bars: the overall value; whiskers: the smallest
    and largest site) and ``plots/reliability.png`` into ``run_dir``; empty without
    ``interpret``.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    it = _mapping(summary.get("interpret"))
    if not it:
        return {}
    from consortium.reporting.plots import _pyplot, _render

    pyplot = _pyplot()
    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    for key, title, overall, sites in _importances(summary):
        if _ranked(overall):
            out[key] = _render(pyplot, folder / f"importance_{key}.png",
                               _bars(title, overall, sites))
    calibration = _mapping(it.get("calibration"))
    if calibration.get("overall"):
        out["reliability"] = _render(pyplot, folder / "reliability.png", _reliability(calibration))
    return out


def _bars(title: str, overall: Mapping[str, Any],
          sites: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        names = _ranked(overall)[::-1]  # largest at the top
        values = [float(overall[f]) for f in names]
        lo, hi = [], []
        for f, v in zip(names, values):
            per_site = [x for s in sites.values()
                        if (x := _float(_mapping(s).get(f))) is not None]
            lo.append(v - min(per_site, default=v))
            hi.append(max(per_site, default=v) - v)
        positions = list(range(len(names)))
        axes.barh(positions, values, xerr=[[max(a, 0.0) for a in lo], [max(b, 0.0) for b in hi]],
                  color="tab:blue", ecolor="tab:gray", capsize=3, label="all sites")
        axes.set_yticks(positions, names)
        axes.axvline(0.0, color="black", linewidth=0.8)
        axes.set_xlabel(title)
        axes.set_title("feature importance (whiskers: smallest to largest site)")

    return draw


def _reliability(calibration: Mapping[str, Any]) -> Callable[[Any], None]:
    def points(body: Mapping[str, Any]) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for b in body.get("bins") or ():
            p, o = _float(_mapping(b).get("mean_predicted")), _float(_mapping(b).get("observed"))
            if p is not None and o is not None:
                xs.append(p)
                ys.append(o)
        return xs, ys

    def draw(axes: Any) -> None:
        axes.plot([0, 1], [0, 1], linestyle="--", color="tab:gray", linewidth=1.0,
                  label="perfectly calibrated")
        for site, body in _mapping(calibration.get("sites")).items():
            xs, ys = points(_mapping(body))
            axes.plot(xs, ys, marker=".", linewidth=0.8, alpha=0.6, label=str(site))
        xs, ys = points(_mapping(calibration.get("overall")))
        axes.plot(xs, ys, marker="o", color="black", linewidth=1.8, label="overall")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel(f"predicted ({calibration.get('predicted', 'probability')})")
        axes.set_ylabel("observed rate")
        axes.set_title("reliability diagram")

    return draw


def interpret_sections(
    run_dir: Path, summary: Mapping[str, Any], figures: Mapping[str, Path]
) -> str:
    """The HTML of "Feature importance" and "Calibration" (empty without ``interpret``);
    every value read from ``summary`` is escaped."""
    from consortium.reporting.report import _e, _table, format_value

    it = _mapping(summary.get("interpret"))
    if not it:
        return ""

    def figure(key: str, caption: str) -> str:
        if key not in figures:
            return ""
        source = figures[key].relative_to(run_dir).as_posix()
        return (f'<figure><img src="{_e(source)}" alt="{_e(caption)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>")

    out: list[str] = []
    importances = _importances(summary)
    coef = _mapping(it.get("coefficients"))
    if importances or coef:
        out += ["<h2>Feature importance</h2>",
                '<p class="note">Computed at each site on its own test split (SHAP: on a '
                "sample the site keeps) and added at the server; one-hot columns of a "
                "feature and its missing indicator count as one feature.</p>"]
        for key, title, overall, sites in importances:
            names = _ranked(overall)
            site_ids = [str(s) for s in sites]
            rows = [[f, format_value(_float(overall.get(f))),
                     *(format_value(_float(_mapping(sites[s]).get(f))) for s in sites)]
                    for f in names]
            out += [f"<h3>{_e(title)}</h3>", figure(key, title),
                    _table(["feature", "all sites", *site_ids], rows, numeric_from=1)]
            diff = _mapping(_mapping(it.get(key)).get("differences"))
            flagged = [_mapping(x) for x in diff.get("flagged") or ()]
            if flagged:
                out.append(
                    '<p class="note">Used differently across sites (share of a site\'s '
                    f"importance ≥ {_e(diff.get('ratio'))}× another\'s): "
                    + "; ".join(f"{_e(x.get('feature'))} (most at {_e(x.get('most'))}, least "
                                f"at {_e(x.get('least'))})" for x in flagged) + "</p>")
        if coef:
            columns = _mapping(coef.get("columns"))
            ranked = sorted(columns, key=lambda c: -abs(_float(columns[c]) or 0.0))
            rows = [[str(c), format_value(_float(columns[c]))] for c in ranked]
            out += [f"<h3>Coefficients ({_e(coef.get('kind'))})</h3>",
                    _table(["column", "coefficient"], rows, numeric_from=1)]
    calibration = _mapping(it.get("calibration"))
    if calibration:
        rows = [[str(name), format_value(_count(_mapping(b).get("n"))),
                 format_value(_float(_mapping(b).get("ece"))),
                 format_value(_float(_mapping(b).get("mean_predicted"))),
                 format_value(_float(_mapping(b).get("observed_rate")))]
                for name, b in [("overall", calibration.get("overall")),
                                *_mapping(calibration.get("sites")).items()] if b]
        out += ["<h2>Calibration</h2>",
                f'<p class="note">Expected calibration error over {_e(calibration.get("bins"))} '
                f"equal-width bins of the {_e(calibration.get('predicted'))}, per site and "
                "pooled over the sites' test splits.</p>",
                figure("reliability", "reliability diagram"),
                _table(["site", "n", "ECE", "mean predicted", "observed rate"], rows,
                       numeric_from=1)]
        suppressed = _mapping(calibration.get("suppressed"))
        if suppressed:
            out.append('<p class="note">Bins under the sites\' min_count stayed at the site '
                       "(left out of n and ECE): " + "; ".join(
                           f"{_e(k)}: bin(s) {_e(', '.join(str(b) for b in v or ()))}"
                           for k, v in suppressed.items()) + "</p>")
    deployed = _mapping(it.get("deployed"))
    if deployed and out:
        excluded = _mapping(deployed.get("excluded"))
        notes = [str(n) for n in deployed.get("notes") or ()]
        out.append(
            '<p class="note">Deployed: computed by sites '
            f"{_e(', '.join(str(s) for s in deployed.get('sites') or ()))} with their own "
            "randomness"
            + ("; left out: " + "; ".join(f"{_e(k)} ({_e(v)})" for k, v in excluded.items())
               if excluded else "")
            + ("; " + "; ".join(_e(n) for n in notes) if notes else "") + ".</p>")
    return "\n".join(part for part in out if part)
