"""Experiment approval at a site: the manifest of what a run asks of the site, its hash, and the
site's review of it.

Fed-BioMed has each site's operator approve a training plan (its code) before it runs; ours is
declarative. A run is configuration only (models and algorithms come from the installed package),
so what a site approves is the :func:`experiment_manifest`: the model, the algorithm, the rounds,
the sampling, the DP and secure-aggregation settings, and a plain list of what leaves the site.
Its SHA-256 over canonical JSON is the manifest hash. A site joins only an experiment whose hash
its operator approved (``consortium client --approve HASH``, or ``approve`` in the site policy),
or, with ``approve = "matching"``, any experiment that keeps the policy's rules. A changed
experiment has another hash and needs a new approval. Keys that only the server uses (its
optimiser, executor, report) are not in the manifest: they do not change what a site sends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import asdict
from typing import Any

from consortium.config import ExperimentConfig
from consortium.models.zoo import BUILT_IN
from consortium.privacy.policy import SitePolicy

__all__ = ["experiment_manifest", "format_manifest", "manifest_hash", "review_experiment"]

FORMAT = 1


def experiment_manifest(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the experiment asks of a site, as plain JSON-able data (see the module docstring)."""
    privacy = {k: v for k, v in asdict(cfg.privacy).items()
               if k not in ("noise_source", "site_policies")}
    # only where they apply, so that other experiments keep the hashes operators approved
    personal = ({"personalization": asdict(cfg.personalization)}
                if _personalised(cfg) else {})
    return {
        "format": FORMAT,
        "name": cfg.name,
        "seed": cfg.seed,
        "rounds": cfg.rounds,
        "data": {"dataset": cfg.data.dataset, "target": cfg.data.target,
                 "test_fraction": cfg.data.test_fraction},
        "model": _model(cfg),
        "algorithm": asdict(cfg.algorithm),
        **personal,
        "sampling": asdict(cfg.sampling),
        "privacy": privacy,
        "secure_aggregation": asdict(cfg.secure_aggregation),
        "evaluation_every": cfg.evaluation.every,
        "leaves_site": leaves_site(cfg),
    }


def _model(cfg: ExperimentConfig) -> dict[str, Any]:
    """The model part: its name and sizes, and for ``minilm-lora`` its LoRA settings and the
    frozen base it fine-tunes (``base_sha256``, the hash every site checks its own base
    against; ``path``, where the site reads it) — only there, so that other experiments keep
    the hashes operators approved."""
    model: dict[str, Any] = {"name": cfg.model.name, "hidden": list(cfg.model.hidden)}
    if cfg.model.name == "minilm-lora":
        p = cfg.model.peft
        model.update(r=p.r, alpha=p.alpha, dropout=p.dropout, target=list(p.target),
                     base_path=p.path, base_sha256=p.base_sha256)
    return model


def _personalised(cfg: ExperimentConfig) -> bool:
    """Whether the site keeps (or fine-tunes) a model of its own in this experiment."""
    return (cfg.algorithm.name in ("fedper", "fedrep", "fedbn", "ditto", "apfl")
            or cfg.personalization.finetune_steps > 0)


