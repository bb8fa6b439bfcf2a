"""finetune: train a child of a ready model on the feedback, register it, judge it against its parent.

The steps, each visible in the job's progress phase:

1. loading: the parent checkpoint and the feedback sets (see worker.jobs.data: train without regression
   faces, val for model selection and the threshold, test and regression for judging), each face decoded once.
2. train / epoch: worker.ml.training.finetune, cancellable between steps. The trainer state is saved at every
   epoch end (worker.jobs.training_state) and a retry resumes after the last saved epoch; the state is
   removed when the job ends, however it ends (worker.runtime, and the sweeper for jobs it ends itself).
3. saving: the best epoch's weights in MagFace's layout with their metadata, into the blob store, and a
   `ready` ModelVersion with its lineage, hyper-parameters and a snapshot of the feedback. A job registers
   one child at most (a unique index on `models.created_by_job_id`): a retry whose earlier attempt got this
   far (its worker died while evaluating, say) skips training and judges that child.
4. evaluating: parent and candidate on the same test pairs and, when there is one, the regression set.
5. gating: worker.jobs.gate; with `auto_promote` and a pass, the candidate is activated (which queues a
   reindex of every face with it).

Each step's wall and CPU seconds go into the result's `phases` (worker.jobs.phases).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from torch import nn

from app.blobs import StoredBlob
from app.domain import ModelStatus
from app.evidence import EvidenceCounts, EvidenceMinimums, evidence_report
from app.models.service import drop_checkpoint_if_unused
from app.problems import Problem
from app.tables import ModelVersion, utcnow
from worker.jobs import gate
from worker.jobs.comparison import bootstrap_config, compare_on
from worker.jobs.data import (
    REGRESSION,
    FeedbackSets,
    decode_faces,
    face_digests,
    has_both_labels,
    indexed_pairs,
    label_counts,
    load_feedback,
)
from worker.jobs.phases import PhaseClock
from worker.jobs.registry import LoadedModel, blob_store, load_model, model_row, threshold_for
from worker.jobs.training_state import fingerprint, load_state, save_state
from worker.ml.checkpoints import write_checkpoint
from worker.ml.embedding import select_device
from worker.ml.pairs import IndexedPairs
from worker.ml.training import FinetuneResult, TrainConfig, TrainingCancelled, TrainProgress, finetune
from worker.runtime import JobCancelled, JobContext, JobFailed

ACTOR = "finetune-job"


@dataclass
class PairSets:
    sets: FeedbackSets
    indexed: dict[str, IndexedPairs]  # train, val, test, regression (empty sets included)


def train_config(params: dict[str, Any]) -> TrainConfig:
    """The job's params over the training library's defaults (the api has already validated them)."""
    keys = (
        "epochs",
        "learning_rate",
        "batch_size",
        "margin",
        "seed",
        "patience",
        "distill_weight",
        "freeze_stem",
        "selection",
        "interpolation",
    )
    return TrainConfig(**{key: params[key] for key in keys if params.get(key) is not None})


def _not_enough(detail: str) -> JobFailed:
    return JobFailed("not-enough-feedback", "Not enough feedback to fine-tune", detail)


def _load_pairs(ctx: JobContext, size: int) -> PairSets:
    with ctx.session() as session:
        sets = load_feedback(session)
        digests = face_digests(session)
    train, val = sets.pairs["train"], sets.pairs["val"]
    if not train:
        excluded = sets.excluded.get("train", 0)
        named = f" ({excluded} name regression faces, which are never trained on)" if excluded else ""
        raise _not_enough(f"no train pairs{named}")
    if not has_both_labels(val):
        counts = label_counts(val)
        raise _not_enough(
            "val needs both same and different pairs to select the model and calibrate its threshold; "
            f"it has {counts['same']} same and {counts['different']} different"
        )
    pixels = decode_faces(blob_store(ctx.settings), digests, sets.faces(*sets.pairs), size=size)
    return PairSets(sets, {name: indexed_pairs(rows, pixels) for name, rows in sets.pairs.items()})


def _train(
    ctx: JobContext, parent: LoadedModel, data: PairSets, config: TrainConfig, feedback_sha256: str
) -> tuple[Any, FinetuneResult, int]:
    """Train (or go on training) a copy of the parent; also the epoch an earlier attempt had reached."""
    backbone = copy.deepcopy(parent.backbone)
    start = fingerprint(
        parent_sha256=parent.sha256, hyperparameters=config.to_dict(), feedback_sha256=feedback_sha256
    )
    resume = load_state(ctx, start)

    def report(update: TrainProgress) -> None:
        ctx.progress(force=update.phase == "epoch" or update.step in (1, update.steps), **asdict(update))

    try:
        result = finetune(
            backbone,
            parent.spec,
            data.indexed["train"],
            data.indexed["val"],
            config,
            progress=report,
            should_cancel=ctx.should_cancel,
            device=select_device(),
            progress_interval=ctx.timings.progress_interval_s,
            resume=resume,
            on_epoch_end=lambda state: save_state(ctx, state, start),
        )
    except TrainingCancelled as exc:
        raise JobCancelled(str(exc)) from exc
    return backbone, result, resume.epoch if resume is not None else 0


def _store_checkpoint(
    ctx: JobContext, backbone: nn.Module, metadata: dict[str, Any], *, arch: str, epoch: int
) -> StoredBlob:
    """Serialise the checkpoint once, straight into the blob store, hashed as it is written.

    A retry that produces the same bytes finds the blob already there and keeps that one.
    """
    with blob_store(ctx.settings).staging("checkpoints") as staged:
        write_checkpoint(staged, backbone, arch=arch, epoch=epoch, metadata=metadata)
        return staged.commit()


@dataclass
class Training:
    """What the job reports about training; read back from the child's checkpoint on a retry."""

    best_epoch: int
    threshold: float | None
    history: list[dict[str, Any]]
    stopped_early: bool

    @classmethod
    def of(cls, result: FinetuneResult) -> Training:
        history = [record.to_dict() for record in result.history]
        return cls(result.best_epoch, result.threshold, history, result.stopped_early)

    def to_metadata(self) -> dict[str, Any]:
        return {"history": self.history, "stopped_early": self.stopped_early}


