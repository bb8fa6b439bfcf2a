"""The review queue's selection rules alone: shares, reasons, strata, diversity (no database, no HTTP)."""

import random
import uuid
from collections import Counter

import pytest

from app.review.selection import (
    EXPLORE,
    HARD_DIFFERENT,
    LIKELY_SAME,
    PREDICTED_DIFFERENT,
    PREDICTED_SAME,
    UNCERTAIN,
    Candidate,
    Choice,
    page_shares,
    select_pairs,
    training_reason,
)

T, BAND = 0.5, 0.1


def ids(n: int, seed: int = 0) -> list[uuid.UUID]:
    rng = random.Random(seed)
    return sorted(uuid.UUID(int=rng.getrandbits(128)) for _ in range(n))


def pairs_over(
    faces: list[uuid.UUID], split: str, rng: random.Random, subjects: int = 10, **extra: object
) -> list[Candidate]:
    subject = {face: f"s{i % subjects}" for i, face in enumerate(faces)}
    return [
        Candidate(a, b, split, rng.random(), subject[a], subject[b], **extra)  # type: ignore[arg-type]
        for i, a in enumerate(faces)
        for b in faces[i + 1 :]
    ]


@pytest.mark.parametrize(
    ("limit", "needed", "expected"),
    [
        (20, {"test": {"same": 20, "different": 20}}, {"train": 8, "val": 2, "test": 10}),
        (20, {"test": {"same": 3}}, {"train": 15, "val": 2, "test": 3}),
        (20, {}, {"train": 18, "val": 2, "test": 0}),
        (3, {}, {"train": 3, "val": 0, "test": 0}),
        (1, {"test": {"different": 5}}, {"train": 0, "val": 0, "test": 1}),
        # val's need and test's share the evaluation cap (10 of 20) in proportion: 20 against 20
        (
            20,
            {"test": {"same": 20}, "val": {"same": 10, "different": 10}},
            {"train": 10, "val": 5, "test": 5},
        ),
        (20, {"val": {"same": 3}}, {"train": 17, "val": 3, "test": 0}),
    ],
)
def test_page_shares_fill_what_the_gate_needs_first(limit: int, needed: dict, expected: dict) -> None:
    shares = page_shares(limit, needed=needed, val_share=0.1, evidence_max_share=0.5)

    assert shares == expected
    assert sum(shares.values()) == limit


def test_training_reasons_follow_score_labels_and_neighbourhood() -> None:
    a, b = ids(2)

    def reason(score: float, **flags: bool) -> str | None:
        return training_reason(Candidate(a, b, "train", score, **flags), T, BAND)

    assert reason(0.55) == UNCERTAIN
    assert reason(0.45, known_different=True) == HARD_DIFFERENT
    assert reason(0.9, known_different=True) == HARD_DIFFERENT
    assert reason(0.3, known_different=True) is None
    assert reason(0.9, neighbour=True) == LIKELY_SAME
    assert reason(0.9) is None  # high but not a nearest neighbour: only explore can draw it
    assert reason(0.1, neighbour=True) is None


def test_a_page_uses_a_face_at_most_twice_and_spreads_subjects() -> None:
    rng = random.Random(1)
    candidates = pairs_over(ids(40), "train", rng, neighbour=True)

    page = select_pairs(
        candidates, shares={"train": 20}, threshold=T, band=BAND, explore_share=0.1, rng=random.Random(2)
    )

    assert len(page) == 20
    assert len({choice.candidate.key for choice in page}) == 20
    uses = Counter(face for choice in page for face in choice.candidate.key)
    assert max(uses.values()) <= 2
    subjects = Counter(s for c in page for s in {c.candidate.subject_a, c.candidate.subject_b})
    assert max(subjects.values()) <= 4  # 2 * 20 slots over 10 subjects
    assert Counter(choice.reason for choice in page)[EXPLORE] >= 2


def test_uncertain_pairs_come_closest_first() -> None:
    faces = ids(12)
    scores = [0.2, 0.58, 0.51, 0.45, 0.9, 0.49]
    candidates = [Candidate(faces[2 * i], faces[2 * i + 1], "train", score) for i, score in enumerate(scores)]

    page = select_pairs(
        candidates, shares={"train": 4}, threshold=T, band=BAND, explore_share=0.0, rng=random.Random(0)
    )

    uncertain = [round(c.candidate.score, 2) for c in page if c.reason == UNCERTAIN]
    assert uncertain == [0.51, 0.49, 0.45, 0.58]