def leaves_site(cfg: ExperimentConfig) -> list[str]:
    """What leaves the site, in the order it leaves, in words an operator can check."""
    p, sa = cfg.privacy, cfg.secure_aggregation
    from consortium.data.preprocess import category_min_count

    k = category_min_count(analysis=cfg.analysis.min_count)
    sums = ("through secure aggregation (SecAgg+: the server learns only their total over the "
            "sites)" if sa.enabled else "in the clear")
    out = [
        "once, before round 1: the data's input shape, class count and numbers of training and "
        f"test examples, and per-column sums and counts of the training split ({sums}, so "
        "that every site encodes its features alike), with the category values that at least "
        f"{k} of the site's rows hold (more if its policy's min_count is larger; rarer values "
        "are not named, and a data set with fixed categories names none)",
    ]
    if cfg.data.dataset == "triage":  # text: tokenised at the site, no statistics to merge
        out = ["once, before round 1: the data's input shape, class count and numbers of "
               "training and test examples (the notes and their tokens never leave the site)"]
    if p.mode == "local":
        update = (f"the model update after local DP-SGD with the site's own noise (noise "
                  f"multiplier {p.noise_multiplier:g}, per-example clip {p.clip:g}, batch "
                  f"{cfg.algorithm.batch_size}, drawn from the site's own random generator)")
    elif p.mode == "distributed":
        update = (f"the model update clipped to L2 norm {p.clip:g}, rounded to integers and "
                  "noised with discrete Gaussian noise drawn from the site's own random "
                  f"generator (its share of noise multiplier "
                  f"{p.noise_multiplier or 'calibrated to epsilon ' + format(p.target_epsilon, 'g')} "
                  f"over {cfg.sampling.clients_per_round} sites)")
    elif p.mode == "central":
        update = (f"the model update clipped to L2 norm {p.clip:g} (the server adds central DP "
                  "noise to the sum; the site cannot verify it) and whether it was clipped")
    else:
        update = "the model update (local minus global parameters)"
    if sa.enabled:
        coded = ("as integers modulo 2**32" if p.mode == "distributed"
                 else f"quantised to {sa.bits} bits")
        update += (f", {coded} and masked by secure aggregation (SecAgg+): "
                   "the server can unmask only the sum over the round's sites")
    else:
        update += " in the clear, with its weight (the number of training examples)"
    if cfg.algorithm.name in ("fedper", "fedrep"):
        update += ("; only the shared layers' part of it: the personal layers (the site's own "
                   "head) never leave the site")
    if cfg.algorithm.name == "fedbn":
        update += ("; only the part outside batch normalisation: the site's batch-norm layers "
                   "(weights and running statistics) never leave the site")
    if cfg.model.name == "minilm-lora":
        update += ("; only the LoRA adapters and the classification head: the frozen base "
                   "never leaves the site, and the site trains only if its base has the "
                   "experiment's base_sha256")
    if cfg.algorithm.name == "scaffold":
        update += "; SCAFFOLD's control-variate change, protected like the update"
    if cfg.algorithm.name == "fednova":
        update += "; FedNova's normalised step count, protected like the update"
    out.append("each round the site is picked: " + update)
    out.append("each round the site is picked: its local step count, and the training metrics "
               "the site's policy lists in send_metrics (none by default)")
    own = (" and of the site's own model (never the model itself)" if _personalised(cfg)
           else "")
    out.append(f"every {cfg.evaluation.every} round(s): accuracy, loss, AUC and balanced accuracy "
               f"of the global model{own} on the site's test split, and that split's size")
    out += _after_the_run(cfg, k, sums)
    return out


def _after_the_run(cfg: ExperimentConfig, k: int, sums: str) -> list[str]:
    """What ``[interpret]`` and ``[contribution]`` ask of a site after the last round
    (:mod:`consortium.deploy.interpret_site`); nothing when both are off."""
    from consortium.interpret.summary import enabled

    out = []
    it = cfg.interpret
    if enabled(it) and (it.importance != "none" or it.shap or it.calibration):
        parts = []
        if it.importance != "none":
            parts.append(f"permutation-importance sums per feature ({it.repeats} shuffles drawn "
                         "from the site's own random generator)")
        if it.shap:
            parts.append(f"sums of |SHAP| and SHAP per feature over {it.sample} test rows "
                         f"against {it.background} training rows, both drawn at the site")
        if it.calibration:
            parts.append("per calibration bin (10) the count and the sums of predicted "
                         "probability and label")
        out.append(
            "once, after the last round: on the site's test split, for the final model it "
            "evaluated, " + "; ".join(parts) + f" ({sums}); nothing over fewer than {k} rows "
            "(more if its policy's min_count is larger: smaller bins are suppressed), never a "
            "row or a per-row value; a policy with interpret = false refuses")
    if cfg.contribution.method != "none":
        out.append(
            "once, after the last round: for each coalition model the server rebuilds from "
            "the round's updates (contribution.method = "
            f"{cfg.contribution.method!r}), the summed loss and correct count on the site's test "
            "split and its size; the coalition models come from the server, and a model of a "
            "coalition holding one site shows that site's update of that round to every site; "
            "a policy with contribution = false refuses")
    return out


