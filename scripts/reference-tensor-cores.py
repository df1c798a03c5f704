"""The answers crates/loren-kernels/emu/harness.cpp's tensor_core_sums_case expects of the
emulator's tensor-core sums (emu/common.cuh, emu_tc_dot), from a model of them written apart, in
exact rationals.

One fused dot-add, as MMA-Sim (Xie, Wang, Yang & Yang, 2025) measured NVIDIA's bf16 multipliers to
add: the accumulator c and each product a*b are terms, a product's exponent being the sum of its
factors' (its significand up to 4); every bf16 or f32 exponent is at least -126. Every term is cut
toward zero `bits` fractional bits below the largest exponent among them, the terms are added
exactly, and the sum is cut toward zero to f32. The A100 (sm_80) adds an m16n8k16 as two such
blocks of 8 products, keeping 24 bits; the H100 (sm_90) all 16 at once, keeping 25. `exact` rounds
the whole sum once to the nearest f32, ties to even, as the emulator's default does.

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


def toward_zero_f32(s):
    if s == 0:
        return Fraction(0)
    q = TWO ** (exponent(s) - 23)
    return math.trunc(s / q) * q


def nearest_f32(s):
    if s == 0:
        return Fraction(0)
    q = TWO ** (exponent(s) - 23)
    n = math.floor(s / q)
    rest = s / q - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2):
        n += 1
    return n * q


def fused(c, pairs, bits):
    terms = [(Fraction(c), exponent(c))] if c != 0 else []
    terms += [(Fraction(a) * b, exponent(a) + exponent(b)) for a, b in pairs if a != 0 and b != 0]
    if not terms:
        return Fraction(c)
    unit = TWO ** (max(e for _, e in terms) - bits)
    return toward_zero_f32(sum(math.trunc(v / unit) * unit for v, _ in terms))


def ampere(c, pairs):
    return fused(fused(c, pairs[:8], 24), pairs[8:], 24)


def hopper(c, pairs):
    return fused(c, pairs, 25)


def exact(c, pairs):
    return nearest_f32(Fraction(c) + sum(Fraction(a) * b for a, b in pairs))


t, s = Fraction(3, 2) * TWO**-13, TWO**-12
none = [(0, 0)] * 15
SUMS = {
    "products under the last bit": (1, [(t, s)] * 16),
    "negative products under the last bit": (1, [(-t, s)] * 16),
    "a product of significand past 2": (0, [(Fraction(3, 2), Fraction(3, 2))] + [(s, s)] * 15),
    "a carry past 2": (1 - TWO**-24, [(1 - TWO**-8, 1)] + none),
    "a subnormal accumulator": (TWO**-130, [(TWO**-60, TWO**-66)] + none),
}

for name, (c, pairs) in SUMS.items():
    got = [float(f(c, pairs)).hex() for f in (exact, ampere, hopper)]
    print(f"{name:38s} exact {got[0]:24s} ampere {got[1]:24s} hopper {got[2]}")
