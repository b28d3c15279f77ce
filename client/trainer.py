"""The site trainer: local training of the full model on the site's own studies (DESIGN.md section 4).

:class:`SiteTrainer` loads the consortium's initial model package once, keeps the model between rounds
and answers the two federated requests with plain numpy arrays and floats (no Flower types; the
ClientApp glue packs and unpacks them):

* :meth:`SiteTrainer.fit` loads the global arrays, trains ``local_steps`` steps of the round's stage
  with the framework-free :func:`~lungvl_model.training.loop.run_steps` and returns the update
  ``Δ = w_site − w_global``. Stage ``text`` (report warm-up) trains the decoder alone on the training
  split's report texts with :func:`~lungvl_model.models.report_pretrain.pretrain_reports` (no image is
  loaded; the coherence head is the site's own and never leaves it); stage ``seg`` with
  ``seg_patch > 0`` trains on foreground-biased cubic patches as central training does
  (:func:`~lungvl_model.training.stages.seg_crops`). With ``round_config.dp_sgd`` the steps are Opacus
  DP-SGD with the patient as the unit (Poisson sampling of patients at ``q = batch / patients``, one
  study of each sampled patient, per-study clipping, Gaussian noise; the accountant is charged per
  patient), after the site's own budget has agreed to them; the accountant state persists in
  ``state_dir`` across rounds and restarts.
* :meth:`SiteTrainer.evaluate` scores the global model on the site's hold-out patients (whole volumes;
  stage ``text``: the decoder's LM loss on their reports).
* :meth:`SiteTrainer.record_outbound` writes what is about to leave the site to the audit ledger.

The site's policy (site.toml ``[privacy]``, :class:`~privacy.site_policy.SitePolicy`) decides first,
whatever the server asks: a train request without DP-SGD where the site requires it, with σ below the
site's floor, with more local steps per round or in more rounds than the site allows, and an evaluate
request past the site's evaluations per round, on training studies while DP-SGD is on (no hold-out), or
on fewer hold-out studies than ``min_eval_studies``, raise :class:`~privacy.site_policy.SitePolicyRefusal`
before anything changes (not the model, not the accountant). Evaluation metrics that stand on fewer
than ``min_eval_studies`` studies are withheld. Counts of what the site has done (rounds trained in,
steps and evaluations per round, keyed by the server's run id and round) come from the audit ledger
in ``state_dir``, so a restart does not reset them; a restarted trainer also refuses an accountant
state that holds less ε than the ledger records as spent.

DP-SGD plumbing (per-study separability of the model, empty Poisson batches) is in :mod:`privacy.dp_sgd`.

The DP noise and the Poisson sample come from fresh OS entropy, never from the round seed: the
server knows that seed, and noise or a sample it can replay protects nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import numpy as np
import torch
from opacus.validators import ModuleValidator  # type: ignore[import-untyped]
from torch.utils.data import DataLoader, Dataset

from client.config import ClientConfig
from client.ledger import LEDGER_FILENAME, AuditLedger, filter_metrics
from client.site_evaluation import score_reports, score_studies
from federation.arrays import arrays_to_model, model_to_arrays
from federation.protocol import NUM_EXAMPLES, TRAIN_STAGES, RoundConfig
from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.dataset import SiteDataset, collate
from lungvl_model.data.split import holdout_split, patient_groups, patient_pairs
from lungvl_model.losses.group_penalty import SLICE_GROUPS, GroupPenalized, slice_thickness_group
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.models.report_pretrain import CoherenceHead, pretrain_reports, report_corpus
from lungvl_model.training.checkpoint import load_checkpoint
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.loop import (
    TrainResult,
    build_optimizer,
    cycle,
    make_loader,
    resolve_device,
    run_steps,
    seed_everything,
)
from lungvl_model.training.stages import seg_crops
from privacy.budget import SiteBudget
from privacy.dp_sgd_train import dp_sgd_steps
from privacy.site_policy import SitePolicyRefusal, check_evaluate, check_train, withhold_thin_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "EVALUATE_REPLY",
    "TRAIN_REPLY",
    "TRAIN_STAGES",
    "LocalResult",
    "SiteTrainer",
    "payload_bytes",
    "site_seed",
]

TRAIN_REPLY: Final = "train_reply"
EVALUATE_REPLY: Final = "evaluate_reply"
GRAD_CLIP: Final = 1.0
# loss term of LungVLOutput.losses -> whitelisted metric; the risk heads' three terms add up to one metric
_TERM_METRICS: Final = {
    "report": "train_report_loss",
    "contrastive": "train_contrastive_loss",
    "grounding": "train_grounding_loss",
    "segmentation": "train_seg_loss",
    "concepts": "train_concept_loss",
}
_RISK_TERMS: Final = ("malignancy", "lung_rads", "growth")


@dataclass
class LocalResult:
    """What one round of local training sends back.

    Attributes:
        delta: ``w_site − w_global`` as float32 arrays in exchanged-array order (``array_keys``).
        num_examples: studies of the site usable for the round's stage.
        metrics: whitelisted scalar metrics only (see ``client.ledger.METRIC_WHITELIST``).
    """

    delta: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def payload_bytes(arrays: Sequence[np.ndarray]) -> bytes:
    """A deterministic serialisation of arrays (``np.save`` of each, in order, into one buffer)."""
    buf = io.BytesIO()
    for a in arrays:
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def site_seed(seed: int, server_round: int, site: str) -> int:
    """The seed of a site's round: a hash of the round seed, the round number and the site name."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SiteTrainer:
    """Local training and evaluation of one site; the model persists between rounds.

    Args:
        config: the site's settings (``model_dir`` must name the initial model package).

    Attributes:
        policy: the site's policy (``config.policy``).
        run_id: the server run the request being served belongs to (the ClientApp sets it from the
            message; ``""`` outside a federation). The policy's per-round counts and the ledger's
            entries are keyed by it and the server round.

    Raises:
        ValueError: ``config.model_dir`` is not set.
        privacy.budget.AccountantStateMismatch: the audit ledger records ε spent but the accountant
            state is missing or holds less (nothing starts with ε silently back at 0).
        lungvl_model.training.checkpoint.CheckpointError: the model package is unusable.
    """

    def __init__(self, config: ClientConfig) -> None:
        if config.model_dir is None:
            raise ValueError("ClientConfig.model_dir is not set: pass the initial model package directory")
        self.config = config
        self.policy = config.policy
        self.run_id = ""
        assert config.state_dir is not None  # resolved by ClientConfig
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.budget = SiteBudget(config.state_dir, epsilon_budget=config.epsilon_budget, delta=config.delta)
        self.ledger = AuditLedger(config.state_dir / LEDGER_FILENAME)
        try:  # before anything slow: a site whose accountant forgot spending does not start
            self.budget.reconcile(self.ledger.max_epsilon(), record=config.state_dir / LEDGER_FILENAME)
        except Exception:
            self.ledger.close()
            raise
        self.device = resolve_device(config.device)
        self.model, self.package_meta = load_checkpoint(config.model_dir)
        self.model.to(self.device)
        ModuleValidator.validate(self.model, strict=True)  # e.g. no BatchNorm: fail now, not in round 5
        self._catalogue = build_catalogue(config.site_dir)
        self._datasets: dict[tuple[bool, str], SiteDataset] = {}
        self._dp_params: dict[str, set[str]] = {}  # stage -> parameters with a per-study gradient
        self.last_dp: dict[str, float | int] = {}
        self._dro: GroupPenalized | None = None
        self._coherence: CoherenceHead | None = None  # stage text's head: site-local, kept across rounds

    # ------------------------------------------------------------------ data
    def split(self) -> tuple[list[str], list[str]]:
        """``(training, hold-out)`` StudyInstanceUIDs of the usable studies, split by patient.

        With ``holdout_fraction == 0`` every study is in both roles: evaluation would then score training
        data, which :meth:`evaluate` does only when the site uses no DP at all (and logs it).
        """
        train, hold = holdout_split(patient_pairs(self._catalogue), float(self.config.holdout_fraction))
        return train, (hold if self.config.holdout_fraction > 0 else train)

    def dataset(self, stage: str, part: str = "train") -> SiteDataset:
        """The site's usable studies for ``stage`` (``text`` and ``vl`` keep only studies with a report).

        Building it reads no image (items load lazily); stage ``text`` uses only the entries' reports
        (:meth:`report_texts`).

        Args:
            stage: ``text``, ``ssl``, ``seg`` or ``vl``.
            part: ``"train"`` (local training) or ``"holdout"`` (federated evaluation); the same
                studies when the site holds none out.

        Raises:
            ValueError: an unknown stage or part, or no usable study in it.
        """
        if stage not in TRAIN_STAGES:
            raise ValueError(f"a site trains stage {', '.join(TRAIN_STAGES)}, got {stage!r}")
        ds = self._studies(need_report=stage in ("text", "vl"), part=part)
        if len(ds) == 0:
            raise ValueError(f"site {self.config.name!r} has no usable {part} studies for stage {stage!r}")
        return ds

    def _studies(self, *, need_report: bool, part: str) -> SiteDataset:
        """The (cached) usable studies of ``part``, only those with a report where ``need_report``."""
        if part not in ("train", "holdout"):
            raise ValueError(f"dataset part must be 'train' or 'holdout', got {part!r}")
        if (need_report, part) not in self._datasets:
            uids = self.split()[0 if part == "train" else 1]
            self._datasets[(need_report, part)] = SiteDataset(
                self.config.site_dir,
                self.model.config.input,
                studies=uids,
                require_report=need_report,
                catalogues=[self._catalogue],
            )
        return self._datasets[(need_report, part)]

    def report_texts(self, part: str = "train") -> list[str]:
        """What stage ``text`` trains on (``"train"``) or scores (``"holdout"``): the part's report texts.

        Each report of the part's studies cut to what the decoder learns (FINDINGS and IMPRESSION,
        :func:`~lungvl_model.models.report_pretrain.report_corpus`); reports left empty are dropped.

        Raises:
            ValueError: an unknown part.
        """
        ds = self._studies(need_report=True, part=part)
        return report_corpus([entry.report.text for _, entry in ds.entries if entry.report is not None])

    # ------------------------------------------------------------------ policy
    def check_train_policy(self, rc: RoundConfig) -> None:
        """Refuse a train request outside the site's policy (:func:`privacy.site_policy.check_train`).

        Steps already trained in the round and the rounds trained in so far are the train replies of the
        audit ledger (keyed by :attr:`run_id` and the server round), so they survive restarts.

        Raises:
            SitePolicyRefusal: naming the rule, the requested value and the site's limit.
        """
        this_round: list[dict[str, Any]] = []
        rounds_trained = 0
        if self.policy.max_steps_per_round or self.policy.max_rounds:
            this_round = self.ledger.entries(kind=TRAIN_REPLY, run_id=self.run_id, round=rc.server_round)
            rounds_trained = len(self.ledger.rounds(TRAIN_REPLY)) if self.policy.max_rounds else 0
        check_train(
            self.policy,
            dp_sgd=rc.dp_sgd,
            noise_multiplier=rc.dp_sgd_noise_multiplier,
            local_steps=rc.local_steps,
            steps_this_round=sum(int(e["metrics"].get("local_steps", 0)) for e in this_round),
            rounds_trained=rounds_trained,
            new_round=not this_round,
        )

    def dp_sgd_reason(self, rc: RoundConfig) -> str:
        """Why DP-SGD is on for this site in this round (empty when it is not)."""
        why = []
        if self.policy.require_dp_sgd:
            why.append("required by the site's policy")
        if rc.dp_sgd:
            why.append("asked for in this round")
        if self.budget.accountant.steps > 0:
            why.append(f"ε = {self.budget.spent:.3g} already spent")
        return "; ".join(why)

    def check_evaluate_policy(self, rc: RoundConfig) -> bool:
        """Refuse an evaluate request outside the site's policy (:func:`privacy.site_policy.check_evaluate`).

        Evaluations already answered in the round are the evaluate replies of the audit ledger (keyed by
        :attr:`run_id` and the server round), so a restart does not reset them.

        Returns:
            True when the evaluation scores hold-out patients; False when the site holds none out and
            uses no DP, so that the evaluation scores training studies (allowed, and logged as such).

        Raises:
            SitePolicyRefusal: naming the rule, the requested value and the site's limit.
        """
        answered = len(self.ledger.entries(kind=EVALUATE_REPLY, run_id=self.run_id, round=rc.server_round))
        holdout = self.config.holdout_fraction > 0
        studies = 0
        if holdout:
            try:
                studies = len(self.dataset(rc.stage, "holdout"))
            except ValueError:  # no usable hold-out study for the stage
                studies = 0
        check_evaluate(
            self.policy,
            answered_this_round=answered,
            holdout=holdout,
            dp_reason=self.dp_sgd_reason(rc),
            holdout_studies=studies,
        )
        if not holdout:
            logger.warning(
                "round %d: site %s evaluates on its training studies (holdout_fraction = 0, no DP): "
                "these are not hold-out metrics",
                rc.server_round,
                self.config.name,
            )
        return holdout

    def _batch_size(self, rc: RoundConfig) -> int:
        return int(self.config.batch_size or rc.batch_size)

    @property
    def epsilon_spent(self) -> float:
        """The site's patient-level DP-SGD ε spent so far (at ``config.delta``)."""
        return self.budget.spent

    # ------------------------------------------------------------------ fit
    def fit(self, arrays: Sequence[np.ndarray], round_config: RoundConfig) -> LocalResult:
        """Train locally from the global arrays and return the update.

        Args:
            arrays: the global model's exchanged arrays (``model_to_arrays`` order).
            round_config: the round's settings from the server.

        Returns:
            The float32 delta, the number of usable studies (stage ``text``: reports) and whitelisted
            metrics. Under DP-SGD the training losses are withheld (they are not privatised); ε, σ, q
            and the step count are sent.

        Raises:
            SitePolicyRefusal: a request outside the site's policy (:meth:`check_train_policy`; nothing
                is changed).
            PrivacyBudgetExceeded: DP-SGD that would take the site past its ε budget (nothing is
                changed: not the model, not the accountant).
            ValueError: unusable round config or arrays that do not fit the model, a ``seg_patch`` larger
                than the model's input size, or (stage ``text``) fewer than 2 reports in the training split
                (nothing is changed).
        """
        self.check_train_policy(round_config)  # the site's policy decides first, whatever the server asks
        rc = round_config  # validated where it entered (RoundConfig)
        if rc.stage == "text":
            return self._fit_text(arrays, rc)
        seg_crop = self._seg_crop(rc)
        dataset = self.dataset(rc.stage)
        n = len(dataset)
        batch = self._batch_size(rc)
        patients = self.patient_groups(dataset)  # DP-SGD samples patients (at most one study each per step)
        q = min(1.0, batch / len(patients))  # per patient: what the accountant is charged with
        if rc.dp_sgd:  # the site's budget decides first, whatever the server asks
            self.budget.check_can_train(
                noise_multiplier=rc.dp_sgd_noise_multiplier, sample_rate=q, steps=rc.local_steps
            )
        t0 = time.perf_counter()
        arrays_to_model(self.model, list(arrays))
        w_global = model_to_arrays(self.model)
        seed = site_seed(rc.seed, rc.server_round, self.config.name)
        train = TrainConfig(
            stage=rc.stage,
            max_steps=rc.local_steps,
            batch_size=batch,
            lr=rc.lr,
            grad_clip=GRAD_CLIP,
            seed=seed,
            device=self.config.device,
            bf16=self.config.bf16,
            num_workers=self.config.num_workers,
            seg_crop=seg_crop,
            seg_fg_prob=rc.seg_fg_prob,
            seg_hard_negative_prob=rc.seg_hard_negative_prob,
        )
        data = seg_crops(dataset, train)  # foreground-biased patches in stage seg with seg_patch > 0, else `dataset`
        metrics: dict[str, Any] = {NUM_EXAMPLES: n, "local_steps": rc.local_steps}
        if rc.dp_sgd:  # a patch keeps its study's index, so the patient groups of `dataset` still hold
            result = self._train_dp(data, patients, rc, train, q)
            metrics |= self._dp_metrics(rc, q, result.steps)
        else:
            seed_everything(seed)
            self.last_dp = {}
            result = run_steps(
                self._group_penalized(rc),
                cycle(make_loader(data, train)),
                build_optimizer(self.model, train),
                stage=rc.stage,
                steps=rc.local_steps,
                device=self.device,
                grad_clip=GRAD_CLIP,
                bf16=self.config.bf16,
                seed=seed,
            )
            metrics |= _loss_metrics(result)
        return self._local_result(w_global, n, metrics, t0)

    def _local_result(self, w_global: list[np.ndarray], n: int, metrics: dict[str, Any], t0: float) -> LocalResult:
        """The update ``Δ = w_site − w_global`` (float32), its L2 norm and the round's seconds added to ``metrics``."""
        delta = [(w - g).astype(np.float32) for w, g in zip(model_to_arrays(self.model), w_global, strict=True)]
        metrics["update_norm"] = math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta))
        metrics["seconds"] = time.perf_counter() - t0
        return LocalResult(delta=delta, num_examples=n, metrics=filter_metrics(metrics))

    def _seg_crop(self, rc: RoundConfig) -> tuple[int, int, int] | None:
        """The ``(p, p, p)`` patch of a seg round with ``seg_patch = p > 0`` (None: whole volumes).

        Raises:
            ValueError: a patch larger than the model's input size along any axis.
        """
        p = rc.seg_patch
        if rc.stage != "seg" or p == 0:
            return None
        size = self.model.config.input.size
        if size is not None and any(p > int(s) for s in size):
            raise ValueError(
                f"round config seg_patch = {p} does not fit the model's input size {tuple(size)} "
                "(a patch must not be larger than the volume it is cut from)"
            )
        return (p, p, p)

    def _fit_text(self, arrays: Sequence[np.ndarray], rc: RoundConfig) -> LocalResult:
        """Stage ``text``: the report warm-up of the decoder on the training split's reports (no image).

        :func:`~lungvl_model.models.report_pretrain.pretrain_reports` (causal LM + report coherence) for
        ``local_steps`` steps, without its before/after evaluation. The coherence head is the site's own
        (created on first use, kept across rounds, never sent); only decoder arrays move.

        Raises:
            ValueError: fewer than 2 reports in the site's training split (nothing is changed).
        """
        texts = self.report_texts("train")
        n = len(texts)
        if n < 2:
            raise ValueError(
                f"site {self.config.name!r} has {n} non-empty report(s) in its training split; "
                "stage 'text' needs at least 2"
            )
        t0 = time.perf_counter()
        arrays_to_model(self.model, list(arrays))
        w_global = model_to_arrays(self.model)
        seed = site_seed(rc.seed, rc.server_round, self.config.name)
        self.last_dp = {}
        if self._coherence is None:
            with torch.random.fork_rng(devices=[]):  # a head seeded by the first round's seed, global RNG untouched
                torch.manual_seed(seed)
                self._coherence = CoherenceHead(self.model.decoder.n_embd)
        history: list[dict[str, float]] = []
        pretrain_reports(
            texts,
            self.model.tokenizer,
            self.model.decoder,
            steps=rc.local_steps,
            batch_size=self._batch_size(rc),
            lr=rc.lr,
            seed=seed,
            head=self._coherence,
            eval_size=0,  # the site's evaluation is evaluate(): no before/after scoring of the training reports
            progress=lambda _step, m: history.append(dict(m)),
        )
        metrics: dict[str, Any] = {NUM_EXAMPLES: n, "local_steps": rc.local_steps}
        if history:
            metrics["train_loss"] = float(np.mean([h["loss"] for h in history]))
            metrics["train_report_loss"] = float(np.mean([h["lm_loss"] for h in history]))
        return self._local_result(w_global, n, metrics, t0)

    def patient_groups(self, dataset: SiteDataset) -> list[list[int]]:
        """Indices of ``dataset`` grouped by patient (DICOM PatientID; a study without one is its own patient).

        DP-SGD's sampling unit: each step includes a patient with probability ``q = batch / patients``
        and then one of its studies (a prior and a current study are never in one step together).
        """
        return patient_groups(patient_pairs(self._catalogue), [entry.study_uid for _, entry in dataset.entries])

    def _train_dp(
        self,
        dataset: Dataset[dict[str, Any]],
        patients: list[list[int]],
        rc: RoundConfig,
        train: TrainConfig,
        q: float,
    ) -> TrainResult:
        """DP-SGD steps (:func:`~privacy.dp_sgd_train.dp_sgd_steps`) at patient rate ``q``; records ε spent.

        ``dataset`` is the site's studies or, in a seg round with patches, their
        :class:`~lungvl_model.data.crops.ForegroundCrops` (item ``i`` is a patch of study ``i``, so
        ``patients`` indexes both). The clipping (hooks or microbatch) is the site's ``[compute]
        dp_sgd_clipping`` for its device.
        """

        def spend(steps: int) -> None:
            self.budget.record(noise_multiplier=rc.dp_sgd_noise_multiplier, sample_rate=q, steps=steps)

        return dp_sgd_steps(
            model=self.model,
            dataset=dataset,
            patients=patients,
            optimizer=build_optimizer(self.model, train),
            stage=rc.stage,
            steps=rc.local_steps,
            sample_rate=q,
            noise_multiplier=rc.dp_sgd_noise_multiplier,
            max_grad_norm=rc.dp_sgd_max_grad_norm,
            device=self.device,
            bf16=self.config.bf16,
            seed=train.seed,
            num_workers=self.config.num_workers,
            trainable=self._dp_params,
            on_steps=spend,
            clipping=self.config.clipping_for(self.device.type),
        )

    def _dp_metrics(self, rc: RoundConfig, q: float, steps: int) -> dict[str, float | int]:
        exhausted = self.budget.accountant.would_exceed(
            target_epsilon=self.budget.epsilon_budget,
            delta=self.budget.delta,
            noise_multiplier=rc.dp_sgd_noise_multiplier,
            sample_rate=q,
            num_steps=rc.local_steps,
        )
        self.last_dp = {
            "dp_sgd_noise_multiplier": rc.dp_sgd_noise_multiplier,
            "dp_sgd_max_grad_norm": rc.dp_sgd_max_grad_norm,
            "sample_rate": q,
            "dp_steps": steps,
        }
        return {
            **self.last_dp,
            "epsilon": self.budget.spent,
            "delta": self.budget.delta,
            "budget_exhausted": float(exhausted),
        }

    def slice_group(self, study_uid: str) -> str | None:
        """The slice-thickness group of one of the site's studies (None when unknown)."""
        entry = self._catalogue.studies.get(study_uid)
        series = None if entry is None else entry.series
        return None if series is None else slice_thickness_group(series.header.get("SliceThickness"))

    def _group_penalized(self, rc: RoundConfig) -> LungVLModel:
        """The model, wrapped in the round's subgroup penalty (slice-thickness groups) when it asks for one."""
        if rc.dg_penalty == 0 and rc.dro_step == 0:
            return self.model
        if (
            self._dro is None
            or self._dro.objective.penalty != rc.dg_penalty
            or self._dro.objective.dro_step != rc.dro_step
        ):
            index = {g: i for i, g in enumerate(SLICE_GROUPS)}

            def group_of(batch: Mapping[str, Any]) -> list[int]:
                return [index.get(self.slice_group(uid) or "", -1) for uid in batch["study_uid"]]

            # built once per setting: the group-DRO weights carry over between rounds
            self._dro = GroupPenalized(self.model, group_of, penalty=rc.dg_penalty, dro_step=rc.dro_step)
        return cast(LungVLModel, self._dro)

    # ------------------------------------------------------------------ evaluate
    @torch.no_grad()
    def evaluate(
        self, arrays: Sequence[np.ndarray], round_config: RoundConfig, *, max_batches: int | None = None
    ) -> tuple[int, dict[str, float]]:
        """Score the global model on the site's hold-out studies (eval mode, no gradient).

        The site's policy decides first (:meth:`check_evaluate_policy`): nothing is loaded or scored for a
        refused request. A site that holds no patient out scores its training studies only when it uses
        no DP at all, and logs it.

        Args:
            arrays: the global model's exchanged arrays.
            round_config: the round's settings (stage, batch size, seed of the SSL masks).
            max_batches: evaluate at most this many batches (all when None).

        Returns:
            ``(num_examples, metrics)``: ``val_loss`` (the stage loss, mean over studies), ``val_dice``
            (seg logits > 0 against the mask, mean over studies with a mask; seg/vl), and
            ``val_lung_rads_acc`` (vl, studies with a known category), plus in stage vl the risk-head
            summary of :func:`~lungvl_model.evaluation.site_summary.site_risk_metrics` (malignancy AUC
            and ECE, sensitivity/specificity for Lung-RADS >= 4A, concept F1, AUC per slice-thickness
            group) where defined on the site's studies; whitelisted names only. Stage ``text``: ``val_loss``
            is the decoder's token-weighted LM loss on the hold-out reports (no image), and
            ``num_examples`` counts reports. On hold-out studies, a metric that stands on fewer than
            ``min_eval_studies`` studies is withheld.

        Raises:
            SitePolicyRefusal: a request outside the site's policy, or (``max_batches``) fewer hold-out
                studies scored than ``min_eval_studies``.
        """
        holdout = self.check_evaluate_policy(round_config)
        rc = round_config
        if rc.stage == "text":  # the decoder's LM loss on the hold-out reports, no image
            texts = self.report_texts("holdout")
            arrays_to_model(self.model, list(arrays))
            n, metrics, support = score_reports(
                self.model, texts, batch_size=self._batch_size(rc), max_batches=max_batches
            )
        else:
            dataset = self.dataset(rc.stage, "holdout")
            arrays_to_model(self.model, list(arrays))
            self.model.eval()
            loader = DataLoader(
                dataset,
                batch_size=self._batch_size(rc),
                shuffle=False,
                collate_fn=collate,
                num_workers=self.config.num_workers,
            )
            gen = torch.Generator(device=self.device)
            gen.manual_seed(site_seed(rc.seed, rc.server_round, self.config.name))
            n, metrics, support = score_studies(
                self.model, loader, stage=rc.stage, device=self.device, generator=gen, group=self.slice_group,
                max_batches=max_batches,
            )  # fmt: skip
        if holdout:
            least = self.policy.min_eval_studies
            if n < least:  # max_batches cut the hold-out short
                raise SitePolicyRefusal(
                    "min_eval_studies", requested=n, limit=least, reason=f"only {n} hold-out studies were scored"
                )
            metrics, withheld = withhold_thin_metrics(metrics, support, least)
            if withheld:
                logger.info(
                    "round %d: withheld %s (fewer than min_eval_studies = %d studies behind each)",
                    rc.server_round,
                    ", ".join(withheld),
                    least,
                )
        return n, filter_metrics(metrics)

    # ------------------------------------------------------------------ audit
    def record_outbound(
        self,
        round: int,
        kind: str,
        payload_bytes: bytes,
        metrics: Mapping[str, Any],
        *,
        dp: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> int:
        """Write one outbound message to the audit ledger before it is sent; returns the entry id.

        The ledger's train and evaluate replies are also the site policy's count of rounds trained in
        and of evaluations answered per round.

        Args:
            round: the server round answered.
            kind: :data:`TRAIN_REPLY`, :data:`EVALUATE_REPLY` or another message kind.
            payload_bytes: the exact serialised bytes that will be sent (e.g. :func:`payload_bytes`).
            metrics: the scalar metrics inside the message.
            dp: DP parameters to record; by default those of the last fit for a train reply, else none.
            run_id: the server's run id (default: :attr:`run_id`, the run of the request being served).

        Raises:
            client.ledger.MetricNotAllowed: a metric may not leave the site (nothing is written).
        """
        if dp is None:
            dp = self.last_dp if kind == TRAIN_REPLY else {}
        spent = self.budget.accountant.steps > 0
        return self.ledger.record(
            round=round,
            kind=kind,
            payload=payload_bytes,
            metrics=metrics,
            dp=dict(dp),
            epsilon=self.budget.spent if spent else None,
            delta=self.budget.delta if spent else None,
            run_id=self.run_id if run_id is None else run_id,
        )

    def close(self) -> None:
        """Release the ledger's database connections."""
        self.ledger.close()


def _loss_metrics(result: TrainResult) -> dict[str, float]:
    """Mean training loss and per-term means under their whitelisted names (steps with data only)."""
    steps = [h for h in result.history if set(h) - {"loss", "lr"}]
    if not steps:
        return {}
    out = {"train_loss": float(np.mean([h["loss"] for h in steps]))}
    for term, name in _TERM_METRICS.items():
        vals = [h[term] for h in steps if term in h]
        if vals:
            out[name] = float(np.mean(vals))
    if all(t in steps[0] for t in _RISK_TERMS):
        out["train_risk_loss"] = float(np.mean([sum(h[t] for t in _RISK_TERMS) for h in steps]))
    return out
