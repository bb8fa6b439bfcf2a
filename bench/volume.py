"""The database at volume: the api's reads and writes against a million feedback pairs; prints JSON.

One fresh PostgreSQL database, migrated by `magtune migrate`, one `magtune serve` process and one sequential
keep-alive client. Single feedback posts are timed first on the empty database, then the database is seeded
(bench/volume_seed.py: 200,000 faces with real images in the blob store and 1,000,000 pairs, by COPY) and
every operation is timed against it:

- GET /v1/metrics (target p50 ≤ 50 ms);
- GET /v1/feedback and GET /v1/faces, the first page and a page deep in the list (target p50 ≤ 20 ms);
- POST /v1/feedback: a face's first label (a new face and a seeded one: the placement path, which reads the
  labelled faces per split) and a pair of two labelled faces (target p50 ≤ 1.5× the empty database's);
- the fine-tune's training set loaded by the worker's own loader (worker/jobs/data.py) in a child process:
  time and peak memory, with the images of `--decode-faces` faces decoded (all of them: `--decode-faces 0`);
- `magtune import` of `--import-pairs` pairs over `--import-images` new images: pairs/s.

For reference, the full counts the tallies replaced are timed once on the seeded database.

    python bench/volume.py [--faces 200000] [--pairs 1000000] [--samples 200] [--import-pairs 100000]
    python bench/volume.py --faces 2000 --pairs 10000 --import-pairs 2000     # a smoke run

Needs PostgreSQL (MAGTUNE_TEST_POSTGRES, an admin URL) and Redis (MAGTUNE_TEST_REDIS) like the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api_ingest import post_single, random_png, summary, timed, upload_faces
from processes import (
    api_key,
    free_port,
    fresh_database,
    libpq_url,
    load_averages,
    magtune,
    migrated_env,
    print_report,
    server,
    uptime,
)
from volume_seed import seed

METRICS_TARGET_P50_MS = 50.0
LIST_TARGET_P50_MS = 20.0
POST_TARGET_RATIO = 1.5
DEEP_SHARE = 0.9  # a deep page starts after this share of the list
WARMUP = 20
CURSOR_SECRET = "volume-bench-cursor-secret"
SCOPES = "faces:read,faces:write,feedback:read,feedback:write,metrics:read"
TRAINING_SIZE = 112  # the backbones' input side: what a fine-tune decodes its faces to


def sample(send: Callable[[], Any], count: int) -> dict[str, Any]:
    for _ in range(min(WARMUP, count)):
        send()
    return summary([timed(send) for _ in range(count)], 1)


def get_ok(client: Any, url: str, **params: Any) -> Callable[[], None]:
    def send() -> None:
        response = client.get(url, params=params)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:500]}")

    return send


def deep_cursor(database_url: str, table: str) -> str:
    """The cursor a client would hold after paging through DEEP_SHARE of `table`, newest first."""
    import psycopg

    from app.pagination import encode_cursor

    with psycopg.connect(libpq_url(database_url)) as conn:
        (total,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        created_at, row_id = conn.execute(
            f"SELECT created_at, id FROM {table} ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1",
            (int(total * DEEP_SHARE),),
        ).fetchone()
    return encode_cursor(CURSOR_SECRET.encode(), table, created_at, row_id)


def posts(client: Any, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Each pair posted once (labels alternate), after WARMUP of them; the rest timed."""
    latencies = []
    for index, pair in enumerate(pairs):
        took = timed(lambda p=pair, i=index: post_single(client, "/v1/feedback", p, i % 2))
        if index >= WARMUP:
            latencies.append(took)
    return summary(latencies, 1)


def full_counts_ms(database_url: str) -> dict[str, float]:
    """The counts the tallies replaced, each timed once: the old /v1/metrics and first-label queries."""
    import psycopg

    queries = {
        "feedback_by_split_and_label": "SELECT split, label, count(*) FROM feedback GROUP BY split, label",
        "faces_by_split": "SELECT split, count(*) FROM faces GROUP BY split",
        "labelled_faces_by_split": "SELECT split, count(*) FROM faces WHERE id IN "
        "(SELECT face_a FROM feedback UNION SELECT face_b FROM feedback) GROUP BY split",
    }
    times = {}
    with psycopg.connect(libpq_url(database_url)) as conn:
        for name, query in queries.items():
            times[name] = round(1000 * timed(lambda q=query: conn.execute(q).fetchall()), 1)
    return times


