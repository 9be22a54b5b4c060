"""EpochRecord: what the state stores persist for an epoch must read back unchanged.

The stores' behaviour (compare-and-swap, fencing, resume decisions, inventory, decision
log) is one conformance suite run against every implementation:
tests/test_store_conformance.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from splice.controller.store import EpochRecord


def record(epoch: int, job_id: str = "j", members: tuple[str, ...] = ("a/0", "a/1"),
           reason: str = "r") -> EpochRecord:
    """An epoch record for tests (the conformance suite builds its cases with it)."""
    return EpochRecord(job_id=job_id, epoch=epoch, members=members,
                       shares=(1.0,) * len(members), reason=reason,
                       decided_at_s=float(epoch))

finite = st.floats(allow_nan=False, allow_infinity=False)
records = st.builds(
    EpochRecord,
    job_id=st.text(min_size=1, max_size=10),
    epoch=st.integers(min_value=1, max_value=2**53),
    members=st.lists(st.text(max_size=8), max_size=5).map(tuple),
    shares=st.lists(finite, max_size=5).map(tuple),
    reason=st.text(),
    decided_at_s=finite,
)


@given(records)
def test_record_json_round_trip(rec: EpochRecord) -> None:
    assert EpochRecord.from_json(rec.to_json()) == rec
