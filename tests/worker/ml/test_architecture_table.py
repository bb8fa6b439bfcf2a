"""The api's torch-free architecture table must be exactly what the backbones build."""

import pytest

from app.models.checkpoint_keys import architecture_table as shipped_table
from worker.ml.backbones import ARCHITECTURES
from worker.ml.backbones.export_keys import TABLE_PATH, architecture_table, render
from worker.ml.checkpoints import expected_tensors


def test_the_shipped_file_is_what_export_keys_writes() -> None:
    assert TABLE_PATH.read_text(encoding="utf-8") == render(architecture_table()), (
        "app/models/architectures.json is stale: run python -m worker.ml.backbones.export_keys"
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_api_reads_every_architecture_as_the_worker_expects_it(arch: str) -> None:
    expected = {key: shape for key, (shape, _dtype) in expected_tensors(arch).items()}

    assert shipped_table()[arch] == expected
    assert list(shipped_table()[arch]) == list(expected)


def test_the_table_covers_exactly_the_known_architectures() -> None:
    assert tuple(shipped_table()) == ARCHITECTURES
