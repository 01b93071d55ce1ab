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
(about ±0.01 HR@10).
"""

import csv
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
    hits, ndcg = 0.0, 0.0
    for user, item, _ in test:
        rng = np.random.RandomState(user)
        negatives = set()
        while len(negatives) < 99:
            j = int(rng.randint(n_items))
            if j not in seen[user] and j != item:
                negatives.add(j)
        s = score(user, np.array([item] + sorted(negatives)))
        rank = int(np.sum(s[1:] >= s[0]))
        if rank < 10:
            hits += 1
            ndcg += 1 / np.log2(rank + 2)
    return hits / len(test), ndcg / len(test)


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
                m = sp.csr_matrix((1 + alpha * values, (rows, cols)), shape=(len(users), n_items))
                model = AlternatingLeastSquares(
                    factors=factors, regularization=reg, iterations=15, random_state=1,
                    calculate_training_loss=False,
                )
                model.fit(m, show_progress=False)
                uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
                hr, nd = evaluate(lambda u, items: itf[items] @ uf[u], test, seen, n_items)
                print(f"als factors {factors} alpha {alpha} reg {reg}: HR@10 {hr:.4f} NDCG@10 {nd:.4f}")
                if best is None or hr > best[0]:
                    best = (hr, nd, factors, alpha, reg)
    print("best ALS: HR@10 {:.4f} NDCG@10 {:.4f} (factors {}, alpha {}, reg {})".format(*best))


if __name__ == "__main__":
    main(sys.argv[1])
