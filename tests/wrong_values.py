"""Wrong values for a parameter, read off its declared constraints (``_parameter_constraints`` tables).

The parameter tests of the estimators (tests/test_estimator.py) and of the photo cloak
(tests/test_cloak.py) feed every declared parameter one value of a kind it does not take and the
values of its kind that it refuses, so a parameter added to a table is tested without a new line.
"""

from __future__ import annotations

import math

from krtfuap._validation import DeviceLike, FaceModelLike, Interval, Options, RandomStateLike, SequenceOf

WRONG_TYPES = (object(), "not-an-option", 1.5, 3, True, None, [object()])


def wrong_type(constraints: list) -> object | None:
    """A value of a kind no constraint of the list admits (``None`` when every kind is admitted)."""
    for candidate in WRONG_TYPES:
        if candidate is None:
            if None not in constraints:
                return candidate
            continue
        if not any(c is not None and c.admits_type(candidate) for c in constraints):
            return candidate
    return None


def wrong_values(constraints: list) -> list:
    """Values of an admitted kind that the constraints refuse (out of range, NaN, unknown option ...)."""
    values: list = []
    for constraint in constraints:
        if isinstance(constraint, Interval):
            low_open = constraint.closed in ("right", "neither")
            high_open = constraint.closed in ("left", "neither")
            if constraint.low is not None:
                values.append(constraint.kind(constraint.low) if low_open else constraint.kind(constraint.low - 1))
            if constraint.high is not None:
                values.append(constraint.kind(constraint.high) if high_open else constraint.kind(constraint.high + 1))
            if constraint.kind is float:
                values.append(math.nan)
        elif isinstance(constraint, Options):
            values.append("bogus")
        elif isinstance(constraint, RandomStateLike):
            values.append(-1)
        elif isinstance(constraint, DeviceLike):
            values.append("banana")
        elif isinstance(constraint, (FaceModelLike, SequenceOf)):
            values.append([])
    # A value another constraint of the list accepts is not wrong (e.g. "auto" for lr_decay_steps).
    return [v for v in values if not any(c is not None and c.admits_type(v) and c.problem(v) is None
                                         for c in constraints)]
