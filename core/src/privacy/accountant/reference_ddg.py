"""Independent reference for accountant/ddg.rs: Zhu & Wang (ICML 2019) Theorem 6 applied to the
Gaussian-limit RDP a/(2 z^2) (the DDG bound when tau vanishes), composed and converted as
dp-accounting does. Prints the figures the Rust tests compare with.

    python3 core/src/privacy/accountant/reference_ddg.py
"""
from math import comb, exp, log, log1p


def zhu_wang(q, a, eps):
    terms = [(a - 1) * log1p(-q) + log(a * q - q + 1),
             log(comb(a, 2)) + 2 * log(q) + (a - 2) * log1p(-q) + eps(2)]
    for l in range(3, a + 1):
        terms.append(log(3) + log(comb(a, l)) + (a - l) * log1p(-q) + l * log(q) + (l - 1) * eps(l))
    m = max(terms)
    return (m + log(sum(exp(t - m) for t in terms))) / (a - 1)


def epsilon(orders, rdp, delta):
    return min(r + log1p(-1 / a) - log(delta * a) / (a - 1) for a, r in zip(orders, rdp))


orders = list(range(2, 129)) + [256]
for q, z, rounds in [(0.1, 1.0, 100), (0.3, 1.0, 50), (0.05, 0.8, 300)]:
    eps = lambda a: a / (2 * z * z)
    rdp = [rounds * min(zhu_wang(q, a, eps), eps(a)) for a in orders]
    print(f"q={q} z={z} rounds={rounds}: epsilon {epsilon(orders, rdp, 1e-5):.6f}")
