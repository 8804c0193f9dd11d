"""Tests for the validation split (``data.validation``): sizes, strata, seeds, isolation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import consortium
from consortium.config import DataConfig, ExperimentConfig
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.data.registry import load_dataset
from consortium.data.validation import validation_split
from consortium.errors import ConfigError, DataError


def _tagged(sizes: dict[str, tuple[int, int]], *, positives: float = 0.3) -> FederatedDataset:
    """Each row's single feature is its own id (train ids 0.., test ids 1000..), so rows can
    be traced through the split; labels: the first ``positives`` share of each split is 1."""
    clients = {}
    next_id = 0
    for cid, (n_train, n_test) in sizes.items():
        splits = []
        for n, base in ((n_train, 0), (n_test, 1000)):
            ids = torch.arange(next_id, next_id + n, dtype=torch.float32) + base
            y = (torch.arange(n) < round(positives * n)).to(torch.int64)
            splits.append(Split(ids[:, None], y))
        next_id += max(n_train, n_test)
        clients[cid] = ClientData(train=splits[0], test=splits[1])
    return FederatedDataset("tagged", clients, num_classes=2, input_shape=(1,))


def _ids(split: Split) -> set[int]:
    return {int(v) for v in split.x[:, 0].tolist()}


def test_sizes_follow_the_rounded_share_per_client() -> None:
    ds = _tagged({"a": (20, 5), "b": (7, 3), "c": (2, 1)})
    out = validation_split(ds, fraction=0.25, seed=0)
    # round(20·0.25) = 5; round(7·0.25) = round(1.75) = 2; round(2·0.25) = 1 (at least one)
    assert {c: (len(out.clients[c].train), len(out.clients[c].test)) for c in "abc"} == {
        "a": (15, 5), "b": (5, 2), "c": (1, 1),
    }
    assert out.notes["evaluated_on"] == "validation"


def test_validation_is_taken_from_training_rows_only() -> None:
    ds = _tagged({"a": (40, 10), "b": (13, 4)})
    out = validation_split(ds, fraction=0.3, seed=1)
    for cid in ds.clients:
        before, after = ds.clients[cid], out.clients[cid]
        train, val = _ids(after.train), _ids(after.test)
        assert not train & val  # disjoint
        assert train | val == _ids(before.train)  # every training row, once
        assert not (train | val) & _ids(before.test)  # no test row anywhere
        assert len(after.train) + len(after.test) == len(before.train)


def test_stratified_by_label() -> None:
    # 60 training rows, 18 positive (30 %): 15 held out hold round(15·0.3) = 4 or 5 positives
    ds = _tagged({"a": (60, 10)}, positives=0.3)
    for seed in range(5):
        val = validation_split(ds, fraction=0.25, seed=seed).clients["a"].test
        assert len(val) == 15 and int(val.y.sum()) in (4, 5)
    # exact when the quotas are whole numbers: 40 rows, 10 positive, hold 20 % → 2 of 8
    exact = _tagged({"a": (40, 4)}, positives=0.25)
    for seed in range(5):
        assert int(validation_split(exact, fraction=0.2, seed=seed).clients["a"].test.y.sum()) == 2


def test_deterministic_under_the_seed_and_different_across_seeds() -> None:
    ds = _tagged({"a": (50, 10), "b": (30, 10)})
    one = validation_split(ds, fraction=0.2, seed=3)
    again = validation_split(ds, fraction=0.2, seed=3)
    other = validation_split(ds, fraction=0.2, seed=4)
    for cid in ds.clients:
        assert torch.equal(one.clients[cid].test.x, again.clients[cid].test.x)
        assert torch.equal(one.clients[cid].train.x, again.clients[cid].train.x)
    assert any(
        not torch.equal(one.clients[c].test.x, other.clients[c].test.x) for c in ds.clients
    )


def test_off_returns_the_data_set_itself_and_leaves_the_default_path() -> None:
    ds = _tagged({"a": (10, 3)})
    assert validation_split(ds, fraction=0.0, seed=0) is ds
    plain, off = load_dataset(DataConfig(), seed=0), load_dataset(DataConfig(validation=0), seed=0)
    for cid in plain.clients:
        for part in ("train", "test"):
            a, b = getattr(plain.clients[cid], part), getattr(off.clients[cid], part)
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert "evaluated_on" not in plain.notes


def test_heart_disease_split_keeps_the_test_split_out() -> None:
    plain = load_dataset(DataConfig(), seed=2)
    tuned = load_dataset(DataConfig(validation=0.2), seed=2)
    assert tuned.client_ids == plain.client_ids
    for cid in plain.clients:
        before, after = plain.clients[cid], tuned.clients[cid]
        n = len(before.train)
        assert len(after.test) == int(np.floor(n * 0.2 + 0.5))
        assert len(after.train) + len(after.test) == n
        # the rows are the training rows (as multisets): sort both row-wise and compare
        rows = torch.cat([after.train.x, after.test.x])
        labels = torch.cat([after.train.y, after.test.y])
        assert _sorted_rows(rows, labels) == _sorted_rows(before.train.x, before.train.y)
        # validation labels in the training split's proportion (within one row)
        share = float(before.train.y.float().mean())
        assert abs(int(after.test.y.sum()) - share * len(after.test)) <= 1


def _sorted_rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in torch.cat([x, y[:, None].float()], 1).tolist())


def test_server_test_set_is_dropped() -> None:
    cfg = DataConfig(dataset="digits", partition="iid", clients=3, server_test_fraction=0.2)
    assert load_dataset(cfg, seed=0).server_test is not None
    tuned = load_dataset(dataclasses.replace(cfg, validation=0.1), seed=0)
    assert tuned.server_test is None


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_fraction_outside_the_range_is_refused(fraction: float) -> None:
    with pytest.raises(DataError, match=r"data.validation.*\[0, 1\)"):
        validation_split(_tagged({"a": (10, 3)}), fraction=fraction, seed=0)
    with pytest.raises(ConfigError, match="data.validation"):
        ExperimentConfig.from_dict({"data": {"validation": fraction}})


def test_a_client_with_one_training_row_is_named() -> None:
    ds = _tagged({"big": (10, 3), "tiny": (1, 1)})
    with pytest.raises(DataError, match=r"client 'tiny'.*1 training row.*data.validation = 0"):
        validation_split(ds, fraction=0.2, seed=0)


def test_a_run_reports_that_it_was_evaluated_on_validation() -> None:
    torch.set_num_threads(1)
    base = {"rounds": 1, "evaluation": {"baselines": ["local"]}}
    tuned = consortium.simulate({**base, "data": {"validation": 0.2}})
    assert tuned.summary["evaluated_on"] == "validation"
    plain = consortium.simulate(base)
    assert "evaluated_on" not in plain.summary
    # each site's accuracy is a count over its validation rows (cleveland: 45, not the 76 of
    # its test split)
    sizes = {c: len(d.test) for c, d in load_dataset(DataConfig(validation=0.2), seed=0).clients.items()}
    assert sizes["cleveland"] == 45
    for cid, entry in tuned.summary["per_client"].items():
        for kind in ("global", "local"):
            hits = entry[f"{kind}_accuracy"] * sizes[cid]
            assert abs(hits - round(hits)) < 1e-9


def test_a_given_data_set_is_not_silently_evaluated_on_test() -> None:
    ds = load_dataset(DataConfig(), seed=0)
    with pytest.raises(ConfigError, match="validation_split"):
        consortium.simulate({"rounds": 1, "data": {"validation": 0.2}}, dataset=ds)
