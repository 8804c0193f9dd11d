"""Triage notes: a synthetic text-classification federation (``data.dataset = "triage"``).

Four sites (an emergency department, a rural clinic, a children's hospital and a telehealth
line) write short free-text triage notes; the label is the urgency: 0 routine, 1 urgent,
2 emergency. The notes are generated here, deterministically from the run seed, from
templates in this module: each site has its own phrasing (openers, abbreviations, who is
speaking), its own patients (age words) and its own label mix, and every note draws its
complaint from a shared list per urgency, plus a distractor (history, allergies) that carries
no signal, and a small share of labels flipped (5 %) as in real triage. A site sees only a
part of the complaints in its few notes, so a federation that pools what the sites learn
beats each site alone. The data are ours, written for consortium and licensed as the
package is (Apache-2.0); they describe no real patient.

The features are the notes tokenised at load with the model's own tokenizer (the packaged
all-MiniLM-L6-v2's, or the one in ``data.path``, a local Hugging Face model directory):
float32 ``[n, 2, 32]``, token ids in row 0 and the attention mask in row 1
(:func:`consortium.models.peft.encode_texts`); the raw notes are kept in ``notes``.
Needs the ``peft`` extra (``pip install 'consortium[peft]'``).

A deployed site reads its notes from its own CSV (``consortium client --data notes.csv`` in an
experiment with ``data.dataset = "triage"``): a ``note`` column (free text), an ``urgency``
column (``routine`` / ``urgent`` / ``emergency``, or 0 / 1 / 2) and optionally a ``split``
column (``train`` / ``test``; without it the first ``test_fraction`` of the rows are the test
split, as in simulation). The site tokenises the notes itself (:func:`read_site_notes`); only
their shape and counts leave it. :func:`write_site_notes` writes a site's generated notes in
that form (``python -m consortium.data.triage SITE OUT.csv``), the same notes, split and order
as the simulation's, so a deployment can be compared with ``consortium run``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch

from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.errors import DataError

__all__ = ["LENGTH", "SITES", "load_triage", "read_site_notes", "site_notes", "triage_notes",
           "write_site_notes"]

LENGTH = 32
"""Tokens per note (padded or truncated)."""

CLASSES = ("routine", "urgent", "emergency")

_COMPLAINTS = (
    (  # routine
        "needs a prescription refill", "mild seasonal allergies", "follow up for blood pressure",
        "small rash on forearm for a week", "requests a vaccination", "mild back ache after "
        "gardening", "dry cough for two weeks without fever", "ingrown toenail", "asks about "
        "diet advice", "wants results of routine blood test", "earwax blockage",
        "minor sunburn", "sleep trouble for a month", "wart on finger",
    ),
    (  # urgent
        "fever of 39 for two days", "deep cut on hand that needs stitches", "vomiting since "
        "last night", "painful urination and flank pain", "ankle swollen after a fall, can "
        "walk", "ear pain with fever", "asthma worse, inhaler helps", "migraine not "
        "responding to usual medicine", "abdominal pain for six hours", "dog bite on the calf",
        "burn blister on palm", "possible broken wrist", "dehydrated after diarrhoea",
        "eye red and painful",
    ),
    (  # emergency
        "crushing chest pain spreading to left arm", "sudden weakness of one side and "
        "slurred speech", "not breathing properly, lips blue", "unresponsive after a fall",
        "severe bleeding that will not stop", "throat swelling after bee sting",
        "seizure lasting five minutes", "overdose of pills", "high fever and stiff neck "
        "with purple rash", "vomiting blood", "severe head injury, confused", "gunshot wound",
        "sudden worst headache of life", "pregnant and heavy bleeding",
    ),
)

_DISTRACTORS = (
    "history of hypertension", "no known allergies", "allergic to penicillin", "lives alone",
    "takes metformin", "non smoker", "came by car", "has a cold too", "history of asthma",
    "first visit", "vaccinations up to date", "on blood thinners",
)

SITES: dict[str, dict[str, object]] = {
    "emergency-dept": {
        "openers": ("ED triage:", "pt", "walk-in pt", "EMS brought pt,"),
        "who": ("54M", "33F", "71M", "68F", "45M"),
        "mix": (0.15, 0.35, 0.50),
        "share": 0.45,
    },
    "rural-clinic": {
        "openers": ("Patient", "Farmer", "Patient from the valley", "Walk-in patient"),
        "who": ("aged 60", "aged 38", "aged 77", "aged 52"),
        "mix": (0.55, 0.35, 0.10),
        "share": 0.45,
    },
    "childrens-hospital": {
        "openers": ("Mother reports child", "Father says kid", "Child", "Parent reports toddler"),
        "who": ("age 4", "age 9", "age 2", "age 12"),
        "mix": (0.35, 0.45, 0.20),
        "share": 0.45,
    },
    "telehealth": {
        "openers": ("Caller reports", "Caller says", "Chat message:", "Video call, patient"),
        "who": ("in their 30s", "elderly", "in their 50s", "young adult"),
        "mix": (0.50, 0.30, 0.20),
        "share": 0.45,
    },
}


def triage_notes(site: str, n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """``n`` notes of ``site`` and their urgency labels (0 routine, 1 urgent, 2 emergency).

    The site sees a fixed part (``share``) of each class's complaints, drawn once per site.
    """
    spec = SITES[site]
    mix = np.asarray(spec["mix"], dtype=float)
    share = float(spec["share"])  # type: ignore[arg-type]
    seen = [rng.choice(len(c), size=max(2, round(share * len(c))), replace=False)
            for c in _COMPLAINTS]
    labels = rng.choice(3, size=n, p=mix / mix.sum())
    openers: tuple[str, ...] = spec["openers"]  # type: ignore[assignment]
    who: tuple[str, ...] = spec["who"]  # type: ignore[assignment]
    notes = []
    for y in labels:
        complaint = _COMPLAINTS[y][int(rng.choice(seen[y]))]
        parts = [openers[rng.integers(len(openers))], who[rng.integers(len(who))], complaint]
        if rng.random() < 0.7:
            parts.append(_DISTRACTORS[rng.integers(len(_DISTRACTORS))])
        notes.append(" ".join(parts[:2]) + ", " + ", ".join(parts[2:]))
    flip = rng.random(n) < 0.05
    labels = np.where(flip, rng.integers(0, 3, size=n), labels)
    return notes, labels.astype(np.int64)


def load_triage(
    *, seed: int, samples_per_client: int = 0, test_fraction: float = 0.25, tokenizer: str = "",
) -> FederatedDataset:
    """The four triage sites, tokenised (see the module docstring).

    Args:
        seed: notes and splits are a function of it.
        samples_per_client: notes per site (0: 120).
        test_fraction: each site's share of notes kept for its test split.
        tokenizer: a local Hugging Face model directory whose tokenizer to use ("": the
            packaged all-MiniLM-L6-v2's).

    Raises:
        DataError: too few notes for a train and a test split.
        MissingExtraError: the ``peft`` extra is not installed.
    """
    from consortium.models.peft import encode_texts, load_tokenizer

    n = samples_per_client or 120
    n_test = _test_rows(n, test_fraction)
    tok = load_tokenizer(tokenizer)
    clients: dict[str, ClientData] = {}
    notes: dict[str, str] = {}
    for site in SITES:
        texts, labels = site_notes(site, seed=seed, samples_per_client=n)
        x = encode_texts(texts, tok, length=LENGTH)
        y = torch.from_numpy(labels)
        clients[site] = ClientData(train=Split(x[n_test:], y[n_test:]),
                                   test=Split(x[:n_test], y[:n_test]))
        notes[site] = texts[0]
    return FederatedDataset(
        name="triage", clients=clients, num_classes=3, input_shape=(2, LENGTH),
        citation="synthetic triage notes generated by consortium (consortium.data.triage), "
        "Apache-2.0",
        notes={f"example:{site}": text for site, text in notes.items()},
    )


def _test_rows(n: int, test_fraction: float) -> int:
    n_test = round(n * test_fraction)
    if n_test < 1 or n - n_test < 1:
        raise DataError(f"triage needs at least one training and one test note per site; "
                        f"{n} notes with test_fraction = {test_fraction} leaves none for one "
                        "of them (data.samples_per_client, data.test_fraction)")
    return n_test


def site_notes(site: str, *, seed: int, samples_per_client: int = 0) -> tuple[list[str], np.ndarray]:
    """The notes and labels of ``site`` exactly as :func:`load_triage` generates them for the
    run seed ``seed`` (the first ``round(n * test_fraction)`` are its test split)."""
    if site not in SITES:
        raise DataError(f"unknown triage site {site!r}; expected one of {', '.join(SITES)}")
    rng = np.random.default_rng([seed, 7, list(SITES).index(site)])
    return triage_notes(site, samples_per_client or 120, rng)


def write_site_notes(path: str | Path, site: str, *, seed: int, samples_per_client: int = 0,
                     test_fraction: float = 0.25) -> Path:
    """Write ``site``'s generated notes as the CSV a deployed site reads (columns ``note``,
    ``urgency``, ``split``; see the module docstring): the simulation's notes, split and
    order for the same ``seed``, ``samples_per_client`` and ``test_fraction``."""
    texts, labels = site_notes(site, seed=seed, samples_per_client=samples_per_client)
    n_test = _test_rows(len(texts), test_fraction)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["note", "urgency", "split"])
        out.writerows([text, CLASSES[int(y)], "test" if i < n_test else "train"]
                      for i, (text, y) in enumerate(zip(texts, labels)))
    return path


def read_site_notes(path: str | Path, *, site: str, tokenizer: str = "",
                    test_fraction: float = 0.25) -> FederatedDataset:
    """One deployed site's notes from its CSV (see the module docstring), tokenised here with
    the base's own tokenizer (``tokenizer``: a local Hugging Face model directory, "" = the
    packaged all-MiniLM-L6-v2's): a one-client :class:`FederatedDataset` shaped as
    :func:`load_triage`'s.

    Raises:
        DataError: the file is not a CSV with ``note`` and ``urgency`` columns, holds an
            unknown urgency or split, or leaves no training or no test note.
    """
    from consortium.models.peft import encode_texts, load_tokenizer

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read the site's notes {str(path)!r}: {exc}") from exc
    missing = [c for c in ("note", "urgency") if not rows or c not in rows[0]]
    if missing:
        raise DataError(f"{str(path)!r} has no {missing[0]!r} column (or no rows); a triage "
                        "site's CSV needs columns note (text) and urgency (routine, urgent, "
                        "emergency or 0, 1, 2), and optionally split (train, test)")
    codes = {name: i for i, name in enumerate(CLASSES)} | {str(i): i for i in range(len(CLASSES))}
    labels = [codes.get(str(r["urgency"]).strip().lower(), -1) for r in rows]
    if -1 in labels:
        bad = rows[labels.index(-1)]["urgency"]
        raise DataError(f"{str(path)!r}: urgency {bad!r} (row {labels.index(-1) + 2}) is not "
                        f"one of {', '.join(CLASSES)} (or 0, 1, 2)")
    if "split" in rows[0]:
        splits = [str(r["split"]).strip().lower() for r in rows]
        odd = [v for v in splits if v not in ("train", "test")]
        if odd:
            raise DataError(f"{str(path)!r}: split {odd[0]!r} is neither train nor test")
        test = np.array([v == "test" for v in splits])
    else:
        test = np.arange(len(rows)) < _test_rows(len(rows), test_fraction)
    if test.all() or not test.any():
        raise DataError(f"{str(path)!r} needs at least one training and one test note")
    x = encode_texts([str(r["note"]) for r in rows], load_tokenizer(tokenizer), length=LENGTH)
    y = torch.tensor(labels, dtype=torch.long)
    mask = torch.from_numpy(test)
    data = ClientData(train=Split(x[~mask], y[~mask]), test=Split(x[mask], y[mask]))
    return FederatedDataset(name="triage", clients={site: data}, num_classes=len(CLASSES),
                            input_shape=(2, LENGTH), citation="the site's own triage notes")


if __name__ == "__main__":  # python -m consortium.data.triage SITE OUT.csv [SEED [NOTES]]
    if len(sys.argv) not in (3, 4, 5):
        sys.exit("usage: python -m consortium.data.triage SITE OUT.csv [SEED [NOTES]]; sites: "
                 + ", ".join(SITES))
    print(write_site_notes(sys.argv[2], sys.argv[1], seed=int(sys.argv[3]) if len(sys.argv) > 3
                           else 0, samples_per_client=int(sys.argv[4]) if len(sys.argv) > 4 else 0))
