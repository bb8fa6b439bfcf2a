"""Active learning against random labelling: simulated reviewers label, the service fine-tunes and gates.

A labelled face set laid out as `<identity>/<image>` (default: the hard CMU set in ../shared) is cut, per
identity and with a fixed seed, into held-out faces (`--holdout`, never uploaded) and a pool (uploaded, with
no subject: the identity is known only to the simulated reviewer). For each strategy the service runs as real
processes (`magtune serve`, a gpu worker, an embed worker) on a fresh PostgreSQL database and Redis, the
checkpoint is registered and activated, and then each round:

1. a page of `--page` pairs is labelled from the folder names:
   - `queue`: the review queue's pairs (`POST /v1/review/leases`), each answered with its `lease_id`;
   - `random`: pairs drawn uniformly among the unlabelled pairs whose faces share a split;
   - `random-training` (with `--strategies`): the queue's page with its training pairs swapped for pairs
     drawn uniformly among the unlabelled training pairs; its val and test pairs are the queue's, answered
     with their leases. On a set where same-person pairs are rare, `random` may gather too few same pairs
     in val to fine-tune at all; this arm isolates what the queue's choice of training pairs is worth;
2. a fine-tune of the serving model is queued with auto-promotion, and the promotion gate decides;
3. the serving model (downloaded from the service) is scored on every pair of the held-out faces.

Both strategies get the same pool, held-out faces, budget, fine-tune parameters and seed. Reported as JSON,
per label count: held-out AUC, EER and TAR@FAR=1e-2 of the serving model, and each gate decision; plus
`label_ratio_to_match_random`: the labels the queue needed to reach random's final held-out EER divided by the
labels random used (null when the queue never reached it), and whether at equal labels the queue's EER was
never worse.

    python bench/active_learning.py [--faces DIR] [--rounds 6] [--page 40] [--epochs 6]
        [--selection interpolate] [--seed 0] [--strategies queue,random,random-training]

Target: label_ratio_to_match_random ≤ 0.5 and the queue never worse at equal labels.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import (
    free_port,
    fresh_database,
    load_averages,
    magtune,
    migrated_env,
    print_report,
    server,
    uptime,
    wait_job,
    worker,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MAGTUNE_SHARED_DIR", REPO_ROOT.parent / "shared"))
DEFAULT_FACES = SHARED_DIR / "data" / "faces" / "cmu" / "aligned_112"
DEFAULT_CHECKPOINT = SHARED_DIR / "models" / "mobilefacenet" / "mobilefacenet.pt"
TARGET_LABEL_RATIO = 0.5
STRATEGIES = ("queue", "random")
OPTIONAL_STRATEGIES = ("random-training",)
SCOPES = (
    "faces:read",
    "faces:write",
    "feedback:write",
    "review",
    "jobs:read",
    "jobs:write",
    "models:read",
    "models:write",
    "models:activate",
    "metrics:read",
)


@dataclass(frozen=True)
class FaceSet:
    pool: list[tuple[Path, str]]  # uploaded: (file, identity)
    held_out: list[tuple[Path, str]]  # never uploaded: the measure


def read_faces(folder: Path, holdout: float, seed: int) -> FaceSet:
    """Every identity keeps `holdout` of its images out of the service (at least one, when it has two)."""
    rng = random.Random(seed)
    pool, held_out = [], []
    identities = sorted(p for p in folder.iterdir() if p.is_dir())
    for identity in identities:
        files = sorted(p for p in identity.iterdir() if p.is_file())
        rng.shuffle(files)
        cut = max(1, round(len(files) * holdout)) if len(files) > 1 else 0
        held_out += [(f, identity.name) for f in files[:cut]]
        pool += [(f, identity.name) for f in files[cut:]]
    if len(identities) < 2 or not held_out:
        raise SystemExit(f"{folder} needs at least two identities with two images each")
    return FaceSet(pool=pool, held_out=held_out)


# The measure: the serving model's checkpoint, scored on every pair of the held-out faces.


class HeldOutMeasure:
    def __init__(self, faces: list[tuple[Path, str]], arch: str) -> None:
        import numpy as np
        import torch

        from worker.ml.preprocessing import decode_image, preprocess_spec_for

        self.spec = preprocess_spec_for(arch)
        self.arch = arch
        self.pixels = torch.stack(
            [decode_image(f.read_bytes(), size=self.spec.size).pixels for f, _ in faces]
        )
        identities = [identity for _, identity in faces]
        first, second = np.triu_indices(len(faces), 1)
        self.first, self.second = first, second
        names = np.array(identities)
        self.labels = (names[first] == names[second]).astype(int)
        self._cache: dict[str, dict[str, Any]] = {}

    def __call__(self, model_id: str, checkpoint: bytes) -> dict[str, Any]:
        if model_id not in self._cache:
            self._cache[model_id] = self._measure(checkpoint)
        return self._cache[model_id]

    def _measure(self, checkpoint: bytes) -> dict[str, Any]:
        from worker.ml.checkpoints import load_backbone
        from worker.ml.embedding import embed_pixels
        from worker.ml.metrics import pair_metrics

        with tempfile.NamedTemporaryFile(suffix=".pt") as file:
            file.write(checkpoint)
            file.flush()
            model = load_backbone(Path(file.name), self.arch).model.eval()
        embeddings = embed_pixels(
            model, self.spec, self.pixels, batch_size=64, device="cpu"
        ).embeddings.numpy()
        scores = (embeddings[self.first] * embeddings[self.second]).sum(axis=1)
        metrics = pair_metrics(scores, self.labels, None)
        eer = metrics["eer"]["eer"] if isinstance(metrics["eer"], dict) else metrics["eer"]
        tar = {entry["far_target"]: entry["tar"] for entry in metrics["tar_at_far"]}
        return {
            "auc": round(metrics["roc_auc"], 4),
            "eer": round(eer, 4),
            "tar_at_far_1e-2": None if tar.get(0.01) is None else round(tar[0.01], 4),
        }


# The service.


def wait_for(client: Any, job_id: str) -> dict[str, Any]:
    """A job of the loop (a fine-tune on CPU may take many minutes on a busy machine)."""
    return wait_job(client, job_id, timeout_s=1800, poll_s=0.5)


def expect(response: Any, *codes: int) -> Any:
    if response.status_code not in codes:
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
        )
    return response.json() if response.content else None


def upload_pool(client: Any, pool: list[tuple[Path, str]]) -> dict[str, str]:
    """Face id → identity. No subject is sent: the service must not see the answers."""
    identity_of = {}
    for path, identity in pool:
        face = expect(
            client.post("/v1/faces", files={"file": (path.name, path.read_bytes(), "image/png")}), 200, 201
        )
        identity_of[str(face["id"])] = identity
    return identity_of


def register_and_activate(client: Any, checkpoint: Path, arch: str) -> str:
    files = {"file": (checkpoint.name, checkpoint.read_bytes(), "application/octet-stream")}
    model = expect(client.post("/v1/models", files=files, data={"arch": arch}), 201, 202)
    if wait_for(client, model["validation_job_id"])["status"] != "succeeded":
        raise RuntimeError("the checkpoint did not validate")
    activation = expect(
        client.post(f"/v1/models/{model['id']}/activate", json={"reason": "bench"}), 200, 201, 202
    )
    wait_for(client, activation["reindex_job_id"])
    return str(model["id"])


def serving_model(client: Any) -> str:
    return str(expect(client.get("/v1/metrics"), 200)["serving_model"]["id"])


def bench_key(env: dict[str, str]) -> str:
    """A key with the scopes a reviewer and an operator need, made as an operator would."""
    import json
    import subprocess

    created = subprocess.run(
        magtune("keys", "create", "--name", "active-learning bench", "--scopes", ",".join(SCOPES), "--json"),
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return str(json.loads(created.stdout)["key"])


class Labeller:
    """Answers pairs from the identities, and remembers what was labelled (in either order)."""

    def __init__(self, identity_of: dict[str, str]) -> None:
        self.identity_of = identity_of
        self.labelled: set[frozenset[str]] = set()
        self.same = 0
        self.reasons: dict[str, dict[str, list[int]]] = {}  # split -> reason -> [different, same]

    def answer(self, a: str, b: str, split: str = "?", reason: str = "random") -> int:
        self.labelled.add(frozenset((a, b)))
        label = int(self.identity_of[a] == self.identity_of[b])
        self.same += label
        self.reasons.setdefault(split, {}).setdefault(reason, [0, 0])[label] += 1
        return label


def queue_page(client: Any, labeller: Labeller, size: int) -> int:
    given = 0
    while given < size:
        page = expect(client.post("/v1/review/leases", json={"limit": min(50, size - given)}), 200)
        if not page["items"]:
            break
        for pair in page["items"]:
            a, b = str(pair["face_a"]["id"]), str(pair["face_b"]["id"])
            label = labeller.answer(a, b, pair["split"], pair["reason"])
            body = {"face_a": a, "face_b": b, "label": label, "lease_id": pair["lease_id"]}
            expect(client.post("/v1/feedback", json=body), 200, 201)
            given += 1
    return given


def random_training_page(client: Any, labeller: Labeller, size: int, rng: random.Random) -> int:
    """The queue's page, its training pairs released unanswered and replaced by random training pairs."""
    page = expect(client.post("/v1/review/leases", json={"limit": min(50, size)}), 200)
    given = 0
    for pair in page["items"]:
        if pair["split"] == "train":
            expect(client.delete(f"/v1/review/leases/{pair['lease_id']}"), 204)
            continue
        a, b = str(pair["face_a"]["id"]), str(pair["face_b"]["id"])
        label = labeller.answer(a, b, pair["split"], pair["reason"])
        body = {"face_a": a, "face_b": b, "label": label, "lease_id": pair["lease_id"]}
        expect(client.post("/v1/feedback", json=body), 200, 201)
        given += 1
    return given + random_page(client, labeller, size - given, rng, only="train")


