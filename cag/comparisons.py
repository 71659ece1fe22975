"""Paired comparisons between two arms of the benchmark, with Student-t confidence intervals.

Every arm of the benchmark is trained once per seed, and within a seed all adapted arms start
from the same source model and see the same data order. A seed that happens to give a good
source model lifts every arm of that seed. Comparing the two arms' *means* would count that
seed effect as noise; taking the difference ``a[s] - b[s]`` within each seed first removes it,
so the comparison is a one-sample problem on the per-seed differences.

With few seeds (typically 3 to 5) the standard deviation of those differences is itself
uncertain, so the interval uses Student's t with ``n - 1`` degrees of freedom, not the normal
1.96. The quantile is computed here from the regularised incomplete beta function (standard
library only; scipy is not a dependency).

``compare`` reads ``summary.csv`` rows, ``write_comparisons`` stores the
results, and ``verdict`` / ``count_sentence`` turn them into the sentences the book prints, so
no sentence claims a difference that its interval does not support.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import tempfile
from pathlib import Path

#: Columns of the comparisons CSV, in order.
COMPARISON_KEYS = ("preset", "arm_a", "arm_b", "checkpoint", "mean_diff", "ci_low", "ci_high", "seeds")
_FLOAT_KEYS = ("mean_diff", "ci_low", "ci_high")


# ----------------------------------------------------------------------------- Student's t

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes ``betacf``, Lentz)."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _t_upper_tail(t: float, df: int) -> float:
    """``P(T > t)`` for ``t >= 0``: ``0.5 * I_{df/(df+t^2)}(df/2, 1/2)``."""
    return 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom.

    The upper tail is ``P(T > t) = I_x(df/2, 1/2) / 2`` with ``x = df / (df + t^2)`` (regularised
    incomplete beta, continued fraction with Lentz's method); the quantile is found by bisection
    on that tail down to float resolution, and ``t_p = -t_{1-p}`` for ``p < 0.5``. Raises
    ``ValueError`` unless ``0 < p < 1`` and ``df >= 1``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must lie in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > tail:
        low, high = high, 2.0 * high
    while True:
        mid = 0.5 * (low + high)
        if mid in (low, high):
            return mid
        if _t_upper_tail(mid, df) > tail:
            low = mid
        else:
            high = mid


# ----------------------------------------------------------------------------- paired differences

def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95, *,
                      strict: bool = True) -> dict:
    """Mean of the per-seed differences ``d_s = a[s] - b[s]`` and its Student-t interval.

    With ``n`` common seeds, ``mean = sum(d) / n``, ``sd = sqrt(sum((d - mean)^2) / (n - 1))``
    and the interval is ``mean -+ t_{(1+level)/2, n-1} * sd / sqrt(n)``. Returns ``{mean_diff,
    ci_low, ci_high, seeds}`` with ``seeds`` the sorted tuple of common seeds. With a single
    common seed there is no spread to estimate: the interval is ``(nan, nan)``.

    ``strict=True`` (default) raises ``ValueError`` naming the seeds present in only one of the
    two dicts; ``strict=False`` uses the common seeds. No common seed at all is a ``ValueError``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_difference: level must lie in (0, 1), got {level}")
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"paired_difference: no common seed between {sorted(a)} and {sorted(b)}")
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if strict and (only_a or only_b):
        raise ValueError(f"paired_difference: unmatched seeds (only in a: {only_a}, only in b: "
                         f"{only_b}); pass the common seeds or strict=False")
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return {"mean_diff": mean, "ci_low": math.nan, "ci_high": math.nan, "seeds": seeds}
    half = t_quantile((1.0 + level) / 2.0, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half, "seeds": seeds}


def _as_seed(value) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"seed {value!r} is not an integer")
    return int(number)


def _by_seed(rows: list[dict], preset: str, arm: str, checkpoint: str, metric: str) -> dict[int, float]:
    """``{seed: metric}`` of one arm; ValueError for no rows, a duplicate seed or an empty value."""
    where = f"preset={preset!r}, arm={arm!r}, checkpoint={checkpoint!r}"
    values = {}
    for row in rows:
        if (str(row.get("preset")), str(row.get("arm")), str(row.get("checkpoint"))) != (preset, arm, checkpoint):
            continue
        seed = _as_seed(row["seed"])
        if seed in values:
            raise ValueError(f"two rows for seed {seed} at {where}")
        value = row.get(metric)
        if value is None or value == "" or math.isnan(float(value)):
            raise ValueError(f"no {metric} value for seed {seed} at {where}")
        values[seed] = float(value)
    if not values:
        raise ValueError(f"no rows at {where}")
    return values


