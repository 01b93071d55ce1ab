"""Reference epsilons from Google's dp-accounting PLD accountant, for the PLD tests.

Run from this directory (the output is committed as reference_pld.csv):

    python3 -m venv /tmp/dpenv && /tmp/dpenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpenv/bin/python reference_pld.py > reference_pld.csv 2>/dev/null

Each row: sampling rate q, noise multiplier z, rounds T, delta, epsilon from PLDAccountant with
its defaults (add-or-remove-one, value discretisation interval 1e-4), composing T
Poisson-sampled Gaussian events. Mixed schedules compose two phases; their q, z, T columns are
joined with '+'.
"""

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant


def epsilon(phases, delta):
    acc = pld_privacy_accountant.PLDAccountant()
    for q, z, t in phases:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, t))
    return acc.get_epsilon(delta)


print("q,z,rounds,delta,epsilon")
for q in [0.01, 0.1, 0.3, 1.0]:
    for z in [0.8, 1.5, 3.0]:
        for t in [1, 10, 100]:
            for delta in [1e-5]:
                print(f"{q},{z},{t},{delta},{float(epsilon([(q, z, t)], delta))!r}")
for phases in [[(0.3, 1.5, 20), (0.1, 3.0, 30)], [(0.01, 1.1, 50), (1.0, 5.0, 5)]]:
    cols = ["+".join(str(p[i]) for p in phases) for i in range(3)]
    print(",".join(cols) + f",1e-05,{float(epsilon(phases, 1e-5))!r}")
