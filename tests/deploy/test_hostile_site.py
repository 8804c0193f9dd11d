"""One malicious site against the server (issue 13, first slice): what it sends is refused with
the reason, and nothing it sends ends the run.

Covered here: an evaluation task answered with a training result, a weight above the site's
declared size (the one-round model takeover), evaluation counts and metrics out of range, a
Describe whose sizes cannot be real, and an error while aggregating a round (contained in that
round). Memory limits, SecAgg bounds, logs and the audit head are the issue's later slices.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.deploy.codec import (
    EvaluationEnvelope,
    ResultEnvelope,
    decode_upload,
    encode_upload,
)
from consortium.deploy.hub import Hub, SiteInfo
from consortium.deploy.server import _implausible
from consortium.deploy.validate import ExpectedTask
from consortium.messages import EvaluationResult, Result
from consortium.types import Update


def _task(hub: Hub, kind: str, task_id: str = "t1"):
    session = hub.register("a")
    hub.describe(session, SiteInfo((3,), 2, 90, 30))  # 90 training, 30 test examples
    future = hub.expect("a", 1, task_id, kind, ExpectedTask(site="a", round=1, task_id=task_id))
    return session, future


def _wire(item):
    return decode_upload(encode_upload(item))


def test_an_evaluation_task_answered_with_a_training_result_is_rejected(hub: Hub) -> None:
    session, future = _task(hub, "evaluate")
    upload = _wire(ResultEnvelope("t1", Result(1, "a", Update("a", torch.zeros(3), 10.0))))
    accepted, why = hub.deliver(session, upload)
    assert not accepted and "training result for an evaluation task" in why
    assert future.result(timeout=1) is None  # the evaluation goes on without this site


@pytest.mark.parametrize(("weight", "accepted"), [(90.0, True), (91.0, False), (1e9, False)])
def test_a_weight_above_the_declared_training_examples_is_rejected(
    hub: Hub, weight: float, accepted: bool,
) -> None:
    """The review's takeover: weight 1e9 from a site that declared 90 rows replaced the model."""
    session, future = _task(hub, "train")
    upload = _wire(ResultEnvelope("t1", Result(1, "a", Update("a", torch.ones(3), weight))))
    ok, why = hub.deliver(session, upload)
    assert ok is accepted, why
    if not accepted:
        assert "weight" in why and future.result(timeout=1).update is None


@pytest.mark.parametrize(("examples", "metrics", "reason"), [
    (10**18, {"accuracy": 0.9}, "examples exceed"),
    (31, {"accuracy": 0.9}, "examples exceed"),
    (30, {"accuracy": float("inf")}, "NaN or infinite"),
    (30, {"accuracy": 1.5}, "outside [0, 1]"),
    (30, {"loss": -2.0}, "negative"),
])
def test_an_evaluation_out_of_range_is_rejected(hub: Hub, examples: int, metrics: dict,
                                                reason: str) -> None:
    """The review: a site claiming 10**18 test examples set the federated accuracy to 0.99999."""
    session, future = _task(hub, "evaluate")
    upload = _wire(EvaluationEnvelope("t1", EvaluationResult(1, "a", examples, metrics)))
    accepted, why = hub.deliver(session, upload)
    assert not accepted and reason in why
    assert future.result(timeout=1) is None


def test_a_plausible_evaluation_is_accepted(hub: Hub) -> None:
    session, future = _task(hub, "evaluate")
    upload = _wire(EvaluationEnvelope("t1", EvaluationResult(1, "a", 30, {"accuracy": 0.8})))
    assert hub.deliver(session, upload) == (True, "")
    assert future.result(timeout=1).num_examples == 30


@pytest.mark.parametrize(("info", "reason"), [
    (SiteInfo((3,), 2, 2**64 - 1, 5), "examples"),
    (SiteInfo((1 << 16, 1 << 16), 2, 10, 5), "2**31 values"),
    (SiteInfo((3,), 1 << 21, 10, 5), "classes"),
    (SiteInfo((1,) * 9, 2, 10, 5), "dimensions"),
])
def test_a_description_that_cannot_be_real_is_refused(info: SiteInfo, reason: str) -> None:
    """The review: `num_train = 2**64 - 1` crashed the server at round start."""
    assert reason in (_implausible(info) or "")
    assert _implausible(SiteInfo((13,), 2, 90, 30)) is None


