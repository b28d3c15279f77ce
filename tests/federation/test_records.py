from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from federation.protocol import PACKED_SHAPES, PACKED_VALUES, RoundConfig
from federation.records import (
    RecordError,
    arrays_from_record,
    arrays_to_record,
    config_record,
    packed_payload,
    round_config_from_record,
)

W0 = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]


def test_arrays_travel_packed_and_a_bad_shape_table_is_refused() -> None:
    rec = arrays_to_record(W0)
    assert sorted(rec.keys()) == sorted([PACKED_SHAPES, PACKED_VALUES])  # two objects, whatever the model
    back = arrays_from_record(rec)
    assert [a.shape for a in back] == [(2, 3), (4,)] and float(back[1].sum()) == 4.0
    bad = ArrayRecord({PACKED_VALUES: rec[PACKED_VALUES], PACKED_SHAPES: Array(np.array([2, 2, 3], np.int64))})
    with pytest.raises(RecordError, match="shapes account for 6 of 10"):
        arrays_from_record(bad)


def test_unpacked_records_are_read_in_key_order_and_bad_keys_refused() -> None:
    rec = ArrayRecord({"1": Array(W0[1]), "0": Array(W0[0])})
    assert [a.shape for a in arrays_from_record(rec)] == [(2, 3), (4,)]
    with pytest.raises(RecordError, match="keys must be"):
        arrays_from_record(ArrayRecord({"a": Array(W0[0])}))


def test_payload_is_the_packed_bytes() -> None:
    rec = arrays_to_record(W0)
    assert packed_payload(rec) == rec[PACKED_VALUES].data + rec[PACKED_SHAPES].data


def test_round_config_survives_the_record() -> None:
    rc = RoundConfig(server_round=3, stage="seg", dp_sgd=True, dp_sgd_noise_multiplier=1.5)
    assert round_config_from_record(config_record(rc)) == rc