def _registered_child(ctx: JobContext) -> tuple[LoadedModel, Training, dict[str, Any]] | None:
    """The child an earlier attempt of this job registered, its training figures and feedback snapshot."""
    with ctx.session() as session:
        statement = select(ModelVersion).where(ModelVersion.created_by_job_id == ctx.job.id)
        row = session.scalars(statement).first()
        if row is None:
            return None
        snapshot = dict(row.dataset_snapshot or {})
        child = load_model(ctx.settings, row)
    metadata = child.metadata
    training = Training(
        best_epoch=int(metadata.get("best_epoch", 0)),
        threshold=child.threshold,
        history=list(metadata.get("history", [])),
        stopped_early=bool(metadata.get("stopped_early", False)),
    )
    return child, training, snapshot


def _register(
    ctx: JobContext,
    parent: LoadedModel,
    backbone: nn.Module,
    result: FinetuneResult,
    config: TrainConfig,
    snapshot: dict[str, Any],
) -> LoadedModel:
    """Save the best weights and register them as a ready child of `parent`."""
    metadata = {
        "preprocess": parent.spec.to_dict(),
        "threshold": result.threshold,
        "threshold_source": "val",
        "parent_sha256": parent.sha256,
        "parent_model_id": str(parent.id),
        "job_id": str(ctx.job.id),
        "hyperparameters": config.to_dict(),
        "best_epoch": result.best_epoch,
        "feedback_ids_sha256": snapshot["feedback_ids_sha256"],
        **Training.of(result).to_metadata(),
    }
    blob = _store_checkpoint(ctx, backbone, metadata, arch=parent.arch, epoch=result.best_epoch)
    try:
        return _insert_child(ctx, parent, backbone, blob, result, config, snapshot)
    except IntegrityError:
        # Another attempt of this job registered first: judge its child, drop these bytes if unused.
        earlier = _registered_child(ctx)
        if earlier is None:
            raise
        with ctx.session() as session:
            drop_checkpoint_if_unused(session, blob_store(ctx.settings), blob.sha256)
        return earlier[0]


def _insert_child(
    ctx: JobContext,
    parent: LoadedModel,
    backbone: nn.Module,
    blob: StoredBlob,
    result: FinetuneResult,
    config: TrainConfig,
    snapshot: dict[str, Any],
) -> LoadedModel:
    with ctx.session() as session:
        parent_row = session.get(ModelVersion, parent.id)
        row = ModelVersion(
            name=f"{parent.name or parent.arch} fine-tune {str(ctx.job.id)[:8]}",
            arch=parent.arch,
            status=ModelStatus.READY,
            sha256=blob.sha256,
            byte_size=blob.size,
            embedding_size=parent_row.embedding_size if parent_row else None,
            preprocess=parent.spec.to_dict(),
            threshold=result.threshold,
            parent_id=parent.id,
            created_by_job_id=ctx.job.id,
            hyperparameters=config.to_dict(),
            dataset_snapshot=snapshot,
            validated_at=utcnow(),
        )
        session.add(row)
        session.flush()
        model_id = row.id
    backbone.to("cpu")
    return LoadedModel(model_id, row.name, parent.arch, blob.sha256, result.threshold, parent.spec, backbone)


def judged_evidence(ctx: JobContext, sets: FeedbackSets) -> dict[str, Any]:
    """The evidence report of the pairs this job judges on, not of the feedback table now.

    The gate's verdict rests on the pairs scored here: the job's snapshot of the test split less the pairs
    naming a regression face (kept out of test), and the regression set. Counting the table instead would
    credit pairs posted after the job loaded its feedback and test pairs it dropped, so the gate could pass
    "enough evidence" on pairs it never scored. The review queue counts the table (app/evidence.py), which
    may differ by those pairs; the report's `counts` say what the gate had.
    """
    test = label_counts(sets.pairs["test"])
    counts = EvidenceCounts(
        test_same=test["same"],
        test_different=test["different"],
        regression_pairs=len(sets.pairs[REGRESSION]),
    )
    return evidence_report(counts, EvidenceMinimums.from_settings(ctx.settings))


