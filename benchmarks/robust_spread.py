"""How much of the honest clients' spread is persistent (heterogeneity) vs round-to-round noise.

Runs the clean digits robustness experiment with centered clipping, records every round's
updates as they reach the rule, and prints the spread of the updates around the round's mean,
the spread of their worker momenta (β = 0.5, 0.9) and the correlation of each client's
deviation between consecutive rounds (RESULTS.md, "Worker momentum for centered clipping").

Run:  PYTHONPATH=src python benchmarks/robust_spread.py
"""
import torch

from consortium.aggregation.robust import _clipping
from consortium.config import load_config
from consortium.simulation import simulate

rounds: list[dict[str, torch.Tensor]] = []
orig = _clipping.CenteredClipping.aggregate

def spy(self, updates, *, ctx, state):
    rounds.append({u.client_id: u.delta.clone().double() for u in updates})
    return orig(self, updates, ctx=ctx, state=state)

_clipping.CenteredClipping.aggregate = spy
cfg = load_config("examples/robustness_digits.toml", ['aggregation.rule="centered-clipping"'])
simulate(cfg, progress=False, report=False)
ids = sorted(rounds[0])
X = torch.stack([torch.stack([r[i] for i in ids]) for r in rounds])  # [T, n, d]
E = X - X.mean(dim=1, keepdim=True)  # deviations from the round's mean
print("mean ‖Δ̄‖ per round (1, 10, 20, 30):", [round(float(X[t].mean(0).norm()), 4) for t in (0, 9, 19, 29)])
print("mean spread ‖Δᵢ − Δ̄‖ (1, 10, 20, 30):", [round(float(E[t].norm(dim=1).mean()), 4) for t in (0, 9, 19, 29)])
for beta in (0.5, 0.9):
    m = X[0].clone()
    for t in range(1, X.shape[0]):
        m = beta * m + (1 - beta) * X[t]
    em = m - m.mean(0)
    print(f"β={beta}: spread of momenta at round 30 {float(em.norm(dim=1).mean()):.4f} (raw {float(E[-1].norm(dim=1).mean()):.4f})")
c = [float((E[t] * E[t + 1]).sum() / (E[t].norm() * E[t + 1].norm())) for t in range(X.shape[0] - 1)]
print("correlation of client deviations between consecutive rounds (1→2, 10→11, 29→30):", [round(c[i], 3) for i in (0, 9, 28)])
for beta in (0.5, 0.9):
    m = X[0].clone()
    ratios = []
    for t in range(1, X.shape[0]):
        m = beta * m + (1 - beta) * X[t]
        ratios.append((float(m.mean(0).norm()), float((m - m.mean(0)).norm(dim=1).mean()),
                       float(X[t].mean(0).norm()), float(E[t].norm(dim=1).mean())))
    for t in (9, 19, 28):
        a, b, c, d = ratios[t]
        print(f"β={beta} round {t + 2}: ‖m̄‖/spread {a / b:.3f} (‖m̄‖ {a:.4f}, spread {b:.4f}); raw ‖Δ̄‖/spread {c / d:.3f}")
