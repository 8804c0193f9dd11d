"""The round loop with an executor that aborts a round."""

from __future__ import annotations

import torch


def test_an_executor_that_aborts_a_round_leaves_the_model_and_the_run_goes_on() -> None:
    """A deployment's round short of results (RemoteExecutor raises RoundAborted from fit):
    the round is recorded as aborted with the failures, the model stays, the next round runs."""
    import consortium
    from consortium.errors import RoundAborted
    from consortium.executors import SequentialExecutor
    from consortium.messages import Result

    class ShortRound(SequentialExecutor):
        def fit(self, tasks, clients):  # type: ignore[no-untyped-def]
            if tasks and tasks[0].round == 2:
                yield Result(2, tasks[0].client_id, None, error="no result before the deadline")
                raise RoundAborted("1 of 3 sites sent an update; a round needs at least 2")
            yield from super().fit(tasks, clients)

    cfg = {"rounds": 3, "evaluation": {"baselines": []}}
    history: list[dict] = []
    params: list[torch.Tensor] = []

    class Watch:
        def on_round_end(self, record, state):  # type: ignore[no-untyped-def]
            history.append(record)
            params.append(state.params.vector.clone())

    consortium.simulate(cfg, executor=ShortRound(), callbacks=[Watch()], report=False)
    assert "needs at least 2" in history[1]["aborted"]
    assert history[1]["clients"] == 0 and "deadline" in next(iter(history[1]["failed"].values()))
    assert torch.equal(params[0], params[1]) and not torch.equal(params[1], params[2])
