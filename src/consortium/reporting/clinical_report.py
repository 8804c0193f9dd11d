"""The report's sections for a clinician or a risk officer: the clinical reading per site and
overall, who gains from the federation, why pooled can score below federated, and what a
differentially private run protects."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import tomllib

__all__ = [
    "EPSILON_GUIDE", "brief_section", "clinical_section", "epsilon_reading", "majority_warning",
    "pooled_note", "privacy_section", "protected_unit", "site_sentence",
]

EPSILON_GUIDE = ((1.0, "strong"), (10.0, "moderate"))
"""The reading guide for ε: at most 1 strong, at most 10 moderate, beyond that weak."""

DP_REFERENCES = (
    "C. Dwork and A. Roth, The Algorithmic Foundations of Differential Privacy, Foundations "
    "and Trends in Theoretical Computer Science 9(3–4), 2014; J. P. Near, D. Darais, "
    "N. Lefkovitz and G. S. Howarth, Guidelines for Evaluating Differential Privacy "
    "Guarantees, NIST Special Publication 800-226, March 2025, doi:10.6028/NIST.SP.800-226."
)

_MODELS = (("final", "federated"), ("personalized", "personalised"),
           ("baselines/local", "local only"), ("baselines/pooled", "pooled"))
_RATE_LABELS = (("accuracy", "accuracy"),
                ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                ("ppv", "PPV (positive predictive value)"), ("npv", "NPV (negative predictive value)"),
                ("auc", "AUC, all test cases together"))


def clinical_section(summary: Mapping[str, Any], *, roc_figure: str = "") -> str:
    """The "Clinical reading" section: the overall table (every model, with intervals), the
    per-site comparison with a sentence per site, the global model's rates and confusion
    matrix per site, and the ROC figure (``roc_figure``: an ``<figure>`` element or ``""``).
    Without a ``clinical`` block (a deployment: the predictions stay at the sites) it says
    what is missing and shows what the sites reported."""
    clinical = _mapping(summary.get("clinical"))
    per_client = {str(k): _mapping(v) for k, v in _mapping(summary.get("per_client")).items()}
    out = ["<h2>Clinical reading</h2>"]
    if not clinical:
        out.append(
            '<p class="note">Prevalence, the majority-class reference, sensitivity, '
            "specificity, PPV, NPV, confusion matrices and ROC curves need each test case's "
            "prediction. They were not available to this process (in a deployment the test "
            "cases stay at the sites, which report only their metrics: "
            f"{_e(', '.join(_reported_metrics(per_client)) or 'none')}).</p>"
        )
        if any("local_accuracy" in v or "personalized_accuracy" in v for v in per_client.values()):
            out.append(_comparison_table(summary, clinical, per_client))
            out.append(_sentences_list(_site_sentences(summary, clinical, per_client)))
        return "\n".join(out)
    final = _mapping(clinical.get("final"))
    overall = _mapping(final.get("overall"))
    binary = clinical.get("positive_class") is not None
    pos, neg = _labels(clinical)
    if binary and overall:
        out.append(
            f'<p>Over all sites, {_e(_pct(overall.get("prevalence")))} of the '
            f"{_e(_count(overall.get('n')))} test cases are labelled {_e(pos)} (the prevalence). "
            f"A model that always predicts {_e(overall.get('majority_label'))}, without looking "
            f"at a case, is right for {_e(_num(overall.get('majority_accuracy')))} of them: the "
            "majority-class reference any accuracy should be read against. Sensitivity: the "
            f"share of cases labelled {_e(pos)} the model finds; specificity: the share of "
            f"{_e(neg)} it clears; PPV and NPV: how often a positive or a negative call is right "
            "(they depend on the prevalence, so they differ between sites).</p>"
        )
    out.append(_overall_table(clinical))
    out.append(_comparison_table(summary, clinical, per_client))
    out.append(_sentences_list(_site_sentences(summary, clinical, per_client)))
    sites = _mapping(final.get("sites"))
    if sites and binary:
        out.append(_site_rates_table(sites))
        out.append(_confusion_grid(overall, sites, pos=pos, neg=neg))
    elif overall and not sites:
        limit = clinical.get("site_limit")
        out.append(f'<p class="note">With more than {_e(limit)} sites the per-site intervals and '
                   "ROC curves are left out; each site's rates are in summary.json's "
                   "<code>per_client</code>.</p>")
    if roc_figure:
        out.append(roc_figure)
    confidence = _number(clinical.get("confidence")) or 0.95
    out.append(
        f'<p class="note">[low, high]: {confidence:.0%} confidence interval, '
        f"{_e(clinical.get('method') or 'bootstrap')} (Efron &amp; Tibshirani 1993); an "
        "interval is left out (—) where the rate is undefined in most resamples. AUC, all "
        "test cases together: one ROC curve over every site's test cases; the results table's "
        "AUC is each site's own AUC, averaged by test size. ROC curves, AUC and their intervals "
        "are for the federated model only (the baselines keep their confusion matrices, not "
        "their scores).</p>"
    )
    return "\n".join(out)


def brief_section(summary: Mapping[str, Any]) -> str:
    """"In brief": the federated model's accuracy against always predicting the majority
    class over all sites, its sensitivity and specificity, and the sites where it is below
    that reference; ``""`` without a ``clinical`` block."""
    clinical = _mapping(summary.get("clinical"))
    final = _mapping(clinical.get("final"))
    overall = _mapping(final.get("overall"))
    accuracy = _number(overall.get("accuracy"))
    majority = _number(overall.get("majority_accuracy"))
    if accuracy is None or majority is None:
        return ""
    label = _e(overall.get("majority_label"))
    items = [f"Federated model, all {_count(overall.get('n'))} test cases: accuracy "
             f"{_with_ci(overall, 'accuracy')}; always predicting {label}: {_num(majority)}."]
    if overall.get("sensitivity") is not None or overall.get("specificity") is not None:
        items.append(f"Sensitivity {_with_ci(overall, 'sensitivity')}, specificity "
                     f"{_with_ci(overall, 'specificity')}.")
    sites = _mapping(final.get("sites"))
    below = [(site, _mapping(e)) for site, e in sites.items()
             if (_number(_mapping(e).get("vs_majority")) or 0.0) < -1e-12]
    if sites:
        if below:
            names = ", ".join(
                f"<strong>{_e(site)}</strong> ({_num(_number(e.get('accuracy')))} against "
                f"{_num(_number(e.get('majority_accuracy')))}, always {_e(e.get('majority_label'))})"
                for site, e in below)
            advice = (" Read its sensitivity and specificity there before using it."
                      if overall.get("sensitivity") is not None else "")
            items.append(f"At {len(below)} of {len(sites)} sites the federated model is less "
                         f"accurate than always predicting the site's majority class: {names}."
                         + advice)
        else:
            items.append(f"At every one of the {len(sites)} sites the federated model is more "
                         "accurate than always predicting the site's majority class.")
    privacy = _mapping(summary.get("privacy"))
    epsilon = _number(privacy.get("epsilon"))
    mode = _privacy_mode(None, privacy)
    if epsilon is not None and mode != "none":
        unit = "one record at each site" if mode == "local" else "one site"
        items.append(f"Differential privacy ({_e(mode)}): protects {unit} at ε = "
                     f"{_num(epsilon, 2)}, {epsilon_reading(epsilon)} (below).")
    return "<h2>In brief</h2>\n<ul>\n" + "\n".join(f"<li>{i}</li>" for i in items) + "\n</ul>"


def majority_warning(summary: Mapping[str, Any]) -> str | None:
    """One plain-text line for the console when the federated model is less accurate than
    always predicting the majority class at some sites; ``None`` otherwise."""
    sites = _mapping(_mapping(_mapping(summary.get("clinical")).get("final")).get("sites"))
    below = [(str(site), _mapping(e)) for site, e in sites.items()
             if (_number(_mapping(e).get("vs_majority")) or 0.0) < -1e-12]
    if not below:
        return None
    names = ", ".join(f"{site} {_num(_number(e.get('accuracy')))} < "
                      f"{_num(_number(e.get('majority_accuracy')))}" for site, e in below)
    return (f"At {len(below)} of {len(sites)} sites the federated model is less accurate than "
            f"always predicting the site's majority class ({names}): see the clinical reading "
            "in report.html")


def site_sentence(
    site: str,
    *,
    federated: float | None,
    local: float | None = None,
    personalised: float | None = None,
    entry: Mapping[str, Any] | None = None,
    local_entry: Mapping[str, Any] | None = None,
    personal_entry: Mapping[str, Any] | None = None,
    positive: str = "class 1",
) -> str:
    """One plain sentence (HTML-escaped) on who gains at ``site``: the federated model's
    accuracy against always predicting the site's majority class (from ``entry``, the site's
    block of ``clinical.final.sites``), against the site's local-only model (and whether that
    model predicts one class for everyone, from ``local_entry``), and against its own
    personalised model, with whether the intervals overlap."""
    entry = entry or {}
    local_entry = local_entry or {}
    n = entry.get("n")
    lead = f"At <strong>{_e(site)}</strong>"
    if isinstance(n, int) and entry.get("prevalence") is not None:
        lead += f" ({_count(n)} test cases, {_pct(entry.get('prevalence'))} labelled {_e(positive)})"
    if federated is None:
        return f"{lead} the federated model was not evaluated."
    parts: list[str] = []
    majority = _number(entry.get("majority_accuracy"))
    label = _e(entry.get("majority_label", ""))
    if majority is not None:
        if federated < majority - 1e-12:
            clause = (f"the federated model ({_num(federated)}) is below always predicting "
                      f"{label} ({_num(majority)}): on accuracy alone it adds nothing here")
            found = _found(entry, positive)
            parts.append(clause + (f"; {found}" if found else ""))
        elif federated <= majority + 1e-12:
            parts.append(f"the federated model ({_num(federated)}) only equals always predicting "
                         f"{label} ({_num(majority)})")
        else:
            parts.append(f"the federated model ({_num(federated)}) is above always predicting "
                         f"{label} ({_num(majority)})")
    else:
        parts.append(f"the federated model scores {_num(federated)}")
    sentence = f"{lead} " + parts[0] + "."
    if local is not None:
        if abs(federated - local) <= 1e-12:
            comparison = f"Alone, the site reaches the same accuracy ({_num(local)})"
        elif federated > local:
            comparison = f"The site gains from the federation: alone it reaches {_num(local)}"
        else:
            comparison = f"The site does better alone ({_num(local)})"
        single = _single_class(local_entry)
        if single is not None:
            comparison += f", but its local-only model predicts {_e(single)} for every case"
        if _overlap(_ci(entry, "accuracy"), _ci(local_entry, "accuracy")) and abs(federated - local) > 1e-12:
            comparison += (f"; the 95 % intervals overlap, so {_count(n) if isinstance(n, int) else 'its'}"
                           " test cases cannot tell the two apart")
        sentence += f" {comparison}."
    if personalised is not None:
        verb = "above" if personalised > federated else "below" if personalised < federated else "equal to"
        sentence += f" Its personalised model scores {_num(personalised)}, {verb} the federated one"
        single = _single_class(personal_entry or {})
        sentence += f", and predicts {_e(single)} for every case." if single is not None else "."
    return sentence


def pooled_note(summary: Mapping[str, Any]) -> str:
    """The paragraph on why pooled training scores below the federated model, when it does
    (accuracy), with the intervals of both; ``""`` otherwise."""
    fed = _number(_mapping(summary.get("final")).get("accuracy"))
    pooled = _number(_mapping(_mapping(summary.get("baselines")).get("pooled")).get("accuracy"))
    if fed is None or pooled is None or pooled >= fed:
        return ""
    ci = _mapping(summary.get("ci"))
    fed_ci = _mapping(ci.get("final")).get("accuracy")
    pooled_ci = _mapping(_mapping(ci.get("baselines")).get("pooled")).get("accuracy")
    n = _mapping(_mapping(_mapping(summary.get("clinical")).get("final")).get("overall")).get("n")
    size = f" ({_count(n)} test cases in all)" if isinstance(n, int) else ""
    text = (
        f"<p><strong>Why pooled scores below federated here</strong> (accuracy {_num(pooled)} "
        f"against {_num(fed)}): pooling every site's data in one place is often called the upper "
        "reference, but it is not a ceiling. The pooled model is trained differently (one model "
        "on the union of the training sets, with its own number of steps and no averaging "
        f"across sites), and the test sets are small{size}"
    )
    if _is_pair(fed_ci) and _is_pair(pooled_ci):
        if _overlap(fed_ci, pooled_ci):
            text += (f"; the 95 % intervals overlap ({_interval(pooled_ci)} against "
                     f"{_interval(fed_ci)}), so the difference is within what chance alone gives")
        else:
            text += (f"; the 95 % intervals do not overlap ({_interval(pooled_ci)} against "
                     f"{_interval(fed_ci)}): look at how the two were trained before reading "
                     "this as a gain from federating")
    return text + ".</p>"


def protected_unit(mode: str) -> str:
    """What differential privacy protects in ``privacy.mode`` (plain text): a site for central
    and distributed DP (DP-FedAvg, McMahan et al. 2018), a record for local DP-SGD (Abadi et
    al. 2016); ``""`` for ``"none"`` or an unknown mode."""
    return {
        "central": (
            "one site: the released models change little whether or not any one hospital, "
            "with all of its patients, took part (site-level DP, DP-FedAvg, McMahan et al. "
            "2018). The server adds the noise, so this holds against anyone who sees the "
            "released models, not against the server itself."
        ),
        "distributed": (
            "one site, as with central DP, but each site adds its own share of the noise "
            "before secure aggregation, so the guarantee does not rest on trusting the server "
            "(distributed discrete Gaussian, Kairouz et al. 2021)."
        ),
        "local": (
            "one record (one patient) at each site: each site trains with DP-SGD (Abadi et al. "
            "2016) and its ε is its own. A site as a whole is not protected: what a hospital "
            "contributes in total can still show in its updates."
        ),
    }.get(mode, "")


def epsilon_reading(epsilon: float) -> str:
    """``"strong"`` (ε ≤ 1), ``"moderate"`` (ε ≤ 10) or ``"weak"`` (beyond)."""
    for bound, word in EPSILON_GUIDE:
        if epsilon <= bound:
            return word
    return "weak"


def privacy_section(summary: Mapping[str, Any], config: str | None) -> str:
    """The paragraph on what a DP run protects and at what ε, with the reading guide and its
    references; ``""`` for a run without differential privacy."""
    privacy = _mapping(summary.get("privacy"))
    epsilon = _number(privacy.get("epsilon"))
    mode = _privacy_mode(config, privacy)
    unit = protected_unit(mode)
    if epsilon is None or not unit:
        return ""
    delta = _number(privacy.get("delta"))
    at = f"ε = {_num(epsilon, 2)}" + (f", δ = {delta:.3g}" if delta is not None else "")
    if mode == "local":
        at += " (the largest of the sites')"
    reading = epsilon_reading(epsilon)
    text = (f"<h3>What differential privacy protects here</h3>\n<p>This run ({_e(mode)} DP) "
            f"protects {_e(unit)} At {_e(at)} the protection is <strong>{reading}</strong>.")
    sites = _mapping(privacy.get("site_epsilon"))
    if mode == "local" and sites:
        spent = ", ".join(f"{_e(s)} {_num(_number(v), 2)}" for s, v in sites.items()
                          if _number(v) is not None)
        text += f" ε per site: {spent}."
    text += (
        "</p>\n<p class=\"note\">Reading guide: ε ≤ 1 strong; 1 &lt; ε ≤ 10 moderate; beyond "
        "10 weak, the guarantee then says little. δ is the chance the guarantee fails and "
        "should be far below one over the number of people protected. A common rule of thumb, "
        f"not a standard; on reading ε and δ see {_e(DP_REFERENCES)}</p>"
    )
    return text


def _privacy_mode(config: str | None, privacy: Mapping[str, Any]) -> str:
    if config:
        try:
            mode = _mapping(tomllib.loads(config).get("privacy")).get("mode")
        except tomllib.TOMLDecodeError:
            mode = None
        if isinstance(mode, str):
            return mode
    mechanism = str(privacy.get("mechanism") or "")
    for key, mode in (("DP-SGD", "local"), ("distributed", "distributed"), ("DP-FedAvg", "central")):
        if key in mechanism:
            return mode
    return "none"


def _overall_table(clinical: Mapping[str, Any]) -> str:
    blocks = [(label, _mapping(_block(clinical, kind).get("overall"))) for kind, label in _MODELS]
    blocks = [(label, b) for label, b in blocks if b]
    if not blocks:
        return ""
    first = blocks[0][1]
    rows = [["test cases", *(_count(b.get("n")) for _, b in blocks)]]
    if first.get("prevalence") is not None:
        rows.append(["prevalence", *(_pct(b.get("prevalence")) for _, b in blocks)])
    rows.append([f"always predicting {first.get('majority_label')}",
                 *(_num(_number(b.get("majority_accuracy"))) for _, b in blocks)])
    for key, label in _RATE_LABELS:
        if any(b.get(key) is not None or key in _mapping(b.get("ci")) for _, b in blocks):
            rows.append([label, *(_with_ci(b, key) for _, b in blocks)])
    return "<h3>All sites together</h3>\n" + _table(("", *(label for label, _ in blocks)), rows)


def _comparison_table(
    summary: Mapping[str, Any], clinical: Mapping[str, Any], per_client: Mapping[str, Mapping[str, Any]]
) -> str:
    """Per site: test cases, prevalence, the majority reference, and the accuracy of the
    federated, personalised and local-only models (with intervals where known)."""
    sites = _mapping(_block(clinical, "final").get("sites"))
    personal = _mapping(_block(clinical, "personalized").get("sites"))
    local = _mapping(_block(clinical, "baselines/local").get("sites"))
    if len(per_client) > _SENTENCE_LIMIT:
        return (f'<p class="note">{len(per_client):,} sites: the per-site comparison is in the '
                "per-client table below and in summary.json's <code>per_client</code>.</p>")
    show_personal = any("personalized_accuracy" in v for v in per_client.values())
    show_local = any("local_accuracy" in v for v in per_client.values())
    binary = clinical.get("positive_class") is not None or not clinical
    head = ["site", "test cases", "prevalence", "always predicting the majority", "federated"]
    head += ["personalised"] * show_personal + ["local only"] * show_local
    rows: list[list[str]] = []
    for site, values in per_client.items():
        entry = _mapping(sites.get(site))
        majority = _number(entry.get("majority_accuracy", values.get("majority_accuracy")))
        label = entry.get("majority_label")
        row = [site, _count(entry.get("n")), _pct(entry.get("prevalence", values.get("prevalence"))),
               (_num(majority) + (f" ({label})" if label else "")) if majority is not None else "—",
               _acc(values.get("accuracy"), entry)]
        if show_personal:
            row.append(_acc(values.get("personalized_accuracy"), _mapping(personal.get(site))))
        if show_local:
            row.append(_acc(values.get("local_accuracy"), _mapping(local.get(site))))
        rows.append(row)
    if not rows:
        return ""
    if not binary:  # no single positive class: no prevalence
        head.pop(2)
        rows = [row[:2] + row[3:] for row in rows]
    return ("<h3>Per site: federated against training alone (accuracy)</h3>\n"
            f'<div class="scroll">{_table(head, rows)}</div>')


def _site_sentences(
    summary: Mapping[str, Any], clinical: Mapping[str, Any], per_client: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    sites = _mapping(_block(clinical, "final").get("sites"))
    local = _mapping(_block(clinical, "baselines/local").get("sites"))
    personal = _mapping(_block(clinical, "personalized").get("sites"))
    pos, _ = _labels(clinical)
    if len(per_client) > _SENTENCE_LIMIT:
        return []
    return [
        site_sentence(
            site, federated=_number(values.get("accuracy")),
            local=_number(values.get("local_accuracy")),
            personalised=_number(values.get("personalized_accuracy")),
            entry=_mapping(sites.get(site)), local_entry=_mapping(local.get(site)),
            personal_entry=_mapping(personal.get(site)), positive=pos,
        )
        for site, values in per_client.items()
    ]


_SENTENCE_LIMIT = 100
"""A sentence per site up to this many sites; beyond, the table and summary.json say it."""


def _sentences_list(sentences: Sequence[str]) -> str:
    if not sentences:
        return ""
    return ("<h3>Who gains, site by site</h3>\n<ul>\n"
            + "\n".join(f"<li>{s}</li>" for s in sentences) + "\n</ul>")


def _site_rates_table(sites: Mapping[str, Any]) -> str:
    head = ("site", "sensitivity", "specificity", "PPV", "NPV", "AUC")
    rows = [[site, *(_with_ci(_mapping(e), k) for k in ("sensitivity", "specificity", "ppv", "npv", "auc"))]
            for site, e in sites.items()]
    return ("<h3>The federated model at each site</h3>\n"
            f'<div class="scroll">{_table(head, rows)}</div>')


def _confusion_grid(
    overall: Mapping[str, Any], sites: Mapping[str, Any], *, pos: str, neg: str
) -> str:
    cells = [_confusion_table("all sites", overall, pos=pos, neg=neg)]
    cells += [_confusion_table(site, _mapping(e), pos=pos, neg=neg) for site, e in sites.items()]
    return ("<h3>Confusion matrices of the federated model</h3>\n"
            '<div class="figures">\n' + "\n".join(c for c in cells if c) + "\n</div>")


def _confusion_table(title: str, entry: Mapping[str, Any], *, pos: str, neg: str) -> str:
    c = entry.get("confusion")
    if not (isinstance(c, list) and len(c) == 2 and all(isinstance(r, list) and len(r) == 2 for r in c)):
        return ""
    (tn, fp), (fn, tp) = c
    return (
        f'<table class="confusion"><caption>{_e(title)}</caption>\n'
        f"<thead><tr><th></th><th>predicted {_e(pos)}</th><th>predicted {_e(neg)}</th></tr></thead>\n"
        f'<tbody><tr><th>{_e(pos)}</th><td class="num">{_e(tp)} (TP)</td>'
        f'<td class="num">{_e(fn)} (FN)</td></tr>\n'
        f'<tr><th>{_e(neg)}</th><td class="num">{_e(fp)} (FP)</td>'
        f'<td class="num">{_e(tn)} (TN)</td></tr></tbody></table>'
    )


def _found(entry: Mapping[str, Any], positive: str) -> str:
    """"it finds 26 of the 29 cases labelled disease and clears 1 of the 2 others"."""
    c = entry.get("confusion")
    if not (isinstance(c, list) and len(c) == 2):
        return ""
    (tn, fp), (fn, tp) = c
    return (f"it finds {tp} of the {tp + fn} cases labelled {_e(positive)} "
            f"(sensitivity {_num(_number(entry.get('sensitivity')), 2)}) and clears {tn} of the "
            f"{tn + fp} others (specificity {_num(_number(entry.get('specificity')), 2)})")


def _single_class(entry: Mapping[str, Any]) -> str | None:
    """The label a model predicts for every case of a site, if it predicts only one."""
    c = entry.get("confusion")
    if not isinstance(c, list) or not c:
        return None
    columns = [sum(row[j] for row in c) for j in range(len(c[0]))]
    used = [j for j, total in enumerate(columns) if total > 0]
    if len(used) != 1 or sum(columns) < 2:
        return None
    if used[0] == entry.get("majority_class"):
        return str(entry.get("majority_label"))
    return f"class {used[0]}"


def _labels(clinical: Mapping[str, Any]) -> tuple[str, str]:
    classes = clinical.get("classes")
    if isinstance(classes, list) and len(classes) == 2:
        return str(classes[1]), str(classes[0])
    return "class 1", "class 0"


def _reported_metrics(per_client: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names = {k for v in per_client.values() for k in v
             if not k.startswith(("global_", "local_", "personalized_"))}
    return sorted(names)


def _block(clinical: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    section, _, name = kind.partition("/")
    block = _mapping(clinical.get(section))
    return _mapping(block.get(name)) if name else block


def _with_ci(entry: Mapping[str, Any], key: str) -> str:
    value = _number(entry.get(key))
    if value is None:
        return "—"
    interval = _mapping(entry.get("ci")).get(key)
    return _num(value) + (f" {_interval(interval)}" if _is_pair(interval) else "")


def _acc(value: object, entry: Mapping[str, Any]) -> str:
    number = _number(value)
    if number is None:
        return "—"
    interval = _ci(entry, "accuracy")
    return _num(number) + (f" {_interval(interval)}" if interval is not None else "")


def _ci(entry: Mapping[str, Any], key: str) -> list[float] | None:
    interval: Any = _mapping(entry.get("ci")).get(key)
    return [float(interval[0]), float(interval[1])] if _is_pair(interval) else None


def _overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def _is_pair(value: object) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(_number(v) is not None for v in value))


def _interval(interval: Any) -> str:
    return f"[{float(interval[0]):.2f}, {float(interval[1]):.2f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "\n".join(
        "<tr>" + "".join(f'<td class="num">{_e(cell)}</td>' if i else f"<td>{_e(cell)}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: object) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.0%}"


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "—"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