def manifest_hash(manifest: dict[str, Any] | ExperimentConfig) -> str:
    """SHA-256 (hex) of the manifest's canonical JSON (sorted keys, no spaces)."""
    if isinstance(manifest, ExperimentConfig):
        manifest = experiment_manifest(manifest)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def format_manifest(manifest: dict[str, Any]) -> str:
    """The manifest for a person to read, with its hash on the last line."""
    lines = [f"experiment {manifest['name']!r}: {manifest['rounds']} rounds"]
    for key in ("model", "algorithm", "personalization", "sampling", "privacy",
                "secure_aggregation"):
        if key not in manifest:
            continue
        values = ", ".join(f"{k}={v}" for k, v in manifest[key].items())
        lines.append(f"  {key}: {values}")
    lines.append("  what leaves the site:")
    lines += [f"    - {item}" for item in manifest["leaves_site"]]
    lines.append(f"manifest sha256: {manifest_hash(manifest)}")
    return "\n".join(lines)


def review_experiment(
    cfg: ExperimentConfig,
    policy: SitePolicy | None,
    *,
    approved: Collection[str] = (),
    allow_models: Collection[str] = (),
    can_sign: bool = False,
) -> str | None:
    """Why this site refuses to join the experiment, or ``None`` if it joins.

    Args:
        cfg: the experiment the server sent.
        policy: the site's policy (None: only ``approved`` hashes and the built-in models).
        approved: manifest hashes the operator approved on the command line.
        allow_models: ``package.module:factory`` models the operator allows on the command line.
        can_sign: the site holds a provisioned certificate (needed to count peers in
            secure aggregation, which ``min_sites`` relies on).
    """
    rules = policy or SitePolicy()
    digest = manifest_hash(cfg)
    models = set(BUILT_IN) | set(allow_models) | set(rules.models)
    if cfg.model.name not in models:
        return (
            f"the experiment's model {cfg.model.name!r} is not built in and this site's operator "
            f"has not allowed it; a site never imports code the server names (allow it with "
            f"--allow-model {cfg.model.name} if you trust it)"
        )
    if rules.algorithms and cfg.algorithm.name not in rules.algorithms:
        return (f"the experiment's algorithm {cfg.algorithm.name!r} is not among those this "
                f"site's policy accepts ({', '.join(rules.algorithms)})")
    mode = cfg.privacy.mode
    if rules.require_dp and mode == "none":
        return "this site's policy requires differential privacy and the experiment has none"
    if rules.require_dp and mode == "central" and not rules.trust_server_noise:
        return ("this site's policy requires differential privacy it can verify, and central DP "
                "noise is added by the server; ask for privacy.mode = \"local\" (or set "
                "trust_server_noise = true in the site policy)")
    if rules.require_secure_aggregation and not cfg.secure_aggregation.enabled:
        return "this site's policy requires secure aggregation and the experiment does not use it"
    if not rules.contribution and cfg.contribution.method != "none":
        return ("this site's policy refuses contribution scoring (contribution = false) and the "
                f"experiment scores contributions ({cfg.contribution.method!r}): a coalition model "
                "of one site is that site's update of a round, which the other sites would "
                "evaluate; join an experiment without [contribution], or set contribution = true "
                "in the site policy")
    if rules.min_sites and not (cfg.secure_aggregation.enabled and can_sign):
        return (f"this site's policy requires at least {rules.min_sites} other sites in every "
                "aggregate, which a site can count only from its peers' signed keys in secure "
                "aggregation: the experiment needs secure_aggregation.enabled = true and the "
                "site its provisioned certificate (--certs)")
    if digest in set(approved) or rules.approve == "matching" or digest in set(rules.approve):
        return None
    return (
        f"this site has not approved experiment {cfg.name!r} (manifest sha256 {digest}). "
        "Review what it asks with `consortium manifest EXPERIMENT.toml` (or the lines logged "
        f"above), then start the site with --approve {digest}, or list the hash under approve "
        "in the site policy"
    )