def seeded_pairs(database_url: str, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """`count` pairs of seeded faces that share a split and are not paired yet: two labelled faces."""
    import psycopg

    with psycopg.connect(libpq_url(database_url)) as conn:
        faces = conn.execute(
            "SELECT id::text FROM faces WHERE split = 'train' AND source = 'volume-seed'"
        ).fetchall()
        stored = {tuple(row) for row in conn.execute("SELECT face_a::text, face_b::text FROM feedback")}
    chosen: list[tuple[str, str]] = []
    while len(chosen) < count:
        (a,), (b,) = rng.sample(faces, 2)
        if a != b and (min(a, b), max(a, b)) not in stored:
            chosen.append((a, b))
            stored.add((min(a, b), max(a, b)))
    return chosen


def run_import(
    env: dict[str, str], api_url: str, key: str, tmp: Path, pairs: int, images: int
) -> dict[str, Any]:
    """`magtune import` of `pairs` distinct pairs over `images` new images, timed end to end."""
    folder = tmp / "import"
    folder.mkdir()
    rng = random.Random(21)
    for index in range(images):
        (folder / f"{index}.png").write_bytes(random_png(rng))
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < pairs:
        x, y = rng.randrange(images), rng.randrange(images)
        if x != y:
            chosen.add((min(x, y), max(x, y)))
    rows = [{"image1": f"{x}.png", "image2": f"{y}.png", "label": (x + y) % 2} for x, y in sorted(chosen)]
    (folder / "pairs.json").write_text(json.dumps(rows))
    command = magtune("import", str(folder / "pairs.json"), "--api", api_url, "--json")
    started = time.perf_counter()
    done = subprocess.run(command, env={**env, "MAGTUNE_API_KEY": key}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"magtune import failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    return {
        "pairs": pairs,
        "images": images,
        "seconds": round(seconds, 1),
        "pairs_per_s": round(pairs / seconds, 1),
        "created": result["pairs"]["created"],
        "faces_uploaded": result["faces"]["created"],
    }


def load_training_set(env: dict[str, str], decode_faces: int) -> dict[str, Any]:
    """The worker's loader in a child process of its own, so that its peak memory is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--load-training-set", str(decode_faces)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def training_set_child(decode_faces: int) -> dict[str, Any]:
    """What `_load_pairs` in worker/jobs/finetune.py does: every pair and digest, then the faces' images."""
    from app.blobs import BlobStore
    from app.config import get_settings
    from app.db import session_scope
    from worker.jobs.data import decode_faces as decode
    from worker.jobs.data import face_digests, load_feedback

    settings = get_settings()
    started = time.perf_counter()
    with session_scope(settings.database_url) as session:
        sets = load_feedback(session)
        digests = face_digests(session)
    rows_s = time.perf_counter() - started
    rows_rss = peak_rss_mb()
    faces = list(sets.faces(*sets.pairs))
    chosen = faces if decode_faces <= 0 else faces[:decode_faces]
    started = time.perf_counter()
    decode(BlobStore(settings.blob_dir), digests, chosen, size=TRAINING_SIZE)
    decode_s = time.perf_counter() - started
    per_face_s = decode_s / max(1, len(chosen))
    return {
        "pairs_loaded": sum(len(rows) for rows in sets.pairs.values()),
        "unused_pairs": sets.unused,
        "faces_named": len(faces),
        "rows_and_digests_s": round(rows_s, 2),
        "peak_rss_after_rows_mb": rows_rss,
        "faces_decoded": len(chosen),
        "decode_s": round(decode_s, 2),
        "peak_rss_mb": peak_rss_mb(),
        "decode_ms_per_face": round(1000 * per_face_s, 3),
        "all_faces_decode_s_projected": round(per_face_s * len(faces), 1),
        "all_faces_pixels_mb": round(len(faces) * 3 * TRAINING_SIZE**2 / 2**20, 1),
    }


def judge(report: dict[str, Any]) -> None:
    """Each figure beside its target: `meets_target`."""
    metrics, lists, post = report["metrics"], report["lists"], report["single_post"]
    metrics["meets_target"] = metrics["p50_ms"] <= METRICS_TARGET_P50_MS
    pages = [value for value in lists.values() if isinstance(value, dict)]
    lists["meets_target"] = all(page["p50_ms"] <= LIST_TARGET_P50_MS for page in pages)
    post["meets_target"] = max(post["first_label_ratio"], post["both_labelled_ratio"]) <= POST_TARGET_RATIO


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    rng = random.Random(3)
    report: dict[str, Any] = {
        "benchmark": "volume",
        "uptime_at_start": uptime(),
        "load_average_start": load_averages(),
    }
    with (
        tempfile.TemporaryDirectory(prefix="magtune-volume-") as tmp,
        fresh_database("magtune_volume_") as url,
    ):
        env = migrated_env(url, tmp, MAGTUNE_CURSOR_SECRET=CURSOR_SECRET)
        key = api_key(env, SCOPES)
        port = free_port()
        api_url = f"http://127.0.0.1:{port}"
        command = magtune("serve", "--host", "127.0.0.1", "--port", str(port))
        with (
            server(command, env, f"{api_url}/readyz", Path(tmp) / "api.log"),
            httpx.Client(base_url=api_url, timeout=600, headers={"Authorization": f"Bearer {key}"}) as client,
        ):
            count = args.samples + WARMUP
            fresh = upload_faces(client, 3 * count)
            empty = posts(client, list(zip(fresh[:count], fresh[count : 2 * count], strict=True)))
            print("seeding…", file=sys.stderr)
            report["seeding"] = seed(url, Path(tmp) / "data" / "blobs", faces=args.faces, pairs=args.pairs)
            report["full_counts_replaced_ms"] = full_counts_ms(url)
            n = args.samples
            report["metrics"] = {
                **sample(get_ok(client, "/v1/metrics"), n),
                "target_p50_ms": METRICS_TARGET_P50_MS,
            }
            lists = {}
            for table, path in (("feedback", "/v1/feedback"), ("faces", "/v1/faces")):
                lists[f"{table}_first_page"] = sample(get_ok(client, path), n)
                lists[f"{table}_deep_page"] = sample(get_ok(client, path, cursor=deep_cursor(url, table)), n)
            report["lists"] = {
                **lists,
                "page_size": 50,
                "deep_share": DEEP_SHARE,
                "target_p50_ms": LIST_TARGET_P50_MS,
            }
            seeded = seeded_pairs(url, 2 * count, rng)
            first_label = posts(
                client,
                [(face, other) for face, (other, _) in zip(fresh[2 * count :], seeded[:count], strict=True)],
            )
            labelled = posts(client, seeded[count:])
            report["single_post"] = {
                "empty_database": empty,
                "seeded_first_label": first_label,
                "seeded_both_labelled": labelled,
                "first_label_ratio": round(first_label["p50_ms"] / empty["p50_ms"], 3),
                "both_labelled_ratio": round(labelled["p50_ms"] / empty["p50_ms"], 3),
                "target_ratio": POST_TARGET_RATIO,
            }
            print("loading the training set…", file=sys.stderr)
            report["training_set"] = load_training_set(env, args.decode_faces)
            print("importing…", file=sys.stderr)
            report["import"] = run_import(env, api_url, key, Path(tmp), args.import_pairs, args.import_images)
    judge(report)
    report.update(faces=args.faces, pairs=args.pairs, cpu_count=os.cpu_count())
    report["uptime_at_end"] = uptime()
    report["load_average_end"] = load_averages()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=200_000)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=200, help="timed requests per operation")
    parser.add_argument(
        "--decode-faces", type=int, default=20_000, help="faces decoded by the loader (0: all)"
    )
    parser.add_argument("--import-pairs", type=int, default=100_000)
    parser.add_argument("--import-images", type=int, default=1_000)
    parser.add_argument("--load-training-set", type=int, metavar="DECODE_FACES", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_training_set is not None:
        print(json.dumps(training_set_child(args.load_training_set)))
        return
    print_report(run(args))


if __name__ == "__main__":
    main()
