"""Reference epsilons from Google's dp-accounting library, for the accountant's tests.

Run from this directory (the output is committed as reference.csv):

    python3 -m venv /tmp/dpenv && /tmp/dpenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpenv/bin/python reference.py > reference.csv 2>/dev/null

Each row: sampling rate q, noise multiplier z, rounds T, delta, epsilon, optimal order, from
RdpAccountant with its default orders composing T Poisson-sampled Gaussian events.
Mixed schedules compose two phases; their q, z, T columns are joined with '+'.
"""

import dp_accounting


def epsilon(phases, delta):
    acc = dp_accounting.rdp.RdpAccountant()
    for q, z, t in phases:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, t))
    return acc.get_epsilon_and_optimal_order(delta)


print("q,z,rounds,delta,epsilon,order")
for q in [0.001, 0.01, 0.05, 0.2, 0.5, 1.0]:
    for z in [0.5, 0.8, 1.0, 1.5, 2.5, 5.0]:
        for t in [1, 10, 100, 1000, 10000]:
            for delta in [1e-5]:
                eps, order = epsilon([(q, z, t)], delta)
                print(f"{q},{z},{t},{delta},{float(eps)!r},{float(order)!r}")
for phases, delta in [
    ([(0.01, 1.1, 1000), (0.05, 2.0, 200)], 1e-5),
    ([(0.5, 0.7, 10), (0.001, 0.9, 5000)], 1e-6),
    ([(1.0, 3.0, 50), (0.02, 1.3, 300)], 1e-5),
]:
    eps, order = epsilon(phases, delta)
    cols = ["+".join(str(p[k]) for p in phases) for k in range(3)]
    print(f"{cols[0]},{cols[1]},{cols[2]},{delta},{float(eps)!r},{float(order)!r}")
