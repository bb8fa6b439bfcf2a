"""The gate's minimum evidence: counted from stored feedback, and what is missing named by split and label."""

from sqlalchemy import insert

from app.config import Settings
from app.db import session_scope
from app.evidence import EvidenceCounts, EvidenceMinimums, count_evidence, evidence_needed, evidence_report
from app.tables import FeedbackPair
from tests.app.factories import insert_face

MINIMUMS = EvidenceMinimums(test_same=3, test_different=2, regression_pairs=4)


def test_nothing_is_needed_once_every_minimum_is_met() -> None:
    counts = EvidenceCounts(test_same=3, test_different=5, regression_pairs=4)
    assert evidence_needed(counts, MINIMUMS) == {}


def test_missing_labels_are_named_by_split_and_kind() -> None:
    counts = EvidenceCounts(test_same=1, test_different=2, regression_pairs=1)
    assert evidence_needed(counts, MINIMUMS) == {"test": {"same": 2}, "regression": {"pairs": 3}}


def test_no_regression_set_needs_no_regression_pairs() -> None:
    assert evidence_needed(EvidenceCounts(), MINIMUMS) == {"test": {"same": 3, "different": 2}}


def test_counts_come_from_the_stored_pairs_by_split_and_label(settings: Settings) -> None:
    faces = [insert_face(settings, split="test") for _ in range(6)]
    rows = [
        (faces[0], faces[1], 1, "test"),
        (faces[0], faces[2], 1, "test"),
        (faces[0], faces[3], 0, "test"),
        (faces[1], faces[2], 0, "val"),
        (faces[1], faces[3], 1, "regression"),
        (faces[1], faces[4], 0, "regression"),
        (faces[2], faces[3], 1, "cross"),
    ]
    with session_scope(settings.database_url) as session:
        session.execute(
            insert(FeedbackPair),
            [
                {"face_a": min(a, b), "face_b": max(a, b), "label": label, "split": split}
                for a, b, label, split in rows
            ],
        )
    with session_scope(settings.database_url) as session:
        counts = count_evidence(session)
    assert counts == EvidenceCounts(
        test_same=2, test_different=1, val_same=0, val_different=1, regression_pairs=2
    )
    report = evidence_report(counts, MINIMUMS)
    assert report["needed"] == {"test": {"same": 1, "different": 1}, "regression": {"pairs": 2}}
    assert report["minimums"] == {"test_same": 3, "test_different": 2, "regression_pairs": 4}
