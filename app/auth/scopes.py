"""The scopes an API key can hold; each route needs exactly one of them (app.auth.dependencies.requires)."""

from enum import StrEnum


class Scope(StrEnum):
    FACES_READ = "faces:read"
    FACES_WRITE = "faces:write"
    FEEDBACK_READ = "feedback:read"
    FEEDBACK_WRITE = "feedback:write"
    REVIEW = "review"
    JOBS_READ = "jobs:read"
    JOBS_WRITE = "jobs:write"
    MODELS_READ = "models:read"
    MODELS_WRITE = "models:write"
    MODELS_ACTIVATE = "models:activate"
    METRICS_READ = "metrics:read"
    ADMIN = "admin"


ALL_SCOPES: tuple[Scope, ...] = tuple(Scope)
