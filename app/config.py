"""One settings class for the whole service, read from `MAGTUNE_*` environment variables."""

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.jobs.params import FinetuneParams
from app.review.selection import DEFAULT_LIKELY_SAME_SHARE
from app.splits import DEFAULT_SPLIT_FRACTIONS, validate_split_fractions


class Settings(BaseSettings):
    """Defaults give the embedded set-up: SQLite and the SQLAlchemy broker transport under `data_dir`."""

    model_config = SettingsConfigDict(env_prefix="MAGTUNE_", env_file=".env", extra="ignore")

    data_dir: Path = Path("magtune-data")
    database_url: str = ""
    broker_url: str = ""

    # uploads
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # Large non-JPEG decodes (over 4 MP) run at most this many at once (a 36 MP bitmap is ~110-150 MB);
    # an upload that waits longer than decode_wait_s for a slot gets 503 decoder-busy with Retry-After.
    max_concurrent_decodes: int = 2
    decode_wait_s: float = 30.0
    max_checkpoint_bytes: int = 2 * 1024 * 1024 * 1024
    max_feedback_batch: int = 10_000
    # Request bodies other than the two uploads, refused with 413 before they are read whole or parsed
    # (app/body_limit.py): the feedback batch (10,000 pairs with long labels fit) and every other route.
    max_batch_body_bytes: int = 8 * 1024 * 1024
    max_json_body_bytes: int = 64 * 1024
    # A body that stops arriving (a client that stalls, or one sending slowly on purpose) is cut off with
    # 408 body-timeout: a JSON body must arrive whole within this, an upload may pause this long at most.
    body_timeout_s: float = Field(default=30.0, gt=0)
    # Threads per api process for the synchronous endpoints (anyio's default is 40). Their work is Python
    # that holds the GIL between short database waits, so more threads than that keeps busy only queue on
    # the GIL, each request behind every other in flight. Two api processes on 2 cores, single feedback
    # posts, requests/s with 8 / 16 / 40 threads: 280 / 246 / 214 at 16 clients, 187 / 222 / 158 at 64
    # (bench/api_ingest.py's clients, one run each). 16 keeps room for slower requests; the rest wait
    # on the event loop.
    api_threads: int = Field(default=16, ge=1, le=1000)

    # splits of faces into train/val/test, from each face's content hash
    split_fractions: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SPLIT_FRACTIONS))

    # jobs
    job_max_attempts: int = 3
    job_heartbeat_interval_s: float = 10.0
    job_heartbeat_timeout_s: float = 120.0
    job_requeue_after_s: float = 300.0
    job_soft_time_limit_s: int = 6 * 3600
    job_time_limit_s: int = 6 * 3600 + 600
    sweep_interval_s: float = 30.0
    queue_name: str = "gpu"
    # Embedding on arrival: its own queue, so small jobs never wait behind a fine-tune, consumed by a worker
    # whose child process is reused (torch imported and models loaded once, not per job).
    embed_queue_name: str = "embed"
    embed_worker_max_tasks_per_child: int = 500
    # Torch threads of an `embed` job (0: torch's default, one per core). Its batches are small and it shares
    # the cores with the api; one thread avoids OpenMP's stalls when a sibling thread is descheduled (on a
    # busy 2-core machine, 64 faces took 1.7 s with one thread and 3.6 s with two).
    embed_torch_threads: int = 1
    # An embedding pass never moves a model's watermark (where `embed` jobs start scanning) past now minus
    # this: a face's created_at is set (by the api's clock) before its row commits, so faces this recent may
    # still be committing. Keep it above an upload's insert-to-commit time plus the api/worker clock skew.
    embed_watermark_lag_s: float = 60.0
    reindex_batch_size: int = 64
    # A reindex with more faces missing than this is split into chunks of this many faces (key ranges over
    # (created_at, id)) that every idle worker on its queue takes, one `magtune.reindex_chunk` task each.
    reindex_chunk_size: int = Field(default=2048, ge=1)

    # Key that signs list cursors (`next_cursor`). Every api process must share it, so each accepts the
    # others' cursors; empty (the default) derives it from `database_url`, which they share already.
    cursor_secret: str = ""

    # Access control (app/auth). Turning auth off is refused unless the api is bound to loopback.
    auth_disabled: bool = False
    # /docs, /redoc and /openapi.json: open by default; false removes them.
    docs_open: bool = True
    # Browser origins allowed to call the api (CORS), e.g. ["https://labels.example.org"]; empty: none.
    cors_origins: list[str] = Field(default_factory=list)
    # Abuse limits per key: writes (POST/PUT/PATCH/DELETE) a second in each api process, with a burst, and
    # jobs queued or running at once. 0 turns a limit off. Generous: a 10,000-pair import never meets them.
    write_rate_per_s: float = Field(default=1000.0, ge=0)
    write_burst: float = Field(default=2000.0, ge=1)
    max_active_jobs_per_key: int = Field(default=20, ge=0)
    # Where `magtune up` keeps the admin key it creates on first start (default: <data dir>/admin-key).
    admin_key_file: Path | None = None

    # promotion gate: the candidate may lose at most this much AUC on the regression set
    regression_auc_tolerance: float = 0.002
    # promotion gate: the least evidence it judges on (app/evidence.py); below it the gate refuses with
    # `not-enough-evidence` and the review queue asks for what is missing
    gate_min_test_same: int = Field(default=20, ge=0)
    gate_min_test_different: int = Field(default=20, ge=0)
    gate_min_regression_pairs: int = Field(default=20, ge=0)
    # promotion gate: the lower end of the 95% bootstrap interval of the test AUC difference (candidate −
    # parent, resampling faces) must be at least −this; the resamples and their seed
    gate_auc_tolerance: float = Field(default=0.002, ge=0, le=1)
    gate_bootstrap_samples: int = Field(default=1000, ge=100, le=100_000)
    gate_bootstrap_seed: int = Field(default=0, ge=0)

    # auto fine-tune policy (app/jobs/auto_finetune.py): once this many new usable training labels arrived
    # since the last fine-tune job was created, and none is queued or running, the sweeper queues one with
    # these params (the active model as base); 0 turns it off
    auto_finetune_after_labels: int = Field(default=0, ge=0)
    auto_finetune_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("auto_finetune_params")
    @classmethod
    def _valid_finetune_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "base_model" in value:
            raise ValueError("base_model is the active model when the policy queues a fine-tune")
        FinetuneParams.model_validate(value)
        return value

    # review queue (app/review): how long a leased pair is held, page size, and the bounded work per request
    review_lease_s: float = Field(default=900.0, gt=0)
    review_max_limit: int = Field(default=50, ge=1, le=500)
    review_sample_faces: int = Field(default=512, ge=2, le=20_000)  # random faces a request pairs up
    review_anchors: int = Field(default=48, ge=0, le=1000)  # training faces whose neighbours are searched
    review_neighbours: int = Field(default=8, ge=1, le=100)  # nearest neighbours per anchor
    review_uncertain_band: float = Field(default=0.08, gt=0, le=1)  # |score - threshold| of "uncertain"
    review_explore_share: float = Field(default=0.1, ge=0, le=1)  # training pairs drawn at random
    # most of a training page `likely-same` may take (app/review/selection.py says why none by default)
    review_likely_same_share: float = Field(default=DEFAULT_LIKELY_SAME_SHARE, ge=0, le=1)
    review_val_share: float = Field(default=0.1, ge=0, le=1)  # steady share of val pairs on every page
    review_evidence_max_share: float = Field(default=0.5, ge=0, le=1)  # cap on test pairs the gate needs
    # val pairs the queue gathers first (app/evidence.py val_needed): a fine-tune needs both labels in val
    review_min_val_same: int = Field(default=10, ge=0)
    review_min_val_different: int = Field(default=10, ge=0)
    review_seed: int | None = None  # fixed: the same stored state gives the same page (tests, benches)

    # job event streams (GET /v1/jobs/{id}/events): each poll opens a short session, none is held between
    job_events_poll_s: float = Field(default=0.5, gt=0, le=60)  # how often a stream reads its job row
    job_events_heartbeat_s: float = Field(default=15.0, gt=0, le=300)  # comment line when nothing changed
    job_events_max_streams: int = Field(default=100, ge=1, le=10_000)  # open at once per api process (503)
    job_events_max_lifetime_s: float = Field(default=900.0, gt=0)  # then the client resumes (Last-Event-ID)

    @field_validator("split_fractions")
    @classmethod
    def _valid_fractions(cls, value: dict[str, float]) -> dict[str, float]:
        return validate_split_fractions(value)

    @model_validator(mode="after")
    def _embedded_defaults(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'magtune.db').resolve()}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"
        return self

    @property
    def admin_key_path(self) -> Path:
        return self.admin_key_file or self.data_dir / "admin-key"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def cursor_key(self) -> bytes:
        """The HMAC key of list cursors: `cursor_secret`, or else one derived from `database_url`."""
        if self.cursor_secret:
            return self.cursor_secret.encode()
        return hashlib.sha256(b"magtune-cursor\0" + self.database_url.encode()).digest()

    @property
    def visibility_timeout_s(self) -> int:
        """Redis re-delivers an unacknowledged message after this; it must outlast the longest job."""
        return self.job_time_limit_s + 3600


@lru_cache
def get_settings() -> Settings:
    return Settings()
