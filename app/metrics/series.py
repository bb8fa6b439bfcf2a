"""Feedback over time: pairs per hour or day, by split and label, counted by the database.

The window is a bounded number of whole buckets (at most `MAX_BUCKETS`) ending with the one that holds
`end`, so one request reads only the feedback rows of that window, through the (created_at, id) index, and
answers a fixed number of points however much feedback the table holds. Buckets are aligned to UTC (a day
starts at midnight UTC). Pairs of the `cross` split are the wasted labels: their faces fell in different
splits, so no job trains or evaluates on them.
"""

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import ColumnElement, Integer, cast, func, literal_column, select
from sqlalchemy.orm import Session

from app.domain import FeedbackSplit
from app.metrics.schemas import FeedbackSeries, FeedbackSeriesPoint
from app.metrics.service import FEEDBACK_SPLITS, LABELS
from app.tables import FeedbackPair

MAX_BUCKETS = 366
# Feedback is stamped by the server, so nothing lies outside these; they keep every bucket a real date.
EARLIEST_END = datetime(1971, 1, 1, tzinfo=UTC)
LATEST_END = datetime(9000, 1, 1, tzinfo=UTC)


class WindowOutOfRange(ValueError):
    """The window asked for is longer than MAX_BUCKETS or ends outside [EARLIEST_END, LATEST_END]."""


class Bucket(StrEnum):
    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return 3600 if self is Bucket.HOUR else 86400


def _bucket_index(session: Session, seconds: int) -> ColumnElement[int]:
    """created_at as whole buckets since the epoch, computed by the database (SQLite stores UTC text).

    The width is written into the statement, not bound: PostgreSQL matches a GROUP BY expression to the
    selected one by its text, and two bound parameters would differ.
    """
    width = literal_column(str(int(seconds)))
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", FeedbackPair.created_at) / width), Integer)
    # Whole seconds first: SQLite's date functions round to the millisecond, which would move 23:59:59.9999
    # into the next day while the (textual) window filter kept it in this one.
    seconds_text = func.substr(FeedbackPair.created_at, 1, 19)
    return cast(func.strftime("%s", seconds_text), Integer) / width


def _window(bucket: Bucket, buckets: int, end: datetime | None) -> tuple[int, int]:
    """[first, last] bucket index: `buckets` whole buckets, the last one holding `end` (now by default)."""
    end = datetime.now(UTC) if end is None else end.replace(tzinfo=end.tzinfo or UTC)
    if not EARLIEST_END <= end <= LATEST_END:
        raise WindowOutOfRange(f"end must be between {EARLIEST_END.date()} and {LATEST_END.date()}")
    last = int(end.timestamp()) // bucket.seconds
    return last - buckets + 1, last


def _at(index: int, bucket: Bucket) -> datetime:
    return datetime.fromtimestamp(index * bucket.seconds, UTC)


def feedback_series(
    *, session: Session, bucket: Bucket, buckets: int, end: datetime | None = None
) -> FeedbackSeries:
    """One point per bucket of the window, oldest first, zeros included (a chart needs no gap filling)."""
    if not 1 <= buckets <= MAX_BUCKETS:
        raise WindowOutOfRange(f"buckets must be within 1..{MAX_BUCKETS}")
    first, last = _window(bucket, buckets, end)
    start, stop = _at(first, bucket), _at(last + 1, bucket)
    index = _bucket_index(session, bucket.seconds).label("bucket")
    rows = session.execute(
        select(index, FeedbackPair.split, FeedbackPair.label, func.count())
        .where(FeedbackPair.created_at >= start, FeedbackPair.created_at < stop)
        .group_by(index, FeedbackPair.split, FeedbackPair.label)
    ).all()
    points = [
        FeedbackSeriesPoint(
            start=_at(i, bucket),
            total=0,
            by_split_label={split: dict.fromkeys(LABELS, 0) for split in FEEDBACK_SPLITS},
        )
        for i in range(first, last + 1)
    ]
    for i, split, label, count in rows:
        point = points[int(i) - first]
        point.total += count
        point.by_split_label.setdefault(str(split), dict.fromkeys(LABELS, 0))[str(label)] += count
    return FeedbackSeries(
        bucket=bucket.value,
        bucket_seconds=bucket.seconds,
        start=start,
        end=stop,
        splits=list(FEEDBACK_SPLITS),
        wasted_split=FeedbackSplit.CROSS.value,
        points=points,
    )


def default_buckets(bucket: Bucket) -> int:
    """Two days of hours or thirty days: what a dashboard shows without asking."""
    return 48 if bucket is Bucket.HOUR else 30