def likely_and_uncertain(count: int) -> list[Candidate]:
    """`count` likely-same pairs (nearest neighbours well above the band) and `count` uncertain ones, no face
    shared, so only the reasons' rules decide the page."""
    faces = ids(4 * count, seed=5)
    likely = [
        Candidate(faces[2 * i], faces[2 * i + 1], "train", 0.8 + i / 1000, neighbour=True)
        for i in range(count)
    ]
    uncertain = [
        Candidate(faces[2 * (count + i)], faces[2 * (count + i) + 1], "train", T + (i % 5) / 100)
        for i in range(count)
    ]
    return likely + uncertain


def ten_training_pairs(**share: float) -> list[Choice]:
    """A training page of 10 from 20 likely-same and 20 uncertain candidates, no random share."""
    return select_pairs(
        likely_and_uncertain(20),
        shares={"train": 10},
        threshold=T,
        band=BAND,
        explore_share=0.0,
        rng=random.Random(0),
        **share,
    )


def test_likely_same_pairs_take_no_training_slot_by_default() -> None:
    page = ten_training_pairs()

    assert Counter(choice.reason for choice in page) == {UNCERTAIN: 10}


@pytest.mark.parametrize(("share", "likely"), [(1.0, 5), (0.2, 2), (0.0, 0)])
def test_likely_same_share_caps_that_queue_and_the_others_fill_in(share: float, likely: int) -> None:
    page = ten_training_pairs(likely_same_share=share)

    # 1.0 is the old rule: the queues take equal turns
    assert Counter(choice.reason for choice in page) == Counter({LIKELY_SAME: likely, UNCERTAIN: 10 - likely})
    assert all(c.candidate.score > T + BAND for c in page if c.reason == LIKELY_SAME)


def test_evaluation_pairs_take_both_sides_of_the_threshold() -> None:
    rng = random.Random(3)
    candidates = pairs_over(ids(30), "test", rng)

    page = select_pairs(
        candidates, shares={"test": 10}, threshold=0.9, band=BAND, explore_share=0.1, rng=random.Random(4)
    )

    strata = Counter(choice.stratum for choice in page)
    assert strata == {PREDICTED_SAME: 5, PREDICTED_DIFFERENT: 5}
    assert all((c.candidate.score >= 0.9) == (c.stratum == PREDICTED_SAME) for c in page)
    assert {choice.reason for choice in page} == {EXPLORE}


def test_evaluation_suggestions_are_not_concentrated_near_the_threshold() -> None:
    """With a fixed seed, val/test pairs are spread like their pool's strata while training pairs cluster."""
    rng = random.Random(5)
    train = pairs_over(ids(60, 1), "train", rng, neighbour=True)
    test = pairs_over(ids(60, 2), "test", rng)
    near: dict[str, list[float]] = {"train": [], "test": []}
    for page_seed in range(20):
        page = select_pairs(
            train + test,
            shares={"train": 10, "test": 10},
            threshold=T,
            band=BAND,
            explore_share=0.1,
            rng=random.Random(page_seed),
        )
        for choice in page:
            near[choice.candidate.split].append(abs(choice.candidate.score - T))

    def within_band(values: list[float]) -> float:
        return sum(v <= BAND for v in values) / len(values)

    pool_share = within_band([abs(c.score - T) for c in test])  # about 0.2 for uniform scores
    assert within_band(near["train"]) > 0.5
    assert abs(within_band(near["test"]) - pool_share) < 0.1
    assert within_band(near["test"]) < within_band(near["train"]) - 0.25


def test_choices_made_earlier_count_towards_the_page() -> None:
    rng = random.Random(6)
    candidates = pairs_over(ids(10), "train", rng)
    first = select_pairs(
        candidates, shares={"train": 5}, threshold=T, band=BAND, explore_share=1.0, rng=random.Random(0)
    )

    rest = select_pairs(
        candidates,
        shares={"train": 5},
        threshold=T,
        band=BAND,
        explore_share=1.0,
        rng=random.Random(0),
        already=first,
    )

    assert not {c.candidate.key for c in first} & {c.candidate.key for c in rest}
    uses = Counter(face for choice in first + rest for face in choice.candidate.key)
    assert max(uses.values()) <= 2


def test_the_same_seed_gives_the_same_page() -> None:
    rng = random.Random(7)
    candidates = pairs_over(ids(20), "train", rng) + pairs_over(ids(20, 3), "val", rng)

    def page(seed: int) -> list[tuple]:
        chosen = select_pairs(
            candidates,
            shares={"train": 6, "val": 4},
            threshold=T,
            band=BAND,
            explore_share=0.2,
            rng=random.Random(seed),
        )
        return [(c.candidate.key, c.reason) for c in chosen]

    assert page(1) == page(1)
    assert page(1) != page(2)
