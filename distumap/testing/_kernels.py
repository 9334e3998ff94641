"""Compiled kernels of the synthetic model: counter-based random numbers, Poisson draws and
cell names.

Cell ``i``'s draws come from a generator keyed by ``(seed, i)`` and gene ``j``'s from a counter
``j + 1`` on that key, so any block of cells or genes is drawn alone and agrees bit for bit
with the whole matrix.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# splitmix64 constants (Steele, Lea and Flood 2014); the increment is 2**64 / golden ratio
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53

# Poisson means below this are drawn as products of uniforms (lam + 1 cheap steps); above, by PTRS
_PRODUCT_LIMIT = 30.0


@numba.njit(inline="always")
def _mix64(z):
    # splitmix64's finaliser: a bijection of uint64 with good avalanche
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _unit(z):
    return np.float64(z >> np.uint64(11)) * _TO_UNIT


_LOG2E = 1.4426950408889634
# Taylor coefficients of 2**r = exp(r ln 2) up to r**10: relative error < 1e-12 for |r| <= 1/2
_EXP2_COEFFICIENTS = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(11))
_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10 = _EXP2_COEFFICIENTS


@numba.njit(inline="always")
def _exp2_fraction(r):
    # plain multiply-adds in a fixed order: the same bits on every machine and vector width
    tail = _E7 + r * (_E8 + r * (_E9 + r * _E10))
    return _E0 + r * (_E1 + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * tail))))))


@numba.njit(inline="always")
def _cell_key(seed_key, cell):
    return _mix64(seed_key + np.uint64(cell + 1) * _GAMMA)


@numba.njit(cache=True, nogil=True)
def cell_draws(start, stop, seed_key, weyl_offset, cumulative, subclass_scale):
    n = stop - start
    population = np.empty(n, dtype=np.int32)
    scale = np.empty(n, dtype=np.float64)
    n_sub = cumulative.size - 1
    sigma = 0.4  # log-normal spread of library size within a subclass
    for row in range(n):
        cell = start + row
        # golden-ratio (Weyl) sequence: subclass shares are near exact in every prefix of cells
        position = _unit(weyl_offset + np.uint64(cell) * _GAMMA)
        sub = np.searchsorted(cumulative, position, side="right") - 1
        population[row] = min(max(sub, 0), n_sub - 1)
        key = _cell_key(seed_key, cell)
        # the cell's own draws sit at negative counters, apart from the genes' (1, 2, ...)
        u1 = 1.0 - _unit(_mix64(key - _GAMMA))
        u2 = _unit(_mix64(key - np.uint64(2) * _GAMMA))
        normal = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
        scale[row] = subclass_scale[population[row]] * math.exp(sigma * normal - 0.5 * sigma**2)
    return population, scale


@numba.njit(inline="always")
def _poisson_ptrs(lam, state):
    # Hörmann's transformed rejection with squeeze (PTRS), valid for lam >= 10
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        state += _GAMMA
        u = _unit(_mix64(state)) - 0.5
        state += _GAMMA
        v = _unit(_mix64(state))
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= v_r:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return k


@numba.njit(cache=True, nogil=True)
def fill_counts(out, start, seed_key, population, scale, means):
    # Two passes per row. The first is branch-free so that LLVM vectorises it: a uniform per gene
    # and P(0) = exp(-lam) by our own polynomial (numba cannot vectorise math.exp without SVML);
    # it settles the ~85% of entries that are zero. The second finishes the others.
    n_rows, n_genes = out.shape
    uniform = np.empty(n_genes, dtype=np.float64)
    p_zero = np.empty(n_genes, dtype=np.float64)
    exponent_bits = np.empty(n_genes, dtype=np.int64)
    power_of_two = exponent_bits.view(np.float64)
    for row in range(n_rows):
        key = _cell_key(seed_key, start + row)
        mean_row = means[population[row]]
        s = scale[row]
        for gene in range(n_genes):
            # exp(-lam) = 2**t with t = -lam * log2(e) = n + r, |r| <= 1/2
            t = -min(mean_row[gene] * s, 700.0) * _LOG2E
            n = math.floor(t + 0.5)
            p_zero[gene] = _exp2_fraction(t - n)
            exponent_bits[gene] = (np.int64(n) + 1023) << 52
            uniform[gene] = _unit(_mix64(key + np.uint64(gene + 1) * _GAMMA))
        for gene in range(n_genes):
            p_zero[gene] *= power_of_two[gene]
            out[row, gene] = uniform[gene] >= p_zero[gene]
        for gene in range(n_genes):
            if out[row, gene] == 0:
                continue
            lam = mean_row[gene] * s
            state = _mix64(key + np.uint64(gene + 1) * _GAMMA)
            if lam < _PRODUCT_LIMIT:
                # Knuth's product of uniforms, continuing from the uniform that the first pass
                # compared with P(0): k is the number of factors before the product drops below
                # exp(-lam). No divisions, and the next uniform does not wait for the product.
                threshold = p_zero[gene]
                product = uniform[gene]
                k = 0
                while product >= threshold:
                    k += 1
                    state += _GAMMA
                    product *= _unit(_mix64(state))
                out[row, gene] = k
            else:
                out[row, gene] = _poisson_ptrs(lam, state)


_BARCODE = 16
NAME_WIDTH = _BARCODE + len("-LKTX_0000")


@numba.njit(cache=True, nogil=True)
def name_bytes(start, stop, seed_key):
    # "<16-base barcode>-LKTX_<library>": the barcode is a bijection of the cell index (below
    # 2**32), so names are unique; 10,000 cells per library, like a 10x run
    out = np.empty((stop - start, NAME_WIDTH), dtype=np.uint8)
    bases = np.array([65, 67, 71, 84], dtype=np.uint8)  # A C G T
    suffix = np.array([45, 76, 75, 84, 88, 95], dtype=np.uint8)  # -LKTX_
    low32 = np.uint64(0xFFFFFFFF)
    salt = seed_key & low32
    for row in range(stop - start):
        cell = start + row
        h = (np.uint64(cell) & low32) ^ salt
        # a bijective 32-bit mixer (xor-shifts and odd multipliers mod 2**32 are invertible)
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x7FEB352D)) & low32
        h ^= h >> np.uint64(15)
        h = (h * np.uint64(0x846CA68B)) & low32
        h ^= h >> np.uint64(16)
        for j in range(_BARCODE):
            out[row, j] = bases[(h >> np.uint64(2 * j)) & np.uint64(3)]
        out[row, _BARCODE : _BARCODE + 6] = suffix
        library = cell // 10_000 + 1
        for j in range(4):
            out[row, NAME_WIDTH - 1 - j] = 48 + library % 10
            library //= 10
    return out


@numba.njit(cache=True, nogil=True)
def fill_gene_range(out, gene_start, seed_key, population, scale, means):
    # fill_counts for genes gene_start:gene_start + out.shape[1] of cells 0:out.shape[0]: the
    # same draws in the same order for each (cell, gene), so the counts agree bit for bit
    n_rows, n_genes = out.shape
    uniform = np.empty(n_genes, dtype=np.float64)
    p_zero = np.empty(n_genes, dtype=np.float64)
    exponent_bits = np.empty(n_genes, dtype=np.int64)
    power_of_two = exponent_bits.view(np.float64)
    for row in range(n_rows):
        key = _cell_key(seed_key, row)
        mean_row = means[population[row]]
        s = scale[row]
        for gene in range(n_genes):
            t = -min(mean_row[gene_start + gene] * s, 700.0) * _LOG2E
            n = math.floor(t + 0.5)
            p_zero[gene] = _exp2_fraction(t - n)
            exponent_bits[gene] = (np.int64(n) + 1023) << 52
            uniform[gene] = _unit(_mix64(key + np.uint64(gene_start + gene + 1) * _GAMMA))
        for gene in range(n_genes):
            p_zero[gene] *= power_of_two[gene]
            out[row, gene] = uniform[gene] >= p_zero[gene]
        for gene in range(n_genes):
            if out[row, gene] == 0:
                continue
            lam = mean_row[gene_start + gene] * s
            state = _mix64(key + np.uint64(gene_start + gene + 1) * _GAMMA)
            if lam < _PRODUCT_LIMIT:
                threshold = p_zero[gene]
                product = uniform[gene]
                k = 0
                while product >= threshold:
                    k += 1
                    state += _GAMMA
                    product *= _unit(_mix64(state))
                out[row, gene] = k
            else:
                out[row, gene] = _poisson_ptrs(lam, state)
