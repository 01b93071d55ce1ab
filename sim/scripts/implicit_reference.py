#!/usr/bin/env python3
"""Reference ranking figures from the `implicit` library on fedretail's own split.

    pip install implicit==0.7.2 scipy numpy
    cargo run --release -p fedretail-sim -- export-split --split-dir out/split-ml
    python3 sim/scripts/implicit_reference.py out/split-ml
    cargo run --release -p fedretail-sim -- export-split --scenario retail-recommend --split-dir out/split-cj
    python3 sim/scripts/implicit_reference.py out/split-cj

Protocol (as fedretail's evaluation): each test user's held-out item is ranked against 99 items
the user never interacted with (train or test), sampled with a seed fixed per user; a negative
that ties with the target counts against it. The grid is scored on the test items themselves,
which flatters the library: a conservative comparison for fedretail. Negatives are drawn by
numpy, not by fedretail's generator, so figures differ from fedretail's by sampling noise
(about ±0.01 HR@10). With the split's `stores.csv`, the best configuration is also trained on
each store alone, and the script counts the stores where the pooled model's HR@10 is higher,
equal and lower (the issue's per-store target).
"""

import csv
import os
import sys

import numpy as np
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares


def read(path, with_value):
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append((int(r["user"]), int(r["item"]), float(r["value"]) if with_value else 1.0))
    return rows


def evaluate(score, test, seen, n_items):
    hits = per_user_hits(score, test, seen, n_items)
    return float(np.mean([h for h, _ in hits.values()])), float(np.mean([n for _, n in hits.values()]))


def per_user_hits(score, test, seen, n_items):
    """Each test user's (hit, NDCG) at 10."""
    out = {}
    for user, item, _ in test:
        rng = np.random.RandomState(user)
        negatives = set()
        while len(negatives) < 99:
            j = int(rng.randint(n_items))
            if j not in seen[user] and j != item:
                negatives.add(j)
        s = score(user, np.array([item] + sorted(negatives)))
        rank = int(np.sum(s[1:] >= s[0]))
        out[user] = (1.0, 1 / np.log2(rank + 2)) if rank < 10 else (0.0, 0.0)
    return out


def fit(factors, alpha, reg, rows, cols, values, n_users, n_items):
    m = sp.csr_matrix((1 + alpha * values, (rows, cols)), shape=(n_users, n_items))
    model = AlternatingLeastSquares(
        factors=factors, regularization=reg, iterations=15, random_state=1,
        calculate_training_loss=False,
    )
    model.fit(m, show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)


def per_store(split, config, pooled_factors, uid, rows, cols, values, test, seen, n_items):
    """Pooled ALS (its fitted `pooled_factors`) against ALS on each store alone, with the same
    hyper-parameters: in how many stores (with a test user) the pooled model's HR@10 is
    strictly higher, equal, lower."""
    store_of = {}
    with open(f"{split}/stores.csv", newline="") as f:
        for r in csv.DictReader(f):
            if int(r["user"]) in uid:
                store_of[uid[int(r["user"])]] = r["store"]
    factors, alpha, reg = config
    uf, itf = pooled_factors
    pooled = per_user_hits(lambda u, items: itf[items] @ uf[u], test, seen, n_items)
    local = {}
    for store in sorted(set(store_of.values())):
        keep = np.array([store_of[u] == store for u in rows])
        if not keep.any():
            continue
        suf, sitf = fit(factors, alpha, reg, rows[keep], cols[keep], values[keep], len(uid), n_items)
        mine = [t for t in test if store_of[t[0]] == store]
        local.update(per_user_hits(lambda u, items: sitf[items] @ suf[u], mine, seen, n_items))
    wins = ties = losses = 0
    for store in sorted(set(store_of.values())):
        users = [t[0] for t in test if store_of[t[0]] == store]
        if not users:
            continue
        p = np.mean([pooled[u][0] for u in users])
        l = np.mean([local[u][0] if u in local else 0.0 for u in users])
        wins, ties, losses = wins + (p > l), ties + (p == l), losses + (p < l)
    hr_local = np.mean([local.get(t[0], (0.0, 0.0))[0] for t in test])
    print(
        f"per store (factors {factors}, alpha {alpha}, reg {reg}): pooled HR@10 "
        f"{np.mean([h for h, _ in pooled.values()]):.4f}, each store alone {hr_local:.4f}; "
        f"pooled higher in {wins} of {wins + ties + losses} stores, equal in {ties}, lower in {losses}"
    )


def main(split):
    train = read(f"{split}/train.csv", True)
    test = read(f"{split}/test.csv", False)
    users = sorted({u for u, _, _ in train} | {u for u, _, _ in test})
    uid = {u: k for k, u in enumerate(users)}
    n_items = 1 + max(i for _, i, _ in train + test)
    seen = {}
    for u, i, _ in train + test:
        seen.setdefault(uid[u], set()).add(i)
    test = [(uid[u], i, v) for u, i, v in test]
    rows = np.array([uid[u] for u, _, _ in train])
    cols = np.array([i for _, i, _ in train])
    values = np.array([v for _, _, v in train], dtype=np.float32)

    counts = np.bincount(cols, minlength=n_items).astype(np.float64)
    hr, nd = evaluate(lambda u, items: counts[items], test, seen, n_items)
    print(f"popularity: HR@10 {hr:.4f} NDCG@10 {nd:.4f}")

    best = None
    for factors in (32, 64):
        for alpha in (1.0, 5.0, 20.0):
            for reg in (1.0, 10.0, 40.0):
                uf, itf = fit(factors, alpha, reg, rows, cols, values, len(users), n_items)
                hr, nd = evaluate(lambda u, items: itf[items] @ uf[u], test, seen, n_items)
                print(f"als factors {factors} alpha {alpha} reg {reg}: HR@10 {hr:.4f} NDCG@10 {nd:.4f}")
                if best is None or hr > best[0]:
                    best = (hr, nd, factors, alpha, reg)
                    best_factors = (uf, itf)
    print("best ALS: HR@10 {:.4f} NDCG@10 {:.4f} (factors {}, alpha {}, reg {})".format(*best))
    if os.path.exists(f"{split}/stores.csv"):
        per_store(split, best[2:], best_factors, uid, rows, cols, values, test, seen, n_items)


if __name__ == "__main__":
    main(sys.argv[1])
