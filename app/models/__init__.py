"""The model registry: checkpoints, their lineage and evaluations, and which one is in service."""