def _promote(ctx: JobContext, candidate: LoadedModel, decision: gate.GateDecision) -> str | None:
    """Activate the candidate and return the id of the reindex job the activation queued.

    The reindex job is sent to the broker once the activation commits.
    """
    from app.models.service import activate

    with ctx.session() as session:
        outcome = activate(
            session=session,
            settings=ctx.settings,
            model_id=candidate.id,
            actor=ACTOR,
            reason="passed the promotion gate: " + "; ".join(decision.reasons),
            job_id=ctx.job.id,
        )
        reindex_job_id = outcome.reindex_job.id if outcome.reindex_job is not None else None
    return str(reindex_job_id) if reindex_job_id is not None else None


def run(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    config = train_config(params)
    clock = PhaseClock(ctx)
    with clock.phase("loading", progress="loading"):
        with ctx.session() as session:
            parent_row = model_row(session, params.get("base_model"), role="base_model")
        parent = load_model(ctx.settings, parent_row)
        data = _load_pairs(ctx, parent.spec.size)
        snapshot = data.sets.snapshot()
    ctx.raise_if_cancelled("before training")

    earlier = _registered_child(ctx)
    resumed_after, start_scores = None, None
    if earlier is None:
        with clock.phase("training") as training_phase:  # the trainer reports its own progress phases
            feedback_sha256 = snapshot["feedback_ids_sha256"]
            backbone, result, resumed_after = _train(ctx, parent, data, config, feedback_sha256)
            epochs_here = sum(1 for record in result.history if record.epoch > resumed_after)
            training_phase.update(epochs=epochs_here, pairs=epochs_here * len(data.indexed["train"]))
        ctx.raise_if_cancelled("after training, before the model was registered")
        with clock.phase("saving", progress="saving"):
            candidate = _register(ctx, parent, backbone, result, config, snapshot)
        training, start_scores = Training.of(result), result.start_scores
    else:
        candidate, training, snapshot = earlier

    with clock.phase("evaluating", progress="evaluating"):
        device = select_device()
        val = data.indexed["val"]
        parent_threshold = threshold_for(parent, val, device=device, val_scores=start_scores)
        judged = [name for name in ("test", REGRESSION) if data.sets.pairs[name]]
        evaluations = compare_on(
            ctx,
            parent=parent.under_test(*parent_threshold),
            candidate=candidate.under_test(training.threshold, "val"),
            ids=(parent.id, candidate.id),
            pair_sets={name: (data.sets.pairs[name], data.indexed[name]) for name in judged},
            device=device,
            bootstrap=bootstrap_config(ctx.settings),
        )

    with clock.phase("gating", progress="gating"):
        decision, evidence, reindex_job_id = _judge(ctx, data.sets, evaluations, training, candidate)
    test, regression = evaluations.get("test"), evaluations.get(REGRESSION)
    return {
        "model_id": str(candidate.id),
        "parent_id": str(parent.id),
        "best_epoch": training.best_epoch,
        "epochs_run": max((record["epoch"] for record in training.history), default=0),
        "stopped_early": training.stopped_early,
        "history": training.history,
        "threshold": training.threshold,
        "trained_by_earlier_attempt": earlier is not None,
        "resumed_after_epoch": resumed_after,
        "dataset_snapshot": snapshot,
        "evaluations": {"test": test, "regression": regression},
        "evidence_report": evidence,
        "gate": decision.to_dict(),
        "reindex_job_id": reindex_job_id,
        "phases": clock.to_dict(),
    }


def _judge(
    ctx: JobContext,
    sets: FeedbackSets,
    evaluations: dict[str, dict[str, Any]],
    training: Training,
    candidate: LoadedModel,
) -> tuple[gate.GateDecision, dict[str, Any], str | None]:
    """The gate's decision on the evaluations, the evidence it had, and with `auto_promote` and a pass, the
    activation (the id of the reindex job it queued)."""
    test = evaluations.get("test")
    regression = evaluations.get(REGRESSION)
    evidence = judged_evidence(ctx, sets)
    decision = gate.decide(
        (test["parent"]["metrics"], test["candidate"]["metrics"]) if test else ({}, {}),
        (regression["parent"]["metrics"], regression["candidate"]["metrics"]) if regression else None,
        evidence=evidence,
        intervals={
            name: entry["intervals"] if entry else None
            for name, entry in (("test", test), (REGRESSION, regression))
        },
        test_auc_tolerance=ctx.settings.gate_auc_tolerance,
        regression_auc_tolerance=ctx.settings.regression_auc_tolerance,
        best_epoch=training.best_epoch,
    )
    reindex_job_id = None
    if not ctx.params.get("auto_promote", True):
        decision.notes.append("auto_promote is off: activate the model by hand if wanted")
    elif decision.passed:
        try:
            reindex_job_id = _promote(ctx, candidate, decision)
            decision.promoted = True
        except Problem as exc:
            decision.notes.append(f"activation refused: {exc}")
    return decision, evidence, reindex_job_id
