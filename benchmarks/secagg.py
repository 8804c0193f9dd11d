"""SecAgg+ cost: client and server time and bytes per client, for n clients and d parameters.

Drives consortium's SecAgg+ state machines (src/consortium/secagg/protocol.py) phase by
phase in one process and times the client calls and the server calls separately. Neighbours
k = 2·⌈log2 n⌉ (SecAgg+, Bell et al. 2020), threshold t = ⌈k/2⌉, 10 % of clients drop after
sending their masked input (so the server also reconstructs and removes masks of dropped
clients' pairs), 32-bit masks.

Bytes per client count what a client sends: two 32-byte public keys, its share ciphertexts,
its masked vector (4 bytes a coordinate on the wire) and its revealed shares.

Not here yet (issue 5): the Flower SecAgg+ column. The in-process simulation holds every
masked vector at once, so cells with n·d·8 bytes above --max-gb are skipped and say so.

Run:  python benchmarks/secagg.py [--n 100,500,1000] [--d 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from consortium.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer  # noqa: E402


def run_cell(n: int, d: int, *, drop: float = 0.1, seed: int = 0) -> dict:
    k = min(n - 1, 2 * math.ceil(math.log2(n)))
    t = math.ceil(k / 2)
    config = SecAggConfig(num_clients_expected=n, threshold=t, neighbours=k, round=1,
                          context=b"bench")
    g = torch.Generator().manual_seed(seed)
    inputs = {f"c{i:04d}": torch.randint(0, 2**16, (d,), generator=g) for i in range(n)}
    ids = sorted(inputs)
    drops = set(ids[: int(drop * n)])
    server = SecAggServer(config=config, graph_seed=b"bench-graph")
    clients = {cid: SecAggClient(cid, config=config) for cid in ids}
    client_s = server_s = 0.0
    sent = dict.fromkeys(ids, 0)

    def timed_client(fn, *args):  # type: ignore[no-untyped-def]
        nonlocal client_s
        start = time.perf_counter()
        out = fn(*args)
        client_s += time.perf_counter() - start
        return out

    def timed_server(fn, *args):  # type: ignore[no-untyped-def]
        nonlocal server_s
        start = time.perf_counter()
        out = fn(*args)
        server_s += time.perf_counter() - start
        return out

    adverts = [timed_client(clients[c].advertise_keys) for c in ids]
    for a in adverts:
        sent[a.client_id] += len(a.c_public) + len(a.s_public)
    broadcasts = timed_server(server.collect_keys, adverts)
    shares = [timed_client(clients[c].share_keys, broadcasts[c]) for c in ids]
    for s in shares:
        sent[s.sender] += sum(len(ct) for ct in s.ciphertexts.values())
    routed = timed_server(server.route_shares, shares)
    masked = [timed_client(clients[c].masked_input, routed[c], inputs[c]) for c in ids]
    for m in masked:
        sent[m.client_id] += 4 * d
    request = timed_server(server.collect_masked, masked)
    answering = [c for c in request.survivors if c not in drops]
    responses = [timed_client(clients[c].unmask, request) for c in answering]
    for r in responses:
        sent[r.client_id] += 70 * (len(r.b_shares) + len(r.s_shares))
    # the 10 % who drop after their masked input never answer; their self masks are
    # reconstructed from their neighbours' b shares inside finish()
    result = timed_server(server.finish, responses)
    expected = sum(inputs[c] for c in result.contributors) % 2**32
    assert torch.equal(result.sum, expected), "unmasked sum differs from the plain sum"
    return {
        "n": n, "d": d, "neighbours": k, "threshold": t, "dropped_after_masked": len(drops),
        "client_s_per_client": client_s / n, "server_s": server_s,
        "kib_sent_per_client": sum(sent.values()) / n / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="100,500,1000")
    parser.add_argument("--d", default="10000,100000,1000000")
    parser.add_argument("--max-gb", type=float, default=6.0,
                        help="skip cells whose masked vectors would exceed this (int64, in process)")
    parser.add_argument("--out", default=str(HERE / "out" / "secagg.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'n':>5} {'d':>9} {'k':>3} {'t':>3}  {'client s/client':>15} {'server s':>9} {'KiB sent/client':>15}")
    for n in (int(v) for v in args.n.split(",")):
        for d in (int(v) for v in args.d.split(",")):
            need_gb = 2 * n * d * 8 / 1e9  # inputs and masked vectors, int64
            if need_gb > args.max_gb:
                print(f"{n:>5} {d:>9}  skipped: the in-process simulation needs ~{need_gb:.0f} GB")
                rows.append({"n": n, "d": d, "skipped": f"needs ~{need_gb:.0f} GB in process"})
                continue
            r = run_cell(n, d)
            rows.append(r)
            print(f"{n:>5} {d:>9} {r['neighbours']:>3} {r['threshold']:>3}  "
                  f"{r['client_s_per_client']:>15.4f} {r['server_s']:>9.2f} {r['kib_sent_per_client']:>15.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