def face_splits(client: Any) -> dict[str, str]:
    splits, cursor = {}, None
    while True:
        params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = expect(client.get("/v1/faces", params=params), 200)
        splits.update({str(face["id"]): face["split"] for face in page["items"]})
        cursor = page.get("next_cursor")
        if not cursor:
            return splits


def random_page(
    client: Any, labeller: Labeller, size: int, rng: random.Random, only: str | None = None
) -> int:
    """Uniform among the unlabelled pairs whose faces share a split (split `only`, when given). Splits are
    read once a page: a pair within one split moves no face (only a face paired across splits without a
    label yet may move)."""
    by_split: dict[str, list[str]] = {}
    for face, split in face_splits(client).items():
        if only is None or split == only:
            by_split.setdefault(split, []).append(face)
    candidates = [
        (a, b, split)
        for split, faces in by_split.items()
        for a, b in itertools.combinations(sorted(faces), 2)
        if frozenset((a, b)) not in labeller.labelled
    ]
    chosen = rng.sample(candidates, min(size, len(candidates)))
    for a, b, split in chosen:
        body = {"face_a": a, "face_b": b, "label": labeller.answer(a, b, split), "source": "random"}
        expect(client.post("/v1/feedback", json=body), 200, 201)
    return len(chosen)


def run_strategy(
    strategy: str, args: argparse.Namespace, faces: FaceSet, measure: HeldOutMeasure
) -> dict[str, Any]:
    import httpx

    rng = random.Random(args.seed)
    rounds: list[dict[str, Any]] = []
    params = {
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "distill_weight": args.distill_weight,
        "selection": args.selection,
        "seed": args.seed,
        "auto_promote": True,
    }
    with fresh_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        env = migrated_env(database_url, tmp, MAGTUNE_REVIEW_SEED=str(args.seed), **dict(args.setting))
        headers = {"Authorization": f"Bearer {bench_key(env)}"}
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        logs = Path(tmp)
        embed_queue = env.get("MAGTUNE_EMBED_QUEUE_NAME", "embed")
        with (
            server(magtune("serve", "--port", str(port)), env, f"{base}/readyz", logs / "api.log"),
            worker(magtune("worker"), env, logs / "worker.log"),
            worker(magtune("worker", "--queue", embed_queue), env, logs / "embed.log"),
            httpx.Client(base_url=base, timeout=120, headers=headers) as client,
        ):
            labeller = Labeller(upload_pool(client, faces.pool))
            serving = register_and_activate(client, args.checkpoint, args.arch)
            figures = measure(serving, client.get(f"/v1/models/{serving}/checkpoint").content)
            rounds.append({"round": 0, "labels": 0, "serving": figures, "candidate": None, "gate": None})
            labels = 0
            for number in range(1, args.rounds + 1):
                started = time.monotonic()
                if strategy == "queue":
                    labels += queue_page(client, labeller, args.page)
                elif strategy == "random-training":
                    labels += random_training_page(client, labeller, args.page, rng)
                else:
                    labels += random_page(client, labeller, args.page, rng)
                job = expect(client.post("/v1/jobs", json={"kind": "finetune", "params": params}), 202)
                job = wait_for(client, str(job["id"]))
                result = job.get("result") or {}
                gate = result.get("gate") or {}
                if result.get("reindex_job_id"):
                    wait_for(client, str(result["reindex_job_id"]))
                candidate = None
                if result.get("model_id"):
                    child = str(result["model_id"])
                    candidate = measure(child, client.get(f"/v1/models/{child}/checkpoint").content)
                serving = serving_model(client)
                row = {
                    "round": number,
                    "labels": labels,
                    "same_labels": labeller.same,
                    "serving": measure(serving, client.get(f"/v1/models/{serving}/checkpoint").content),
                    "candidate": candidate,
                    "training": {
                        "pairs": (result.get("dataset_snapshot") or {}).get("pairs"),
                        "best_epoch": result.get("best_epoch"),
                        "val_auc": [
                            None if r.get("val_auc") is None else round(r["val_auc"], 3)
                            for r in result.get("history", [])
                        ],
                    },
                    "labels_by_reason": labeller.reasons,
                    "job_status": job["status"],
                    "job_error": job.get("error"),
                    "gate": {
                        "promoted": bool(gate.get("promoted")),
                        "refusals": gate.get("refusals", []),
                        "needed": (gate.get("evidence") or {}).get("needed"),
                        "test_auc_difference": ((gate.get("intervals") or {}).get("test") or {}).get(
                            "roc_auc"
                        ),
                    },
                    "seconds": round(time.monotonic() - started, 1),
                }
                print(f"{strategy} {row}", file=sys.stderr, flush=True)
                rounds.append(row)
    return {"rounds": rounds}


