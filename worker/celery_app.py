"""The worker's Celery app: `celery -A worker.celery_app worker -Q gpu -c 1` (or `-Q embed`).

The configuration comes from `app.queue.make_celery`, shared with the api that sends the messages. This module
and `worker.tasks` import neither torch nor `worker.ml`: the parent process that consumes messages never
touches CUDA, and each job's child process (one task per child) loads torch for itself.
"""

from app.config import get_settings
from app.queue import make_celery, task_routes

celery_app = make_celery(get_settings(), name="magtune-worker")
celery_app.conf.include = ["worker.tasks"]
celery_app.conf.task_routes = task_routes(get_settings())

app = celery_app  # the name `celery -A worker.celery_app` looks for first
