"""Flower record conversion, one implementation for both sides of a round.

Arrays travel packed (:func:`~federation.arrays.flatten_arrays`): an ``ArrayRecord`` with two entries,
:data:`~federation.protocol.PACKED_VALUES` (one float32 vector) and
:data:`~federation.protocol.PACKED_SHAPES` (the int64 shape table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, MetricRecord, MetricRecordValues

from federation.arrays import flatten_arrays, unflatten_arrays
from federation.protocol import PACKED_SHAPES, PACKED_VALUES, RoundConfig

__all__ = [
    "RecordError",
    "arrays_from_record",
    "arrays_to_record",
    "config_record",
    "metric_record",
    "packed_payload",
    "round_config_from_record",
]


class RecordError(ValueError):
    """A record whose content cannot be read (names what is wrong)."""


def arrays_to_record(arrays: Sequence[np.ndarray]) -> ArrayRecord:
    """Arrays packed for the wire: two objects (values, shapes)."""
    values, shapes = flatten_arrays(arrays)
    return ArrayRecord({PACKED_VALUES: Array(values), PACKED_SHAPES: Array(shapes)})


def arrays_from_record(record: ArrayRecord) -> list[np.ndarray]:
    """Inverse of :func:`arrays_to_record`; also reads one array per key ``"0"``..``"n-1"`` (any key order).

    Raises:
        RecordError: a packed record whose shape table does not fit its values, or keys that are
            neither the packed pair nor ``0..n-1``.
    """
    keys = list(record.keys())
    if set(keys) == {PACKED_VALUES, PACKED_SHAPES}:
        try:
            return unflatten_arrays(record[PACKED_VALUES].numpy(), record[PACKED_SHAPES].numpy())
        except ValueError as err:
            raise RecordError(str(err)) from err
    if sorted(keys, key=lambda k: int(k) if k.isdigit() else -1) != [str(i) for i in range(len(keys))]:
        raise RecordError(f"array record keys must be '0'..'{len(keys) - 1}', got {keys[:5]}...")
    return [record[str(i)].numpy() for i in range(len(keys))]


def packed_payload(record: ArrayRecord) -> bytes:
    """The exact bytes of a record's arrays as they travel (what a site's audit ledger hashes)."""
    return b"".join(record[k].data for k in record)


def config_record(rc: RoundConfig) -> ConfigRecord:
    """A round config as Flower's ``ConfigRecord``."""
    values: dict[str, ConfigRecordValues] = dict(rc.to_record())
    return ConfigRecord(values)


def round_config_from_record(record: Mapping[str, Any]) -> RoundConfig:
    """The :class:`RoundConfig` of a received config record (raises ``KeyError``/``ValueError`` naming the key)."""
    return RoundConfig.from_record(dict(record))


def metric_record(metrics: Mapping[str, int | float]) -> MetricRecord:
    """Scalar metrics as Flower's ``MetricRecord``."""
    values: dict[str, MetricRecordValues] = dict(metrics)
    return MetricRecord(values)
