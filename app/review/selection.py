"""Which candidate pairs make a review page: pure functions, no database, so every rule is unit-tested alone.

The service hands over candidates that are already eligible (same split, both faces embedded by the serving
model, never labelled, not leased, not a face with itself) and the share of the page each split gets
(`page_shares`). This module picks:

- training pairs by informativeness, in turn from three queues, plus a small random share:
  `hard-different` (scoring at least threshold - band while known to differ: subjects differ, or labelled
  pairs imply it by transitivity), `uncertain` (|score - threshold| <= band, closest first), `likely-same`
  (a nearest neighbour scoring above the band, highest first; at most `likely_same_share` of the training
  pairs, none by default) and `explore` (uniformly at random);
- evaluation pairs (val, test) without the uncertainty bias: candidates drawn at random among the split's
  pairs are cut into two strata by the predicted side of the threshold (`score >= threshold`:
  predicted-same; below: predicted-different), and the page takes half from each (the rest from the other
  when one runs out), uniformly at random within a stratum. Their reason is `explore`.

Across the page no face appears more than twice, and subjects are spread: a pair whose subject is already on
the page as often as the fair share (2 * page size / subjects among the candidates, at least 1) waits until
every other candidate has been considered.

Why `likely-same` is off by default (bench/README.md, "Why the queue's training pairs hurt"): those pairs are
near-duplicates the model already calls the same (on the CMU set 78 of 81 were positives), so they teach
nothing, and a training set heavy with them pulls the embedding space together. On 200 CMU training pairs
fine-tuned alike (seed 0), the queue with them took the held-out AUC from 0.684 to 0.647; without them (their
slots going to `uncertain`), to 0.728, against 0.706 for random within-split pairs. Over three seeds their
absence reduced the harm (not on every draw) and did not reliably beat random pairs.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from app.domain import FaceSplit

UNCERTAIN = "uncertain"
LIKELY_SAME = "likely-same"
HARD_DIFFERENT = "hard-different"
EXPLORE = "explore"
REASONS = (UNCERTAIN, LIKELY_SAME, HARD_DIFFERENT, EXPLORE)
MAX_FACE_USES = 2
PREDICTED_SAME = "predicted-same"
PREDICTED_DIFFERENT = "predicted-different"
DEFAULT_LIKELY_SAME_SHARE = 0.0  # see the module docstring; 1.0 gives likely-same an equal turn as before


@dataclass(frozen=True)
class Candidate:
    """An eligible pair, faces in canonical order (face_a < face_b)."""

    face_a: uuid.UUID
    face_b: uuid.UUID
    split: str
    score: float
    subject_a: str | None = None
    subject_b: str | None = None
    neighbour: bool = False  # found by nearest-neighbour search (training only)
    known_different: bool = False  # subjects differ, or labelled pairs imply it

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID]:
        return (self.face_a, self.face_b)


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    reason: str
    stratum: str | None = None  # evaluation pairs: the predicted side of the threshold they were drawn from


def page_shares(
    limit: int,
    *,
    needed: Mapping[str, Mapping[str, int]],
    val_share: float,
    evidence_max_share: float,
) -> dict[str, int]:
    """Pairs per split on a page of `limit`.

    The evaluation sets first get what they still need (`needed`: `test` for the promotion gate, `val` for
    a fine-tune to pick its epoch and calibrate its threshold; `app.evidence`), together at most
    `evidence_max_share` of the page, shared in proportion to their needs. `val` also gets a steady
    `val_share` (rounded, at least 1 on pages of 5 or more while the share is positive) so that calibration
    stays fresh; `train` the rest.
    """
    test_needed = sum(needed.get(FaceSplit.TEST.value, {}).values())
    val_needed = sum(needed.get(FaceSplit.VAL.value, {}).values())
    cap = math.floor(limit * evidence_max_share)
    if test_needed + val_needed <= cap:
        test, val_for_need = test_needed, val_needed
    else:
        test = round(cap * test_needed / (test_needed + val_needed))
        val_for_need = cap - test
    if test_needed and test == 0 and evidence_max_share > 0:
        test = 1
    steady = round(limit * val_share)
    if steady == 0 and val_share > 0 and limit >= 5:
        steady = 1
    val = min(max(val_for_need, steady), limit - test)
    return {FaceSplit.TRAIN.value: limit - test - val, FaceSplit.VAL.value: val, FaceSplit.TEST.value: test}


def training_reason(candidate: Candidate, threshold: float, band: float) -> str | None:
    """The informative reason a training pair has, or None (then it can only be drawn to explore)."""
    if candidate.known_different and candidate.score >= threshold - band:
        return HARD_DIFFERENT
    if abs(candidate.score - threshold) <= band:
        return UNCERTAIN
    if candidate.neighbour and candidate.score > threshold + band and not candidate.known_different:
        return LIKELY_SAME
    return None


class _Page:
    """The page under construction: face uses and subject uses, to keep it diverse."""

    def __init__(self, subject_cap: int, already: Iterable[Choice] = ()) -> None:
        self.choices: list[Choice] = []
        self.keys: set[tuple[uuid.UUID, uuid.UUID]] = set()
        self.faces: Counter[uuid.UUID] = Counter()
        self.subjects: Counter[str] = Counter()
        self.subject_cap = subject_cap
        for choice in already:
            self._count(choice.candidate)

    def _count(self, candidate: Candidate) -> None:
        self.keys.add(candidate.key)
        self.faces.update((candidate.face_a, candidate.face_b))
        self.subjects.update(s for s in {candidate.subject_a, candidate.subject_b} if s is not None)

    def fits(self, candidate: Candidate, *, spread: bool) -> bool:
        if candidate.key in self.keys:
            return False
        if any(self.faces[face] >= MAX_FACE_USES for face in (candidate.face_a, candidate.face_b)):
            return False
        subjects = {candidate.subject_a, candidate.subject_b} - {None}
        return not spread or all(self.subjects[s] < self.subject_cap for s in subjects)  # type: ignore[index]

    def add(self, choice: Choice) -> None:
        self.choices.append(choice)
        self._count(choice.candidate)


def _take(
    page: _Page,
    queues: Sequence[list[tuple[Candidate, str, str | None]]],
    count: int,
    caps: Sequence[int | None] | None = None,
) -> list[Choice]:
    """Up to `count` choices, one from each queue in turn (at most `caps[q]` from queue q): first spreading
    subjects, then not."""
    taken: list[Choice] = []
    limits = list(caps) if caps is not None else [None] * len(queues)
    used = [0] * len(queues)
    for spread in (True, False):
        cursors = [0] * len(queues)
        progress = True
        while len(taken) < count and progress:
            progress = False
            for q, queue in enumerate(queues):
                if len(taken) >= count:
                    break
                limit = limits[q]
                if limit is not None and used[q] >= limit:
                    continue
                while cursors[q] < len(queue):
                    candidate, reason, stratum = queue[cursors[q]]
                    cursors[q] += 1
                    if page.fits(candidate, spread=spread):
                        choice = Choice(candidate, reason, stratum)
                        page.add(choice)
                        taken.append(choice)
                        used[q] += 1
                        progress = True
                        break
    return taken


def select_pairs(
    candidates: Sequence[Candidate],
    *,
    shares: Mapping[str, int],
    threshold: float,
    band: float,
    explore_share: float,
    rng: random.Random,
    already: Sequence[Choice] = (),
    likely_same_share: float = DEFAULT_LIKELY_SAME_SHARE,
) -> list[Choice]:
    """The page: for each split its share of pairs (fewer when candidates run out), in split order.

    `already` holds choices made earlier for the same page (e.g. before a concurrent reviewer took some
    pairs): their faces and subjects count towards the page's limits, and they are not chosen again.
    """
    subjects = {s for c in candidates for s in (c.subject_a, c.subject_b) if s is not None}
    page_size = sum(shares.values()) + len(already)
    subject_cap = max(1, math.ceil(2 * page_size / len(subjects))) if subjects else page_size
    page = _Page(subject_cap, already)
    by_split: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_split.setdefault(candidate.split, []).append(candidate)

    chosen: list[Choice] = []
    for split in (FaceSplit.TEST.value, FaceSplit.VAL.value, FaceSplit.TRAIN.value):
        count, pool = shares.get(split, 0), by_split.get(split, [])
        if count <= 0 or not pool:
            continue
        if split == FaceSplit.TRAIN.value:
            chosen += _training(page, pool, count, threshold, band, explore_share, likely_same_share, rng)
        else:
            chosen += _evaluation(page, pool, count, threshold, rng)
    return chosen


def _training(
    page: _Page,
    pool: list[Candidate],
    count: int,
    threshold: float,
    band: float,
    explore_share: float,
    likely_same_share: float,
    rng: random.Random,
) -> list[Choice]:
    queues: dict[str, list[tuple[Candidate, str, str | None]]] = {r: [] for r in REASONS}
    for candidate in pool:
        reason = training_reason(candidate, threshold, band)
        if reason is not None:
            queues[reason].append((candidate, reason, None))
    queues[UNCERTAIN].sort(key=lambda item: (abs(item[0].score - threshold), item[0].key))
    queues[HARD_DIFFERENT].sort(key=lambda item: (-item[0].score, item[0].key))
    queues[LIKELY_SAME].sort(key=lambda item: (-item[0].score, item[0].key))
    explore = [(c, EXPLORE, None) for c in pool]
    rng.shuffle(explore)

    explore_count = round(count * explore_share)
    if explore_count == 0 and explore_share > 0 and count >= 5:
        explore_count = 1
    taken = _take(
        page,
        [queues[HARD_DIFFERENT], queues[UNCERTAIN], queues[LIKELY_SAME]],
        count - explore_count,
        caps=[None, None, math.floor(count * likely_same_share)],
    )
    taken += _take(page, [explore], count - len(taken))  # the explore share, and whatever is still missing
    return taken


def _evaluation(
    page: _Page, pool: list[Candidate], count: int, threshold: float, rng: random.Random
) -> list[Choice]:
    above = [(c, EXPLORE, PREDICTED_SAME) for c in pool if c.score >= threshold]
    below = [(c, EXPLORE, PREDICTED_DIFFERENT) for c in pool if c.score < threshold]
    rng.shuffle(above)
    rng.shuffle(below)
    return _take(page, [above, below], count)
