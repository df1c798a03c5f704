"""The answers crates/loren-kernels/emu/harness.cpp's tensor_core_sums_case expects of the
emulator's tensor-core sums (emu/common.cuh, emu_tc_dot), from a model of them written apart, in
exact rationals.

One fused dot-add, as MMA-Sim (Xie, Wang, Yang & Yang, 2025) measured NVIDIA's bf16 multipliers to
add: the accumulator c and each product a*b are terms, a product's exponent being the sum of its
factors' (its significand up to 4); every bf16 or f32 exponent is at least -126. Every term is cut
toward zero `bits` fractional bits below the largest exponent among them, the terms are added
exactly, and the sum is cut toward zero to f32. The A100 (sm_80) adds an m16n8k16 as two such
blocks of 8 products, keeping 24 bits; the H100 (sm_90) all 16 at once, keeping 25. `exact` rounds
the whole sum once to the nearest f32, ties to even (the emulator's default sums in double, in
order, which is the same on these sums). A sum past f32's largest finite value is an infinity; a
zero out of the fused adds is +0, as MMA-Sim gives it, and out of the exact sum as IEEE adds
zeros (-0 only when every term is -0).

    python3 scripts/reference-tensor-cores.py
"""

import math
from fractions import Fraction

TWO = Fraction(2)


def exponent(x):
    x = abs(Fraction(x))
    e = math.floor(math.log2(x))
    while TWO**e > x:
        e -= 1
    while TWO ** (e + 1) <= x:
        e += 1
    return max(e, -126)


def finite_f32(s):
    return s if abs(s) < TWO**128 else math.copysign(math.inf, s)


def toward_zero_f32(s):
    if s == 0:
        return Fraction(0)
    q = TWO ** (exponent(s) - 23)
    return finite_f32(math.trunc(s / q) * q)


def nearest_f32(s):
    q = TWO ** (exponent(s) - 23)
    n = math.floor(s / q)
    rest = s / q - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2):
        n += 1
    return finite_f32(n * q)


def fused(c, pairs, bits):
    terms = [(Fraction(c), exponent(c))] if c != 0 else []
    terms += [(Fraction(a) * Fraction(b), exponent(a) + exponent(b)) for a, b in pairs if a != 0 and b != 0]
    if not terms:
        return Fraction(0)
    unit = TWO ** (max(e for _, e in terms) - bits)
    return toward_zero_f32(sum(math.trunc(v / unit) * unit for v, _ in terms))


def ampere(c, pairs):
    c = fused(c, pairs[:8], 24)
    return c if math.isinf(c) else fused(c, pairs[8:], 24)


def hopper(c, pairs):
    return fused(c, pairs, 25)


def exact(c, pairs):
    s = Fraction(c) + sum(Fraction(a) * Fraction(b) for a, b in pairs)
    if s != 0:
        return nearest_f32(s)
    signs = [math.copysign(1, c)] + [math.copysign(1, a) * math.copysign(1, b) for a, b in pairs]
    return -0.0 if all(x < 0 for x in signs) else 0.0


def hexf(x):
    return float(x).hex()


t, s, big = 1.5 * 2.0**-13, 2.0**-12, float.fromhex("0x1.fffffep127")
none = [(0.0, 0.0)] * 15
SUMS = {
    "products under the last bit": (1.0, [(t, s)] * 16),
    "negative products under the last bit": (1.0, [(-t, s)] * 16),
    "a product of significand past 2": (0.0, [(1.5, 1.5)] + [(s, s)] * 15),
    "a carry past 2": (1 - 2.0**-24, [(1 - 2.0**-8, 1.0)] + none),
    "a subnormal accumulator": (2.0**-130, [(2.0**-60, 2.0**-66)] + none),
    "a subnormal accumulator, tiny products": (2.0**-130, [(1.5 * 2.0**-76, 2.0**-75)] * 16),
    "a sum past the largest f32": (-big, [(-(2.0**127), 1.0)] + none),
    "zeros of sign -": (-0.0, [(-0.0, 1.0)] * 16),
}

for name, (c, pairs) in SUMS.items():
    got = [hexf(f(c, pairs)) for f in (exact, ampere, hopper)]
    print(f"{name:40s} exact {got[0]:24s} ampere {got[1]:24s} hopper {got[2]}")