def labels_to_reach(rounds: list[dict[str, Any]], figure: str, eer: float) -> int | None:
    """The first label count (after labelling: round 0 is the untouched base) whose figure reaches `eer`."""
    return next(
        (row["labels"] for row in rounds if row["labels"] > 0 and row[figure] and row[figure]["eer"] <= eer),
        None,
    )


def compare(queue: list[dict[str, Any]], rand: list[dict[str, Any]], figure: str) -> dict[str, Any]:
    """`figure`: "serving" (what the service answers with, after the gate) or "candidate" (each round's
    fine-tune, promoted or not: what the labels bought)."""
    measured_random = [row for row in rand if row[figure] and row["labels"] > 0]
    if not measured_random:
        return {"label_ratio_to_match_random": None, "note": "random produced no measured model"}
    final_random = measured_random[-1]
    # Matching a random arm that never got better than the base model (no candidate, nothing promoted)
    # says nothing about the queue: the target needs random to have improved on the start.
    start_eer = rand[0]["serving"]["eer"]
    random_improved = final_random[figure]["eer"] < start_eer
    needed = labels_to_reach(queue, figure, final_random[figure]["eer"])
    ratio = (
        None if needed is None or final_random["labels"] == 0 else round(needed / final_random["labels"], 3)
    )
    at_equal = [
        (q[figure]["eer"], r[figure]["eer"])
        for q, r in zip(queue, rand, strict=False)
        if q["labels"] == r["labels"] and q[figure] and r[figure]
    ]
    never_worse = all(q <= r for q, r in at_equal)
    return {
        "random_final_eer": final_random[figure]["eer"],
        "random_labels": final_random["labels"],
        "queue_labels_to_reach_it": needed,
        "label_ratio_to_match_random": ratio,
        "queue_never_worse_at_equal_labels": never_worse,
        "random_improved_on_base": random_improved,
        "meets_target": random_improved and ratio is not None and ratio <= TARGET_LABEL_RATIO and never_worse,
    }


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    queue, rand = results["queue"]["rounds"], results["random"]["rounds"]
    return {figure: compare(queue, rand, figure) for figure in ("serving", "candidate")}


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so the service's processes (own sessions) and the database go with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=Path, default=DEFAULT_FACES, help="a folder of <identity>/<image>")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--arch", default="mobilefacenet")
    parser.add_argument("--holdout", type=float, default=0.25, help="share of each identity never uploaded")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--page", type=int, default=40, help="labels per round")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--distill-weight", type=float, default=0.1)
    parser.add_argument(
        "--selection",
        choices=("val", "interpolate"),
        default="interpolate",
        help="the fine-tune's choice of weights: val's best epoch, or halfway from the parent to the last "
        "epoch (val sets of a few same pairs cannot pick an epoch; README, fine-tuning)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"comma-separated, of {', '.join(STRATEGIES + OPTIONAL_STRATEGIES)}",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        help="MAGTUNE_X=value for the service (repeatable)",
    )
    args = parser.parse_args()
    faces = read_faces(args.faces, args.holdout, args.seed)
    measure = HeldOutMeasure(faces.held_out, args.arch)
    report: dict[str, Any] = {
        "faces": str(args.faces),
        "pool_faces": len(faces.pool),
        "held_out_faces": len(faces.held_out),
        "held_out_pairs": len(measure.labels),
        "held_out_same_pairs": int(measure.labels.sum()),
        "budget": {"rounds": args.rounds, "page": args.page, "seed": args.seed},
        "finetune": {
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "distill_weight": args.distill_weight,
            "selection": args.selection,
        },
        "load_before": load_averages(),
    }
    results = {
        strategy: run_strategy(strategy, args, faces, measure) for strategy in args.strategies.split(",")
    }
    report["strategies"] = results
    if set(STRATEGIES) <= set(results):
        report["summary"] = summary(results)
    if {"queue", "random-training"} <= set(results):
        queue, rand = results["queue"]["rounds"], results["random-training"]["rounds"]
        report["summary_against_random_training"] = {
            figure: compare(queue, rand, figure) for figure in ("serving", "candidate")
        }
    report["load_after"] = load_averages()
    report["uptime"] = uptime()
    print_report(report)


if __name__ == "__main__":
    main()