def compare(rows: list[dict], preset: str, arm_a: str, arm_b: str, checkpoint: str = "last",
            seeds=None, metric: str = "miou", level: float = 0.95) -> dict:
    """Paired comparison ``arm_a - arm_b`` of ``metric`` over the seeds of ``summary.csv`` rows.

    Selects the rows of ``preset`` and ``checkpoint`` of each arm (one per seed), optionally only
    the given ``seeds``, and applies :func:`paired_difference` at ``level`` (strict: both arms
    must have the same seeds; ``level = 1 - 0.05 / m`` gives the Bonferroni interval of one of
    ``m`` comparisons). Differences stay in the metric's unit (fractions for mIoU). Returns a dict
    with :data:`COMPARISON_KEYS`; ``seeds`` is a space-separated string such as ``"1 2 3"``.
    """
    a = _by_seed(rows, preset, arm_a, checkpoint, metric)
    b = _by_seed(rows, preset, arm_b, checkpoint, metric)
    if seeds is not None:
        wanted = sorted({_as_seed(s) for s in seeds})
        for arm, values in ((arm_a, a), (arm_b, b)):
            missing = [s for s in wanted if s not in values]
            if missing:
                raise ValueError(f"seeds {missing} missing for preset={preset!r}, arm={arm!r}, "
                                 f"checkpoint={checkpoint!r} (has {sorted(values)})")
        a = {s: a[s] for s in wanted}
        b = {s: b[s] for s in wanted}
    result = paired_difference(a, b, level)
    return {"preset": preset, "arm_a": arm_a, "arm_b": arm_b, "checkpoint": checkpoint,
            "mean_diff": float(result["mean_diff"]), "ci_low": float(result["ci_low"]),
            "ci_high": float(result["ci_high"]), "seeds": " ".join(str(s) for s in result["seeds"])}


# ----------------------------------------------------------------------------- the CSV

def _cell(key: str, value) -> str:
    if key in _FLOAT_KEYS:
        value = float(value)
        return "" if math.isnan(value) else repr(value)
    if key == "seeds" and not isinstance(value, str):
        return " ".join(str(int(s)) for s in value)
    return str(value)


def write_comparisons(path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with every :data:`COMPARISON_KEYS`; other keys are ignored) as CSV.

    Floats are written with ``repr`` (exact round trip), nan as an empty cell, ``seeds`` as
    space-separated integers. The file is written to a temporary file in the same folder and
    moved into place with ``os.replace``, so readers never see half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COMPARISON_KEYS)
            for row in rows:
                writer.writerow([_cell(k, row[k]) for k in COMPARISON_KEYS])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- sentences

def _bound(value) -> float:
    """An interval bound as a float: nan for no interval (nan, or None as read by
    :func:`cag.results.read_csv` from an empty cell)."""
    return math.nan if value is None else float(value)


def excludes_zero(row) -> bool:
    """True when the interval lies strictly on one side of 0 (``ci_low > 0`` or ``ci_high < 0``);
    False when there is no interval (one seed)."""
    return _bound(row["ci_low"]) > 0.0 or _bound(row["ci_high"]) < 0.0


def _seed_count(row) -> int:
    seeds = row["seeds"]
    return len(seeds.split()) if isinstance(seeds, str) else len(seeds)


def verdict(row, name_a: str | None = None, name_b: str | None = None, unit_scale: float = 100.0,
            digits: int = 1) -> str:
    """One English sentence about ``arm_a - arm_b`` generated from the row's interval.

    Values are multiplied by ``unit_scale`` (fractions to mIoU points) and printed with ``digits``
    decimals. ``ci_low > 0``: "A is better than B by the absolute mean difference ..."; ``ci_high < 0``: "A is worse
    than B by the absolute mean difference ..."; otherwise "No detectable difference ...". The interval is always
    printed as signed values of ``a - b``. One seed: no interval, only the mean difference.
    """
    name_a = row["arm_a"] if name_a is None else name_a
    name_b = row["arm_b"] if name_b is None else name_b
    mean, low, high = (unit_scale * _bound(row[k]) for k in _FLOAT_KEYS)
    n = _seed_count(row)
    if n == 1 or math.isnan(low) or math.isnan(high):
        return (f"The difference between {name_a} and {name_b} is {mean:+.{digits}f} mIoU points "
                f"({n} seed{'' if n == 1 else 's'}: no interval).")
    interval = f"95 % CI {low:.{digits}f} to {high:.{digits}f}, {n} seeds"
    if low > 0:
        return f"{name_a} is better than {name_b} by {abs(mean):.{digits}f} mIoU points ({interval})."
    if high < 0:
        return f"{name_a} is worse than {name_b} by {abs(mean):.{digits}f} mIoU points ({interval})."
    return (f"No detectable difference between {name_a} and {name_b} "
            f"(mean difference {mean:+.{digits}f} mIoU points, {interval}).")


def count_sentence(rows: list[dict], complete: bool = True) -> str:
    """How many of the comparisons' 95 % intervals exclude zero, next to the ``0.05 * n`` that
    would do so by chance alone if no arm differed from any other.

    ``complete=False`` (runs.json of an unfinished benchmark): the rows are the declared
    comparisons scored so far, and the sentence says so instead of counting what is declared.
    """
    n = len(rows)
    if n == 0:
        return ("The experiment file declares no comparisons." if complete
                else "These partial results hold none of the declared comparisons yet.")
    k = sum(excludes_zero(row) for row in rows)
    counted = (f"The experiment file declares {n} comparison{'' if n == 1 else 's'}" if complete
               else f"These partial results hold {n} of the declared comparisons")
    if n == 1:
        first = f"{counted}; its 95 % interval {'excludes' if k else 'does not exclude'} zero."
    else:
        first = f"{counted}; {k} of their 95 % intervals {'excludes' if k == 1 else 'exclude'} zero."
    plural = "" if n == 1 else "s"
    return f"{first} With {n} comparison{plural}, about {0.05 * n:.1f} would exclude zero by chance alone if no arm differed."
