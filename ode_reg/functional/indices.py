"""Evenly spread indices: the one rule for which checkpoints, steps or samples are kept."""

from __future__ import annotations


def spread_indices(n: int, num: int | None) -> list[int]:
    """``num`` indices spread evenly over ``range(n)``, first and last included.

    All of ``range(n)`` when ``num`` is ``None`` or at least ``n``; ``[n - 1]`` (the last) when
    ``num == 1``. Used for the checkpoints a solve keeps by default, the states a term or a
    monitor evaluates, and the samples a spectrum reads.

    Args:
        n: the length of the range (``>= 0``).
        num: how many indices to keep (``>= 1``), or ``None`` for all.

    Raises:
        ValueError: ``n < 0`` or ``num < 1``.

    Example:
        >>> spread_indices(11, 3)
        [0, 5, 10]
        >>> spread_indices(4, None)
        [0, 1, 2, 3]
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if num is not None and num < 1:
        raise ValueError(f"num must be >= 1 or None, got {num}")
    if num is None or num >= n:
        return list(range(n))
    if num == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (num - 1)) for i in range(num)})
