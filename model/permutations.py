"""The fixed permutation set of the Jigsaw baseline (Noroozi & Favaro 2016, section 3.3 and Algorithm 1).

The network classifies which of K permutations shuffled the patches, so the K classes should be far apart:
two permutations that differ in only two slots are nearly the same puzzle. Noroozi & Favaro pick the set
greedily by Hamming distance (the number of slots in which two permutations differ).
"""

import functools
import itertools
import math

import numpy as np
import torch

# 9! candidates x 9 slots as uint8 is 3.3 MB and the match table below 29 MB; 10 patches would need 36 MB and
# 363 MB, and 16 (a 4x4 grid) cannot be enumerated at all. Grids of 2x2 (4) and 3x3 (9) fit.
MAX_PATCHES = 9


def greedy_selection(k: int, num_patches: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The greedy max-min Hamming selection, uncached: (perms (k, n) int64, claimed (k-1,) int64).

    claimed[i] is the minimum Hamming distance from row i+1 to rows 0..i, the value the greedy step maximised;
    the set's minimum pairwise distance is claimed.min() (= claimed[-1]: the greedy maximum never grows).
    See max_hamming_permutations for the rule; callers other than tests want that cached wrapper.
    """
    n = num_patches
    _check(k, n, seed)
    candidates = np.array(list(itertools.permutations(range(n))), dtype=np.uint8)  # (n!, n), lexicographic
    # match[slot, value] = which candidates hold `value` in `slot`: the distance to a permutation p is then
    # n - sum_slot match[slot, p[slot]], nine adds of uint8 rows (~1 ms) instead of an (n!, n) compare.
    # Contiguous rows: the comparison's result would follow candidates.T's strides (5x slower, measured).
    match = np.ascontiguousarray(candidates.T[:, None, :] == np.arange(n, dtype=np.uint8)[None, :, None])  # (n, n, n!)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(candidates)))]
    min_dist = np.full(len(candidates), n, dtype=np.uint8)  # to the chosen set; 0 marks a chosen row
    sum_dist = np.zeros(len(candidates), dtype=np.int32)  # Algorithm 1's criterion, our tie-break
    agree = np.empty(len(candidates), dtype=np.uint8)
    claimed = []
    for _ in range(k - 1):
        p = candidates[chosen[-1]]
        np.copyto(agree, match[0, p[0]])
        for slot in range(1, n):
            agree += match[slot, p[slot]]
        dist = n - agree  # (n!,) uint8
        np.minimum(min_dist, dist, out=min_dist)
        sum_dist += dist
        best = min_dist.max()
        ties = np.flatnonzero(min_dist == best)
        ties = ties[sum_dist[ties] == sum_dist[ties].max()]
        chosen.append(int(ties[rng.integers(len(ties))]))
        claimed.append(int(best))
    return candidates[chosen].astype(np.int64), np.array(claimed, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _cached(k: int, num_patches: int, seed: int) -> np.ndarray:
    perms = greedy_selection(k, num_patches, seed)[0]
    perms.flags.writeable = False  # shared by every caller: see the copy in max_hamming_permutations
    return perms


def max_hamming_permutations(k: int, num_patches: int = 9, seed: int = 0) -> torch.Tensor:
    """(k, num_patches) int64: k distinct permutations of range(num_patches), far apart in Hamming distance.

    How they are chosen (Noroozi & Favaro's greedy procedure, Algorithm 1): start from one permutation drawn at
    random, then repeatedly add the candidate of all num_patches! permutations that is farthest from the set
    chosen so far. "Farthest" here is, in order: the largest minimum Hamming distance to the chosen rows (the
    set's minimum distance is what keeps two classes from being nearly the same puzzle), then the largest
    summed distance (Algorithm 1's own criterion, 1^T D: the published rule and its public re-implementation
    maximise only the sum), then a draw from numpy's default_rng(seed). Rows are in selection order.

    Measured for k=1000, 9 patches (seeds 0-4): minimum pairwise Hamming distance 5, mean 8.008 (of at most 9).
    Maximising the sum alone gives the same mean, 8.008, but a minimum of 2 (seed 0): some classes then differ
    by one swapped pair. k=100: minimum 6. Selection time for k=1000: ~1.1 s on one CPU core
    (a running min and sum over the 362,880 candidates, updated once per added row).

    Deterministic for (k, num_patches, seed) given numpy's Generator stream; cached per process, each call
    returns a fresh copy (callers may modify it). A model should keep the table it trained with (e.g. in a
    persistent buffer, as JigsawClassifier does) rather than trust a rerun years later to reproduce it.
    """
    _check(k, num_patches, seed)
    return torch.from_numpy(_cached(int(k), int(num_patches), int(seed)).copy())


def _check(k: int, num_patches: int, seed: int) -> None:
    for name, value in (("k", k), ("num_patches", num_patches), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= num_patches <= MAX_PATCHES:
        raise ValueError(f"num_patches must be in 1..{MAX_PATCHES} (all num_patches! candidates are enumerated), "
                         f"got {num_patches}")
    total = math.factorial(num_patches)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in 1..{total} ({num_patches}! permutations of {num_patches} patches), got {k}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
