"""Every list of states, kinds, splits and architectures is derived from the one enum in app.domain."""

import pytest
from sqlalchemy import CheckConstraint

from app import domain
from app.domain import (
    FINISHED_JOB_STATUSES,
    PUBLIC_JOB_KINDS,
    Architecture,
    EvaluationSplit,
    FaceSplit,
    FeedbackSplit,
    JobKind,
    JobStatus,
    ModelStatus,
)
from app.jobs.params import PARAMS_BY_KIND
from app.jobs.schemas import JOB_CREATE_BODIES
from app.splits import SPLIT_NAMES
from app.tables import Base


def test_every_job_kind_has_params_and_every_public_one_a_request_body() -> None:
    assert set(PARAMS_BY_KIND) == set(JobKind)
    kinds = {body.model_fields["kind"].annotation.__args__[0] for body in JOB_CREATE_BODIES}
    assert kinds == set(PUBLIC_JOB_KINDS)
    assert JobKind.VALIDATE_MODEL not in PUBLIC_JOB_KINDS


def test_finished_statuses_are_the_ones_a_job_never_leaves() -> None:
    assert {"succeeded", "failed", "cancelled"} == FINISHED_JOB_STATUSES
    assert [status.finished for status in JobStatus] == [False, False, True, True, True]


def test_the_splits_nest() -> None:
    assert SPLIT_NAMES == ("train", "val", "test")
    assert all(type(name) is str for name in SPLIT_NAMES)
    assert set(FaceSplit) < set(FeedbackSplit)
    assert set(EvaluationSplit) < set(FeedbackSplit) - {FeedbackSplit.TRAIN}
    assert domain.PAIR_SETS == ("train", "val", "test", "regression")


def test_parse_is_a_membership_test_for_any_input() -> None:
    assert domain.parse(Architecture, "iresnet50") is Architecture.IRESNET50
    assert domain.parse(Architecture, "resnet50") is None
    assert domain.parse(Architecture, None) is None
    assert domain.parse(Architecture, ["iresnet50"]) is None


@pytest.mark.parametrize(
    ("table", "column", "enum"),
    [
        ("jobs", "status", JobStatus),
        ("jobs", "kind", JobKind),
        ("models", "status", ModelStatus),
        ("models", "arch", Architecture),
        ("faces", "split", FaceSplit),
        ("feedback", "split", FeedbackSplit),
        ("evaluations", "split", EvaluationSplit),
    ],
)
def test_each_enum_column_has_a_check_constraint_listing_every_member(
    table: str, column: str, enum: type
) -> None:
    sql_table = Base.metadata.tables[table]
    checks = {c.name: str(c.sqltext) for c in sql_table.constraints if isinstance(c, CheckConstraint)}
    assert checks[f"ck_{table}_{column}"] == domain.sql_in(column, enum)
    assert sql_table.c[column].type.enums == [member.value for member in enum]
    assert sql_table.c[column].type.length >= max(len(member) for member in enum)