def test_an_error_while_aggregating_ends_the_round_not_the_run() -> None:
    """An executor whose clients are other institutions (``round_errors``) turns an error in
    a round's aggregation or server step into an aborted round: the model stays and the run
    goes on (in a plain simulation the same error still stops the run, naming the problem)."""
    import consortium
    from consortium.aggregation.mean import weighted_mean
    from consortium.executors.sequential import SequentialExecutor

    class Exploding:
        name = "exploding"
        calls = 0

        def init(self, layout):
            return {}

        def step(self, params, delta, state):
            Exploding.calls += 1
            if Exploding.calls == 2:
                raise OverflowError("math range error (a site's extreme value)")
            return params + delta, state

    class Institutions(SequentialExecutor):
        round_errors = (Exception,)

    cfg = {"rounds": 3, "evaluation": {"baselines": []}}
    run = consortium.simulate(cfg, pipeline=consortium.pipeline(weighted_mean(), Exploding()),
                              executor=Institutions())
    assert [("aborted" in r) for r in run.history] == [False, True, False]
    assert "round 2" in run.history[1]["aborted"] and "OverflowError" in run.history[1]["aborted"]
    Exploding.calls = 0
    with pytest.raises(OverflowError):
        consortium.simulate(cfg, pipeline=consortium.pipeline(weighted_mean(), Exploding()),
                            executor=SequentialExecutor())


@pytest.mark.parametrize("name", ["-rf", ".hidden", "..", "_x"])
def test_a_site_name_that_could_be_an_option_or_a_hidden_file_is_refused(tmp_path, name) -> None:
    from consortium.deploy.provision import provision
    from consortium.errors import ConfigError

    with pytest.raises(ConfigError, match="starting with a letter or digit"):
        provision(["north", name], tmp_path / "c")


def test_the_server_requires_the_token_with_the_certificate(tmp_path) -> None:
    """A stolen key alone is not enough: the server asks for the site's token too."""
    from consortium.deploy.provision import (
        AuthenticationError,
        authenticate,
        load_registry,
        load_site_credentials,
        provision,
    )

    provision(["north"], tmp_path / "c")
    registry = load_registry(tmp_path / "c" / "server")
    creds = load_site_credentials(tmp_path / "c" / "sites" / "north", "north")
    with pytest.raises(AuthenticationError, match="no token"):
        authenticate(registry, peer_cert_pem=creds.cert_pem, token=None, require_token=True)
    assert authenticate(registry, peer_cert_pem=creds.cert_pem, token=creds.token,
                        require_token=True) == "north"


def test_a_site_whose_data_disagree_is_named() -> None:
    from consortium.config import ExperimentConfig
    from consortium.deploy.server import _placeholder_dataset
    from consortium.errors import ConfigError

    sites = {"a": SiteInfo((13,), 2, 90, 30), "b": SiteInfo((13,), 2, 50, 10),
             "odd": SiteInfo((12,), 2, 40, 10)}
    with pytest.raises(ConfigError, match=r"site\(s\) \['odd'\] differ"):
        _placeholder_dataset(ExperimentConfig(), sites)


def test_over_selection_with_central_or_distributed_dp_is_refused(tmp_path) -> None:
    """Cutting the slowest sites biases DP-FedAvg's fixed denominator: refused before the
    server listens."""
    from consortium.deploy.server import serve
    from consortium.errors import ConfigError

    exp = tmp_path / "exp.toml"
    exp.write_text('[privacy]\nmode = "central"\nnoise_multiplier = 1.0\n')
    with pytest.raises(ConfigError, match="over-select"):
        serve(exp, listen="127.0.0.1:0", certs=None, out=tmp_path / "run", min_sites=1,
              over_select=0.3)
