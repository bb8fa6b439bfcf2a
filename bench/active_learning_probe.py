"""Why the review queue's training pairs hurt: one fine-tune, in process, on queue-like or random pairs.

`bench/active_learning.py` takes 30+ minutes a strategy; this probe isolates its training step. The faces are
cut as that bench cuts them (same `--holdout`, same seed: held-out faces never trained on, the pool split by
content hash as the service splits it). The base model scores the pool, as the serving model does in that
bench (its candidates were never promoted, so every page was chosen on the base model's scores), and:

- `queue`: pages of `--page` training pairs chosen by `app.review.selection.select_pairs` from candidates
  built like `app.review.service._candidates` (every pool face sampled, nearest neighbours of 48 training
  anchors, random within-split pairs; labelled pairs excluded, `known_different` from labels by
  transitivity), until `--labels` training pairs;
- `random`: the same number of pairs drawn uniformly among within-split training pairs.

Both are fine-tuned by `worker.ml.training.finetune` with the same config and seed, and the same val pairs
(`--val-same` + `--val-different` drawn at random from the val split, like the evidence minimums). Each run
reports the held-out AUC/EER of the model the trainer returns (the val-selected epoch) and of every epoch,
so that what training does is seen apart from what epoch selection picks.

    python bench/active_learning_probe.py --run queue --run random --run queue:lr=1e-4 ...

A run is `set[:key=value,...]`. Sets: `queue` (the service's defaults), `queue/likely_share=1/explore=0.5/
page=40` (the queue with other settings; `likely_share=1` is the `likely-same` queue as it was before
MAGTUNE_REVIEW_LIKELY_SAME_SHARE, taking equal turns), `random`, and `random@<fraction>` (uniform
within-split training pairs drawn per label, that fraction of them positives). Keys: TrainConfig fields
(`lr` for learning_rate, `distill` for distill_weight), `drop=<reason>[+<reason>]` (leave out pairs of those
queue reasons), `positives=<fraction>` (resample positives, with replacement when needed, so they make that
fraction of the pairs at the same count) and `closure=1` (add the pairs the labels imply by transitivity).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from active_learning import DEFAULT_CHECKPOINT, DEFAULT_FACES, read_faces

from app.review import selection
from app.splits import split_for_digest
from worker.ml.checkpoints import load_backbone
from worker.ml.embedding import embed_pixels
from worker.ml.metrics import pair_metrics
from worker.ml.pairs import IndexedPairs
from worker.ml.preprocessing import decode_image, preprocess_spec_for
from worker.ml.training import TrainConfig, finetune

ARCH = "mobilefacenet"
THRESHOLD = 0.4  # the service's FALLBACK_THRESHOLD: the base model has no calibrated threshold
BAND = 0.08  # review_uncertain_band
EXPLORE_SHARE = 0.1  # review_explore_share
ANCHORS = 48  # review_anchors
NEIGHBOURS = 8  # review_neighbours
MAX_PAIRS_PER_SPLIT = 4000
ALIASES = {"lr": "learning_rate", "distill": "distill_weight"}


@dataclass
class Faces:
    pixels: torch.Tensor  # pool faces, uint8
    identity: np.ndarray  # pool identities
    split: np.ndarray  # pool splits
    unit: np.ndarray  # base model's unit embeddings of the pool
    held_pixels: torch.Tensor
    held_identity: np.ndarray


def load_faces(folder: Path, holdout: float, seed: int) -> Faces:
    cut = read_faces(folder, holdout, seed)
    spec = preprocess_spec_for(ARCH)

    def decode(items: list[tuple[Path, str]]) -> torch.Tensor:
        return torch.stack([decode_image(path.read_bytes(), size=spec.size).pixels for path, _ in items])

    splits = [split_for_digest(hashlib.sha256(path.read_bytes()).hexdigest()) for path, _ in cut.pool]
    pixels = decode(cut.pool)
    model = base_model()
    unit = embed_pixels(model, spec, pixels, device="cpu").embeddings.numpy().astype(np.float64)
    return Faces(
        pixels=pixels,
        identity=np.array([identity for _, identity in cut.pool]),
        split=np.array(splits),
        unit=unit,
        held_pixels=decode(cut.held_out),
        held_identity=np.array([identity for _, identity in cut.held_out]),
    )


def base_model(checkpoint: Path = DEFAULT_CHECKPOINT) -> torch.nn.Module:
    return load_backbone(checkpoint, ARCH).model.eval()


# Training sets.


def face_key(i: int) -> uuid.UUID:
    return uuid.UUID(int=i + 1)


def key_index(key: uuid.UUID) -> int:
    return key.int - 1


class Labels:
    """Labelled training pairs and what they imply (union-find of `same` groups, `different` group pairs)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[int, int, int, str]] = []  # (a, b, label, reason)
        self.keys: set[tuple[int, int]] = set()
        self.parent: dict[int, int] = {}

    def find(self, face: int) -> int:
        while self.parent.get(face, face) != face:
            face = self.parent[face]
        return face

    def add(self, a: int, b: int, label: int, reason: str) -> None:
        self.pairs.append((a, b, label, reason))
        self.keys.add((min(a, b), max(a, b)))
        if label:
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def known_different(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        return any(label == 0 and {self.find(x), self.find(y)} == {ra, rb} for x, y, label, _ in self.pairs)


def queue_pairs(
    faces: Faces,
    labels_wanted: int,
    page: int,
    seed: int,
    *,
    likely_same_share: float = selection.DEFAULT_LIKELY_SAME_SHARE,
    explore_share: float = EXPLORE_SHARE,
) -> Labels:
    """Training pairs as the review queue would lease them on pages of `page` training pairs."""
    rng = random.Random(seed)
    labels = Labels()
    count = len(faces.identity)
    scores = faces.unit @ faces.unit.T
    while len(labels.pairs) < labels_wanted:
        sample = rng.sample(range(count), count)
        anchors = [f for f in sample if faces.split[f] == "train"][:ANCHORS]
        candidates: dict[tuple[int, int], selection.Candidate] = {}

        def eligible(a: int, b: int) -> bool:
            return a != b and (min(a, b), max(a, b)) not in labels.keys

        def add(
            candidates: dict[tuple[int, int], selection.Candidate], a: int, b: int, neighbour: bool
        ) -> None:
            a, b = min(a, b), max(a, b)
            candidates[(a, b)] = selection.Candidate(
                face_a=face_key(a),
                face_b=face_key(b),
                split=str(faces.split[a]),
                score=float(scores[a, b]),
                neighbour=neighbour,
                known_different=labels.known_different(a, b),
            )

        for anchor in anchors:
            row = scores[anchor].copy()
            row[anchor] = -np.inf
            for other in np.argsort(-row)[:NEIGHBOURS]:
                other = int(other)
                same_group = labels.find(anchor) == labels.find(other)
                if faces.split[other] == "train" and eligible(anchor, other) and not same_group:
                    add(candidates, anchor, other, neighbour=True)
        members = [f for f in sample if faces.split[f] == "train"]
        rows, cols = np.triu_indices(len(members), k=1)
        order = list(range(len(rows)))
        rng.shuffle(order)
        kept = 0
        for i in order:
            if kept >= MAX_PAIRS_PER_SPLIT:
                break
            a, b = members[rows[i]], members[cols[i]]
            key = (min(a, b), max(a, b))
            if key in candidates or not eligible(a, b) or labels.find(a) == labels.find(b):
                continue
            add(candidates, a, b, neighbour=False)
            kept += 1
        take = min(page, labels_wanted - len(labels.pairs))
        choices = selection.select_pairs(
            sorted(candidates.values(), key=lambda c: c.key),
            shares={"train": take},
            threshold=THRESHOLD,
            band=BAND,
            explore_share=explore_share,
            rng=rng,
            likely_same_share=likely_same_share,
        )
        if not choices:
            break
        for choice in choices:
            a, b = key_index(choice.candidate.face_a), key_index(choice.candidate.face_b)
            labels.add(a, b, int(faces.identity[a] == faces.identity[b]), choice.reason)
    return labels


def random_pairs(faces: Faces, count: int, seed: int, positives: float | None = None) -> Labels:
    """Uniform within-split training pairs; with `positives`, drawn per label so that share are positives."""
    rng = random.Random(seed)
    members = [i for i in range(len(faces.identity)) if faces.split[i] == "train"]
    wanted = None if positives is None else {1: round(count * positives), 0: count - round(count * positives)}
    labels = Labels()
    seen: set[tuple[int, int]] = set()
    while len(labels.pairs) < count:
        a, b = sorted(rng.sample(members, 2))
        label = int(faces.identity[a] == faces.identity[b])
        if (a, b) in seen or (wanted is not None and wanted[label] == 0):
            continue
        seen.add((a, b))
        labels.add(a, b, label, "random")
        if wanted is not None:
            wanted[label] -= 1
    return labels


def val_pairs(faces: Faces, same: int, different: int, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed + 1)
    members = [i for i in range(len(faces.identity)) if faces.split[i] == "val"]
    pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
    rng.shuffle(pairs)
    found = {1: [], 0: []}
    wanted = {1: same, 0: different}
    for a, b in pairs:
        label = int(faces.identity[a] == faces.identity[b])
        if len(found[label]) < wanted[label]:
            found[label].append((a, b, label))
    return found[1] + found[0]


def transform(pairs: list[tuple[int, int, int, str]], options: dict[str, str], seed: int) -> list[Any]:
    rng = random.Random(seed + 2)
    if "drop" in options:
        dropped = set(options["drop"].split("+"))
        pairs = [p for p in pairs if p[3] not in dropped]
    if options.get("closure") == "1":
        pairs = with_closure(pairs)
    if "positives" in options:
        fraction = float(options["positives"])
        positives = [p for p in pairs if p[2] == 1]
        negatives = [p for p in pairs if p[2] == 0]
        want_pos = round(len(pairs) * fraction)
        want_neg = len(pairs) - want_pos

        def resample(group: list[Any], n: int) -> list[Any]:
            if n <= len(group):
                return rng.sample(group, n)
            return group + [rng.choice(group) for _ in range(n - len(group))]

        pairs = resample(positives, want_pos) + resample(negatives, want_neg)
    return pairs


def with_closure(pairs: list[tuple[int, int, int, str]]) -> list[tuple[int, int, int, str]]:
    """The labelled pairs plus every pair their labels imply: same within a group joined by `same` labels,
    different across two groups a `different` label separates (free labels, reason `implied`)."""
    labels = Labels()
    for pair in pairs:
        labels.add(*pair)
    groups: dict[int, list[int]] = {}
    for face in sorted({p[0] for p in pairs} | {p[1] for p in pairs}):
        groups.setdefault(labels.find(face), []).append(face)
    known = {(min(a, b), max(a, b)) for a, b, _, _ in pairs}
    implied: list[tuple[int, int, int, str]] = []
    for members in groups.values():
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                if (a, b) not in known:
                    implied.append((a, b, 1, "implied"))
                    known.add((a, b))
    for a, b, label, _ in pairs:
        if label == 0:
            for x in groups[labels.find(a)]:
                for y in groups[labels.find(b)]:
                    key = (min(x, y), max(x, y))
                    if key not in known:
                        implied.append((key[0], key[1], 0, "implied"))
                        known.add(key)
    return pairs + implied


def indexed(faces: Faces, pairs: list[tuple[int, ...]]) -> IndexedPairs:
    used = sorted({p[0] for p in pairs} | {p[1] for p in pairs})
    where = {face: i for i, face in enumerate(used)}
    return IndexedPairs.from_arrays(
        pixels=faces.pixels[used],
        first=[where[p[0]] for p in pairs],
        second=[where[p[1]] for p in pairs],
        labels=[p[2] for p in pairs],
        names=[str(face) for face in used],
    )


# Measuring.


class HeldOut:
    def __init__(self, faces: Faces) -> None:
        self.pixels = faces.held_pixels
        self.first, self.second = np.triu_indices(len(faces.held_identity), 1)
        names = faces.held_identity
        self.labels = (names[self.first] == names[self.second]).astype(int)
        self.spec = preprocess_spec_for(ARCH)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        unit = embed_pixels(model, self.spec, self.pixels, device="cpu").embeddings.numpy()
        scores = (unit[self.first] * unit[self.second]).sum(axis=1)
        metrics = pair_metrics(scores, self.labels, None)
        return {
            "auc": round(metrics["roc_auc"], 4),
            "eer": round(metrics["eer"], 4),
            "pos": round(metrics["mean_score"]["positive"], 3),
            "neg": round(metrics["mean_score"]["negative"], 3),
        }


def averaged_figures(
    model: torch.nn.Module, held: HeldOut, weights: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Held-out figures of the uniform average of `weights` (weight averaging of one run's epochs)."""
    mean = {
        k: torch.stack([w[k].float() for w in weights]).mean(0).to(weights[0][k].dtype) for k in weights[0]
    }
    model.load_state_dict(mean)
    return held(model)


def parse_run(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    options = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, options


def run_one(
    text: str, faces: Faces, sets: dict[str, Labels], val: IndexedPairs, held: HeldOut, base: dict[str, Any]
) -> dict[str, Any]:
    name, options = parse_run(text)
    count = len(sets["random"].pairs)
    if name not in sets and name.startswith("random@"):
        sets[name] = random_pairs(faces, count, base["seed"], float(name[7:]))
    if name not in sets and name.startswith("queue/"):
        variant = dict(item.split("=", 1) for item in name[6:].split("/"))
        sets[name] = queue_pairs(
            faces,
            count,
            int(variant.get("page", 40)),
            base["seed"],
            likely_same_share=float(variant.get("likely_share", selection.DEFAULT_LIKELY_SAME_SHARE)),
            explore_share=float(variant.get("explore", EXPLORE_SHARE)),
        )
    config_fields = {f.name: f.type for f in fields(TrainConfig)}
    config_args = dict(base)
    for key, value in options.items():
        field_name = ALIASES.get(key, key)
        if field_name in config_fields:
            kind = type(TrainConfig.__dataclass_fields__[field_name].default)
            if kind is str:
                config_args[field_name] = value
            else:
                config_args[field_name] = (
                    kind(float(value)) if kind is not bool else value not in ("0", "false")
                )
    config = TrainConfig(**config_args)
    pairs = transform(sets[name].pairs, options, config.seed)
    train = indexed(faces, pairs)
    model = base_model()
    per_epoch: list[dict[str, Any]] = []
    start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    epoch_weights: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(state: Any) -> None:
        per_epoch.append({"epoch": state.epoch, **held(model)})
        epoch_weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    started = time.monotonic()
    result = finetune(model, held.spec, train, val, config, device="cpu", on_epoch_end=on_epoch_end)
    selected = held(model)
    averaged = {
        "epochs": averaged_figures(model, held, epoch_weights),
        "start_and_last": averaged_figures(model, held, [start_weights, epoch_weights[-1]]),
        "start_and_epochs": averaged_figures(model, held, [start_weights, *epoch_weights]),
    }
    reasons: dict[str, list[int]] = {}
    for _, _, label, reason in pairs:
        reasons.setdefault(reason, [0, 0])[label] += 1
    return {
        "run": text,
        "pairs": len(pairs),
        "positives": int(sum(p[2] for p in pairs)),
        "reasons_neg_pos": reasons,
        "config": {k: v for k, v in config.to_dict().items() if v != getattr(TrainConfig(), k)},
        "best_epoch": result.best_epoch,
        "val_auc": [r.val_auc and round(r.val_auc, 3) for r in result.history],
        "selected": selected,
        "per_epoch": per_epoch,
        "averaged": averaged,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=Path, default=DEFAULT_FACES)
    parser.add_argument("--holdout", type=float, default=0.25)
    parser.add_argument("--labels", type=int, default=200, help="training pairs per set")
    parser.add_argument("--page", type=int, default=40, help="training pairs per queue page")
    parser.add_argument("--val-same", type=int, default=10)
    parser.add_argument("--val-different", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--distill-weight", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", action="append", default=[], help="set[:key=value,...] (repeatable)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    faces = load_faces(args.faces, args.holdout, args.seed)
    held = HeldOut(faces)
    sets = {
        "queue": queue_pairs(faces, args.labels, args.page, args.seed),
        "random": random_pairs(faces, args.labels, args.seed),
    }
    val = indexed(faces, val_pairs(faces, args.val_same, args.val_different, args.seed))
    base = {
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "distill_weight": args.distill_weight,
        "seed": args.seed,
    }
    counts = {name: int(np.sum(faces.split == name)) for name in ("train", "val", "test")}
    header = {
        "pool_faces": len(faces.identity),
        "splits": counts,
        "held_out_pairs": len(held.labels),
        "held_out_same": int(held.labels.sum()),
        "val_pairs": len(val),
        "base": held(base_model()),
    }
    print(json.dumps(header), flush=True)
    for text in args.run:
        torch.manual_seed(args.seed)
        print(json.dumps(run_one(text, faces, sets, val, held, base)), flush=True)


if __name__ == "__main__":
    main()
