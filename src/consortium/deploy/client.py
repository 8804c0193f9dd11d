"""``consortium client``: one site's side of a deployment. It dials out, holds its own data.

The site registers (mutual TLS with its provisioned certificate, or its token), receives the
experiment's configuration — never code: the model and the algorithm come from the installed
package by name — reads and splits its own CSV, describes its shape and size, and then pulls
work and pushes results until the server says the run is over. Lost connections are retried
with exponential backoff; a lost session (the server restarted) registers again.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consortium.deploy.logsafe import peer_text
from consortium.errors import ConfigError, ConsortiumError, MissingExtraError, ModelError

__all__ = ["ExperimentRefused", "SiteRunner", "run_client", "task_limit"]

log = logging.getLogger("consortium.client")

_BEFORE = "before\x1e"  # state-file keys of the algorithm state before the latest round
_PRIVACY = "privacy."  # the site's privacy ledger in its client state (never rolled back)
_DOWNLINK = "downlink\x1e"  # state-file key of the downlink reference model (per-client)


TASK_OVERHEAD_BYTES = 64 << 20
"""What a task or exchange may hold beyond four copies of the model: its metadata, and under
secure aggregation every peer's signed keys and shares (about 10 KiB a peer)."""


def task_limit(layout: Any) -> int:
    """The largest task or exchange this site accepts for a model of ``layout``: room for the
    model and three more of its size (an algorithm's payload, e.g. SCAFFOLD's control variate)
    plus :data:`TASK_OVERHEAD_BYTES`. The site knows its model from the experiment, so a server
    cannot make it buffer gigabytes (it accepted up to 4 GiB before, issue 13)."""
    model = sum(s.numel * s.dtype.itemsize for s in layout.specs)
    return 4 * model + TASK_OVERHEAD_BYTES


class ExperimentRefused(ConsortiumError):
    """The site refused the experiment the server sent (not approved, or against its policy)."""


@dataclass
class _Session:
    stub: Any
    metadata: tuple[tuple[str, str], ...]
    config: Any
    site: Any  # the SiteClient
    heartbeat_s: float = 30.0
    run_id: str = ""
    server_key: Any = None  # checks the audit heads; None: the server signs none
    task_limit: int = TASK_OVERHEAD_BYTES  # the largest task accepted (task_limit of the model)
    analysis: Any = None  # an analysis run's AnalysisSite (then ``site`` is None)


class _Heartbeats:
    """While the site works on a task, tell the server every ``heartbeat_s`` seconds that it is
    alive (the server fails the task of a site that goes silent instead of waiting for the
    round's deadline)."""

    def __init__(self, session: _Session, rnd: int) -> None:
        self.session, self.round = session, rnd
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consortium-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from consortium.deploy.proto import consortium_pb2 as pb

        while not self._stop.wait(self.session.heartbeat_s):
            try:
                self.session.stub.Heartbeat(
                    pb.HeartbeatRequest(round=self.round, status="working"),
                    metadata=self.session.metadata, timeout=10,
                )
            except Exception as exc:  # the work goes on; the pull loop reconnects if it must
                log.debug("heartbeat failed: %s", exc)


class SiteRunner:
    """Connects, registers, describes the site's data, then serves tasks (see module docstring).

    Args:
        server: ``host:port`` of the consortium server.
        site: this site's name (as provisioned).
        data: path of the site's CSV file.
        certs: the site's provisioned folder (``sites/<name>/``); None is ``--insecure``.
        target: the label column (default: the experiment's ``data.target``).
        poll_s: how long one pull may wait at the server for work.
        max_backoff_s: the longest pause between reconnection attempts.
        give_up_after_s: stop retrying after this long without a connection and exit with
            an error (default 10 minutes: a server that never came up, or a wrong address;
            0: retry forever).
        policy: the site's privacy policy file (TOML, ``[default]`` and/or ``[sites.<name>]``
            with ``max_epsilon``, ``delta``, ``min_sites``); the site refuses any task that
            would break it, whatever the server asks.
        state_dir: where the site keeps what must outlive a restart (its privacy spend, an
            algorithm's client state), one file per run; default ``<certs>/state``. Required
            with ``policy`` under ``--insecure``.
        approve: manifest hashes of experiments this site's operator approved
            (:mod:`consortium.client.approval`); the site refuses any other experiment unless
            its policy says ``approve = "matching"``.
        allow_models: ``package.module:factory`` models the operator trusts the site to import;
            any other non-built-in model is refused before anything is imported.
        receipts: the site's receipt log (:class:`~consortium.deploy.receipts.ReceiptLog`):
            per task, the server's signed audit head and the digest of what the site sent, so
            the server's log can be checked later (``consortium audit verify --against``);
            default ``<state>/receipts.jsonl`` when there is a state folder, else none.
        harmonize: the site's ``harmonize.toml`` (:mod:`consortium.data.harmonize`): its
            renames, code maps and unit conversions (with this site's ``[site.<site>]``
            sections) are applied to the site's file before anything is summarised or trained.
    """

    def __init__(
        self, server: str, *, site: str, data: str | Path, certs: str | Path | None,
        target: str = "", poll_s: float = 5.0, max_backoff_s: float = 30.0,
        give_up_after_s: float = 600.0, policy: str | Path | None = None,
        state_dir: str | Path | None = None, approve: Sequence[str] = (),
        allow_models: Sequence[str] = (), receipts: str | Path | None = None,
        harmonize: str | Path | None = None,
    ) -> None:
        try:
            import grpc
        except ImportError as exc:  # pragma: no cover - the extra is installed in dev
            raise MissingExtraError("the consortium client", "deploy", "grpcio") from exc
        self.grpc = grpc
        self.server = server
        self.site = site
        self.data = Path(data)
        self.target = target
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.give_up_after_s = give_up_after_s
        self.token: str | None = None
        self.approve = tuple(approve)
        self.allow_models = tuple(allow_models)
        self.identity: Any = None  # the site's signing identity for secure aggregation
        self.ca_pem: bytes | None = None  # the consortium CA: checks the server's audit key
        if certs is None:
            print("consortium client: WARNING --insecure: no TLS; the server is not authenticated "
                  "and the data's updates travel in the clear. Local experiments only.",
                  file=sys.stderr)
            self.credentials = None
        else:
            from consortium.deploy.provision import load_site_credentials

            creds = load_site_credentials(certs, site)
            self.token = creds.token
            from consortium.secagg.identity import site_identity

            self.identity = site_identity(creds, site)
            self.ca_pem = creds.ca_pem
            self.credentials = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
        if not self.data.is_file():
            raise ConfigError(f"--data {str(self.data)!r} is not a file; give the site's CSV")
        from consortium.data.harmonize import load_harmonization

        # read (and checked) now: a bad file fails at start, not after joining a run
        self.harmonize = load_harmonization(harmonize) if harmonize else None
        self.policy = _site_policy(policy, site) if policy is not None else None
        if state_dir is None and certs is not None:
            state_dir = Path(certs) / "state"
        if state_dir is None and self.policy is not None:
            raise ConfigError(
                "--policy needs somewhere to keep the site's privacy spend across restarts: "
                "pass --state DIR (with --certs it defaults to <certs>/state)"
            )
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._kept: dict[str, _Site] = {}
        from consortium.deploy.receipts import RECEIPTS_FILENAME, ReceiptLog

        if receipts is None and self.state_dir is not None:
            receipts = self.state_dir / RECEIPTS_FILENAME
        self.receipts = ReceiptLog(receipts) if receipts is not None else None
        self._told: dict[str, int] = {}  # run id -> the largest audit seq the server told us

    def _channel(self) -> Any:
        options = [("grpc.max_receive_message_length", 8 << 20),
                   ("grpc.max_send_message_length", 8 << 20)]
        if self.credentials is None:
            return self.grpc.insecure_channel(self.server, options=options)
        return self.grpc.secure_channel(self.server, self.credentials, options=options)

    def _connect(self, channel: Any) -> _Session:
        from consortium.deploy.codec import SESSION_METADATA_KEY
        from consortium.deploy.proto import consortium_pb2 as pb
        from consortium.deploy.proto import consortium_pb2_grpc as rpc

        stub = rpc.FederationStub(channel)
        from consortium.deploy import package_version

        mine = package_version()
        request = pb.RegisterRequest(site=self.site, client_version=mine)
        if self.token is not None:
            request.token = self.token
        reply = stub.Register(request, timeout=30)
        if reply.server_version and reply.server_version != mine:
            log.warning(
                "the server runs consortium %s, this site %s: models, algorithms and data "
                "loaders come from the installed package, so install the same version at every "
                "site and the server", peer_text(reply.server_version, 80), mine,
            )
        metadata = ((SESSION_METADATA_KEY, reply.session_id),)
        server_key = self._server_key(reply.server_certificate, reply.run_id)
        if reply.purpose:
            return self._connect_analysis(stub, reply, metadata, server_key)
        config, site = self._build(reply.config_toml, stub, metadata, reply.run_id)
        site.attach(self.policy, self._state_file(reply.run_id), self._kept.get(reply.run_id))
        if site.personal and self.state_dir is None:
            log.warning(
                "algorithm %r keeps this site's own model (its personal part) in memory only: a "
                "restarted site starts it again from the global model; pass --state DIR to keep "
                "it across restarts", config.algorithm.name,
            )
        self._kept = {reply.run_id: site}  # a reconnection to this run keeps the state
        info = site.describe()
        ack = stub.Describe(info, metadata=metadata, timeout=30)
        if not ack.accepted:
            raise ConsortiumError(f"the server refused this site's description: {peer_text(ack.reason, 500)}")
        log.info("registered as %r in run %r", self.site, reply.run_id)
        from consortium.types import Parameters

        layout = Parameters.from_module(site.client.model_factory()).layout
        return _Session(stub, metadata, config, site,
                        heartbeat_s=max(float(reply.heartbeat_seconds or 30), 0.5),
                        run_id=reply.run_id, server_key=server_key,
                        task_limit=task_limit(layout))

    def _connect_analysis(self, stub: Any, reply: Any, metadata: Any, server_key: Any) -> _Session:
        """Join an analysis run (``consortium server --analyze``): review the analysis, read
        this site's table, say it is ready (no data description: an analysis site declares no
        sizes) and answer analysis tasks (:mod:`consortium.deploy.analysis_site`).

        Raises:
            ExperimentRefused: the operator did not approve the analysis, or its policy forbids it.
            ConsortiumError: a purpose this version does not know, or the server refused us.
        """
        import tomllib

        from consortium.config import ExperimentConfig
        from consortium.deploy import analysis_site as analysis

        if reply.purpose != "analysis":
            raise ConsortiumError(f"the server runs a {peer_text(reply.purpose, 40)!r} run, which "
                                  "this consortium version does not know; install the server's")
        config = ExperimentConfig.from_dict(tomllib.loads(reply.config_toml))
        reason = analysis.review_analysis(config, self.policy, approved=self.approve,
                                          can_sign=self.identity is not None)
        if reason is not None:
            log.warning("refusing the analysis:\n%s",
                        analysis.format_analysis_manifest(analysis.analysis_manifest(config)))
            raise ExperimentRefused(f"site {self.site!r} refuses to join: {reason}")
        site = analysis.analysis_site(
            config, site=self.site, data=self.data, run_id=reply.run_id, policy=self.policy,
            state_dir=self.state_dir, identity=self.identity, harmonize=self.harmonize,
            floor=_secagg_floor(self.policy, can_sign=self.identity is not None),
        )
        ack = stub.Describe(analysis.ready_info(), metadata=metadata, timeout=30)
        if not ack.accepted:
            raise ConsortiumError(f"the server refused this site: {peer_text(ack.reason, 500)}")
        log.info("registered as %r in analysis run %r", self.site, reply.run_id)
        return _Session(stub, metadata, config, None,
                        heartbeat_s=max(float(reply.heartbeat_seconds or 30), 0.5),
                        run_id=reply.run_id, server_key=server_key, analysis=site)

    def _server_key(self, certificate: bytes, run_id: str) -> Any:
        """The key the server signs audit heads with, checked against the consortium CA, and
        recorded in the receipt log. None: the server sent no certificate (``--insecure``).

        Raises:
            UntrustedServer: the certificate is not a server certificate of this consortium.
        """
        from consortium.deploy.receipts import server_public_key

        key = None
        if certificate:
            # a certificate this site cannot check (no CA under --insecure) proves nothing
            key = server_public_key(certificate, ca_pem=self.ca_pem) if self.ca_pem else None
        elif self.ca_pem is not None:
            log.warning("the server sends no audit certificate: its audit heads are unsigned and "
                        "the receipts bind it less (an older server version?)")
        if self.receipts is not None:
            self.receipts.server(run_id=run_id, site=self.site,
                                 certificate=certificate if key is not None else b"")
        return key

    def _check_head(self, session: _Session, item: Any) -> bool | None:
        """Whether the task's audit head is signed by the server (None: unsigned); warns when
        it is not, or when the log went back (it was cut short or rewritten)."""
        from consortium.deploy.receipts import head_message, verify_head

        head = item.head
        if head is None:
            return None
        last = self._told.get(session.run_id, 0)
        if head.seq < last:
            log.warning("the server's audit log went back from seq %d to %d: it was cut short "
                        "or rewritten (the receipts keep both)", last, head.seq)
        self._told[session.run_id] = max(last, head.seq)
        if session.server_key is None or not head.signature:
            return None
        message = head_message(
            run_id=session.run_id, site=self.site, round=item.task.round, task_id=item.task_id,
            kind="evaluate" if item.evaluate else "train", seq=head.seq, hash=head.hash,
        )
        verified = verify_head(session.server_key, message, head.signature)
        if not verified:
            log.warning("the audit head of task %s is not signed by the server's key", item.task_id)
        return verified

    def _receipt(self, session: _Session, item: Any, verified: bool | None, upload: Any,
                 ack: Any) -> None:
        """Append the task's receipt: the head it came with, what was sent, the server's ack."""
        if self.receipts is None:
            return
        from consortium.deploy.audit import update_digest

        result = upload.result if upload is not None else None
        update = getattr(result, "update", None)
        if item.evaluate:
            sent = "evaluation"
        elif update is not None:
            sent = "update"
        else:
            sent = "refused" if getattr(result, "refused", False) else "error"
        self.receipts.record(
            run_id=session.run_id, site=self.site, round=item.task.round, task_id=item.task_id,
            kind="evaluate" if item.evaluate else "train", head=item.head, verified=verified,
            sent=sent, update_sha256=update_digest(_sent_delta(update, item.task.parameters.layout))[0] if update is not None else None,
            accepted=bool(ack.accepted) if ack is not None else None,
            reason=str(getattr(ack, "reason", "")) if ack is not None else "no acknowledgement",
        )

    def _state_file(self, run_id: str) -> Path | None:
        if self.state_dir is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id) or "run"
        return self.state_dir / f"{safe}.safetensors"

    def _build(self, config_toml: str, stub: Any, metadata: Any, run_id: str) -> tuple[Any, Any]:
        import tomllib

        from consortium.client.approval import experiment_manifest, format_manifest
        from consortium.config import ExperimentConfig

        config = ExperimentConfig.from_dict(tomllib.loads(config_toml))
        self.review(config)
        self.check_base(config)
        log.info("joining run %r:\n%s", run_id, format_manifest(experiment_manifest(config)))
        environment = self.environment(run_id)
        self._run_id = run_id  # the encoding's SecAgg+ context (secure_encoding_context)
        if config.data.dataset == "heart-disease":
            data = self._heart_disease(config, stub, metadata)
        elif config.data.dataset == "triage":
            data = self._notes(config)
        else:
            data = self._table(config, stub, metadata)
        return config, _Site.build(config, self.site, data, environment=environment,
                                   allow_models=self._allowed_models())

    def check_base(self, config: Any) -> None:
        """Refuse (before the site describes its data or takes a task) a LoRA experiment whose
        frozen base this site cannot confirm it holds: the experiment must name the base's
        SHA-256 (``[model.peft] base_sha256``, filled by the server) and the base this site
        builds from its own package (or ``[model.peft] path``) must hash so.

        Raises:
            ExperimentRefused: no hash named, or a different base here (both hashes named).
        """
        if config.model.name != "minilm-lora":
            return
        from consortium.models.peft import BaseMismatch, check_base

        expected = config.model.peft.base_sha256
        if not expected:
            raise ExperimentRefused(
                f"site {self.site!r} refuses to join: the experiment does not name the SHA-256 "
                "of its frozen base ([model.peft] base_sha256), so this site cannot check that "
                "it fine-tunes the same base as the others; `consortium server` fills it (run "
                "the server with this consortium version, or pin the hash in the experiment)"
            )
        try:
            check_base(expected, config.model.peft.path, where=f"at site {self.site!r}")
        except BaseMismatch as exc:
            raise ExperimentRefused(f"site {self.site!r} refuses to join: {exc}") from None
        log.info("the frozen base here has the experiment's SHA-256 %s", expected)

    def _notes(self, cfg: Any) -> Any:
        """The site's own text notes (``data.dataset = "triage"``), tokenised here with the
        base's own tokenizer (``[model.peft] path``, which the manifest names; ""
        = the packaged all-MiniLM-L6-v2's): nothing about the text is summarised or sent."""
        from consortium.data.triage import read_site_notes

        if cfg.data.path and cfg.data.path != cfg.model.peft.path:
            raise ConfigError(
                f"data.path = {cfg.data.path!r} names a tokenizer other than the base's "
                f"([model.peft] path = {cfg.model.peft.path!r}); a site tokenises its notes "
                "with the base's own tokenizer: set data.path to the same directory, or leave "
                "it empty"
            )
        return read_site_notes(self.data, site=self.site, tokenizer=cfg.model.peft.path,
                               test_fraction=cfg.data.test_fraction)

    def _allowed_models(self) -> tuple[str, ...]:
        return self.allow_models + (tuple(self.policy.models) if self.policy is not None else ())

    def review(self, config: Any) -> None:
        """Refuse (before anything is imported or read) an experiment this site did not
        approve, or one its policy forbids.

        Raises:
            ExperimentRefused: with the reason and the manifest's hash.
        """
        from consortium.client.approval import (
            experiment_manifest,
            format_manifest,
            review_experiment,
        )

        reason = review_experiment(config, self.policy, approved=self.approve,
                                   allow_models=self.allow_models,
                                   can_sign=self.identity is not None)
        if reason is not None:
            log.warning("refusing the experiment:\n%s", format_manifest(experiment_manifest(config)))
            raise ExperimentRefused(f"site {self.site!r} refuses to join: {reason}")

    def environment(self, run_id: str) -> Any:
        """The site's own resources for this run: its CSPRNG, its signing identity, its
        secure-aggregation minimums and the metrics it lets leave."""
        from consortium.client.environment import SiteEnvironment
        from consortium.privacy.randomness import SystemRandomness

        return SiteEnvironment(
            randomness=SystemRandomness(), identity=self.identity, run_id=run_id,
            secagg=_secagg_floor(self.policy, can_sign=self.identity is not None),
            send_metrics=frozenset(self.policy.send_metrics if self.policy else ()) | {"steps"},
        )

    def _table(self, cfg: Any, stub: Any, metadata: Any) -> Any:
        """The site's own table file, encoded with every site's statistics: send this file's
        schema and per-column sums, receive the merged ones (columns must agree; labels are
        the union), encode as `consortium run` would over all the files together.

        The site names only the categories its rows hold at least :meth:`category_min_count`
        times; a rarer value of its own encodes as all zeros (not as missing)."""
        from consortium.data.base import FederatedDataset
        from consortium.data.files import label_order, read_site_table
        from consortium.data.preprocess import Column, fit_encoder, summarize_site
        from consortium.deploy.summary import TableSchema, schema_from_pb, summary_from_pb

        column = self.target or cfg.data.target
        if not column:
            raise ConfigError("the label column is unknown: pass --target or set data.target")
        table = read_site_table(self.data, target=column, harmonize=self.harmonize,
                                site=self.site,
                                non_numeric=getattr(cfg.data, "non_numeric", "error"))
        # split with this file's labels first: the merged order keeps their relative order
        mine_labels = label_order(table.labels)
        x_train, y_train, x_test, y_test = table.split(
            classes=mine_labels, seed=cfg.seed, test_fraction=cfg.data.test_fraction
        )
        columns = [Column(c, "numeric" if n else "categorical")
                   for c, n in zip(table.features, table.numeric)]
        mine = summarize_site(x_train, columns=columns, holdout=x_test,
                              min_count=self.category_min_count(cfg))
        schema = TableSchema(table.features, table.numeric, table.labels)
        reply = self._merge(stub, metadata, mine, schema,
                            secure=_secure(cfg))
        merged = schema_from_pb(reply)
        if merged is None or merged.columns != table.features or merged.numeric != table.numeric:
            raise ConsortiumError(
                "the server's merged encoding does not match this site's columns; every site "
                "must read the same kind of file (check --data and the experiment's data set)"
            )
        classes = label_order(merged.labels)
        unknown = [k for k in mine_labels if k not in classes]
        if unknown:
            raise ConsortiumError(
                f"this site's file holds label {unknown[0]!r}, which the sites that started the "
                f"run do not have ({classes}); the run's classes are fixed"
            )
        remap = [classes.index(k) for k in mine_labels]
        encoder = fit_encoder(columns, summary_from_pb(reply))
        data = self._client_data(
            encoder.transform(x_train), [remap[int(v)] for v in y_train],
            encoder.transform(x_test), [remap[int(v)] for v in y_test],
        )
        return FederatedDataset("csv", {self.site: data}, len(classes), (encoder.num_features,),
                                feature_names=encoder.feature_names)  # [interpret]'s names

    def category_min_count(self, cfg: Any) -> int:
        """How many of this site's rows must hold a category before the site names it: the
        larger of its policy's ``min_count`` (unset: 5) and the experiment's
        ``analysis.min_count`` (:func:`~consortium.data.preprocess.category_min_count`)."""
        from consortium.data.preprocess import category_min_count

        return category_min_count(policy=self.policy.min_count if self.policy else 0,
                                  analysis=cfg.analysis.min_count)

    def _heart_disease(self, cfg: Any, stub: Any, metadata: Any) -> Any:
        """The hospital's own file, standardised with every hospital's statistics: send this
        site's per-column sums, receive the merged ones, fit the same encoder as everyone.
        The categorical columns' sets are fixed by the data set (``FEATURES``), so the
        hospital names none of its categories."""
        from consortium.data.base import FederatedDataset
        from consortium.data.heart_disease import FEATURES, site_split
        from consortium.data.preprocess import fit_encoder, summarize_site
        from consortium.deploy.summary import summary_from_pb

        if self.harmonize is not None:
            raise ConfigError(
                "a harmonisation file applies to a site's own table file, not to the built-in "
                "heart-disease data; drop it, or run an experiment with data.dataset = \"csv\""
            )
        if getattr(cfg.data, "split", "seeded") != "seeded":
            raise ConfigError(
                f"data.split = {cfg.data.split!r} (FLamby's fixed split) is for simulation; a "
                "deployed hospital splits its own file with the run seed: set data.split = "
                "\"seeded\" to deploy"
            )
        x_train, y_train, x_test, y_test = site_split(
            self.data, self.site, seed=cfg.seed, test_fraction=cfg.data.test_fraction
        )
        mine = summarize_site(x_train, columns=FEATURES, holdout=x_test)
        merged = self._merge(stub, metadata, mine, secure=_secure(cfg))
        encoder = fit_encoder(FEATURES, summary_from_pb(merged))
        data = self._client_data(encoder.transform(x_train), y_train,
                                 encoder.transform(x_test), y_test)
        return FederatedDataset("heart-disease", {self.site: data}, 2, (encoder.num_features,),
                                feature_names=encoder.feature_names)  # [interpret]'s names

    @staticmethod
    def _client_data(x_train: Any, y_train: Any, x_test: Any, y_test: Any) -> Any:
        import torch

        from consortium.data.base import ClientData, Split

        def split(x: Any, y: Any) -> Split:
            features = torch.as_tensor(x, dtype=torch.float32)
            if not bool(torch.isfinite(features).all()):
                # the server's merged statistics put this site's values beyond float32 (a
                # poisoned encoding): training on them would only produce NaN losses
                raise ConsortiumError(
                    "the server's merged data encoding turns this site's rows into NaN or "
                    "infinite features (its means or deviations are absurd); refusing to "
                    "train on them: ask the operator to check the sites' data summaries"
                )
            return Split(features, torch.as_tensor(y, dtype=torch.long))

        return ClientData(split(x_train, y_train), split(x_test, y_test))

    def _merge(self, stub: Any, metadata: Any, mine: Any, schema: Any = None, *,
               secure: bool = False) -> Any:
        """Send this site's summary; wait for the server's merge of every site's.

        ``secure`` (``secure_aggregation.enabled``): the summary carries only the schema and
        the released categories; the sums go masked through the encoding's SecAgg+ round,
        answered here while waiting (:mod:`consortium.deploy.secure_encoding`)."""
        from consortium.deploy.proto import consortium_pb2 as pb
        from consortium.deploy.secure_encoding import EncodingSecAgg, clear_part
        from consortium.deploy.summary import summary_to_pb

        secagg = None
        if secure:
            secagg = EncodingSecAgg(
                self.site, mine, run_id=getattr(self, "_run_id", ""), identity=self.identity,
                floor=_secagg_floor(self.policy, can_sign=self.identity is not None))
            mine = clear_part(mine)
        ack = stub.Summarize(summary_to_pb(mine, schema=schema), metadata=metadata, timeout=30)
        if not ack.accepted:
            raise ConsortiumError(f"the server refused this site's data summary: {peer_text(ack.reason, 500)}")
        while True:  # every site must send its summary first
            wait = 10 if secagg is None else 0  # the server waits at least 0.1 s
            reply = stub.Encoding(pb.PullRequest(wait_seconds=wait), metadata=metadata, timeout=60)
            if reply.ready:
                return reply
            if secagg is not None:
                self._encoding_exchange(stub, metadata, secagg)

    def _encoding_exchange(self, stub: Any, metadata: Any, secagg: Any) -> None:
        """Pull one work item while the encoding is summed and answer it if it is a phase of
        the encoding's SecAgg+ round (nothing else is sent before the site describes itself)."""
        from consortium.deploy.codec import (
            ExchangeEnvelope,
            chunk,
            decode_work,
            encode_exchange,
            reassemble,
        )
        from consortium.deploy.proto import consortium_pb2 as pb

        frames = stub.PullTask(pb.PullRequest(wait_seconds=1), metadata=metadata, timeout=60)
        item = decode_work(bytes(reassemble(frames, max_total_bytes=64 << 20)))
        if not isinstance(item, ExchangeEnvelope):
            return
        try:
            reply = secagg.respond(item.stage, item.phase, item.message, round=item.round)
            out = ExchangeEnvelope(item.stage, item.phase, item.round, self.site, reply)
        except ConsortiumError as exc:
            out = ExchangeEnvelope(item.stage, item.phase, item.round, self.site, None, str(exc))
        ack = stub.Exchange(chunk(encode_exchange(out).SerializeToString(), uuid.uuid4().hex),
                            metadata=metadata, timeout=120)
        if not ack.accepted:
            log.warning("the server refused our %r reply: %s", item.phase,
                        peer_text(ack.reason, 500))

    def run(self) -> int:
        """Serve until the server finishes the run; the number of tasks answered."""
        grpc = self.grpc
        backoff = 0.5
        answered = 0
        # since when the server has not answered: the start, or the first failure after a
        # connection (not the connection's start: a long run must not count against the limit)
        lost_since: float | None = time.monotonic()
        while True:
            channel = self._channel()
            try:
                session = self._connect(channel)
                backoff = 0.5
                lost_since = None
                while True:
                    done = self._one(session)
                    if done is None:
                        return answered
                    answered += done
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and "register again" not in str(exc.details()):
                    raise ConsortiumError(f"the server refused site {self.site!r}: {peer_text(exc.details(), 500)}") from None
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    raise ConsortiumError(f"the run cannot use this site's data: {peer_text(exc.details(), 500)}") from None
                if lost_since is None:
                    lost_since = time.monotonic()
                if self.give_up_after_s and time.monotonic() - lost_since > self.give_up_after_s:
                    raise ConsortiumError(
                        f"no connection to {self.server} for {self.give_up_after_s:g} s ({code}: "
                        f"{exc.details()}); gave up (--give-up-after; 0 retries forever). Is the "
                        "server up at that address, and are these the consortium's certificates?"
                    ) from None
                if self.give_up_after_s:  # no sleep past the limit
                    left = self.give_up_after_s - (time.monotonic() - lost_since)
                    backoff = max(min(backoff, left + 0.01), 0.01)
                log.warning("connection lost (%s); retrying in %.1f s", code, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                channel.close()

    def _one(self, session: _Session) -> int | None:
        """Pull one work item and answer it: 1 if a task was answered, 0 if none, None at the end."""
        from consortium.deploy.codec import (
            AnalysisTaskEnvelope,
            EvaluationEnvelope,
            ExchangeEnvelope,
            Finished,
            ResultEnvelope,
            TaskEnvelope,
            Wait,
            chunk,
            decode_work,
            encode_exchange,
            encode_upload,
            reassemble,
        )
        from consortium.deploy.proto import consortium_pb2 as pb

        frames = session.stub.PullTask(
            pb.PullRequest(wait_seconds=int(self.poll_s)), metadata=session.metadata,
            timeout=self.poll_s + 30,
        )
        # the call's deadline bounds a stalled stream; the model bounds what it may hold
        item = decode_work(bytes(reassemble(frames, max_total_bytes=session.task_limit)))
        if isinstance(item, Finished):
            log.info("the server finished the run: %s", peer_text(item.reason, 500))
            return None
        if isinstance(item, Wait):
            return 0
        if isinstance(item, ExchangeEnvelope):
            with _Heartbeats(session, item.round):
                try:
                    responder = session.analysis or session.site.client
                    if (session.analysis is None and item.stage == "interpret"
                            and session.site.interpreter is not None):
                        responder = session.site.interpreter  # [interpret]'s secure total
                    reply = responder.respond(item.stage, item.phase, item.message,
                                              round=item.round)
                    out = ExchangeEnvelope(item.stage, item.phase, item.round, self.site, reply)
                except ConsortiumError as exc:
                    out = ExchangeEnvelope(item.stage, item.phase, item.round, self.site, None,
                                           str(exc))
                except Exception as exc:
                    log.exception("answering the server's %r message failed", item.phase)
                    out = ExchangeEnvelope(item.stage, item.phase, item.round, self.site, None,
                                           f"the site could not answer: {type(exc).__name__}")
                ack = session.stub.Exchange(
                    chunk(encode_exchange(out).SerializeToString(), uuid.uuid4().hex),
                    metadata=session.metadata, timeout=120,
                )
            if not ack.accepted:
                log.warning("the server refused our %r reply: %s", item.phase, peer_text(ack.reason, 500))
            return 0
        if isinstance(item, AnalysisTaskEnvelope):
            return self._analysis_task(session, item)
        assert isinstance(item, TaskEnvelope)
        verified = self._check_head(session, item)
        upload: ResultEnvelope | EvaluationEnvelope | None = None
        ack = None
        try:
            with _Heartbeats(session, item.task.round):
                upload = self._work(session, item)
                ack = session.stub.PushResult(
                    chunk(encode_upload(upload), uuid.uuid4().hex), metadata=session.metadata,
                    timeout=600,
                )
        finally:  # a receipt even when the push failed: the task and its head came
            self._receipt(session, item, verified, upload, ack)
        if not ack.accepted:
            log.warning("the server refused our result: %s", peer_text(ack.reason, 500))
        return 1

    def _analysis_task(self, session: _Session, item: Any) -> int:
        """Answer one analysis task (:meth:`AnalysisSite.answer
        <consortium.deploy.analysis_site.AnalysisSite.answer>`) and push the answer."""
        from consortium.deploy.codec import AnalysisResultEnvelope, chunk, encode_upload

        with _Heartbeats(session, 1):
            if session.analysis is None and session.site is not None:
                # a training run's [interpret] / [contribution] after the last round
                upload = self._interpreter(session).answer(item)
            elif session.analysis is None:
                upload = AnalysisResultEnvelope(item.task_id, item.phase, refused=True,
                                                error="this site joined a training run")
            else:
                upload = session.analysis.answer(item)
            ack = session.stub.PushResult(chunk(encode_upload(upload), uuid.uuid4().hex),
                                          metadata=session.metadata, timeout=600)
        if not ack.accepted:
            log.warning("the server refused our %s answer: %s", item.phase,
                        peer_text(ack.reason, 500))
        return 1

    def _interpreter(self, session: _Session) -> Any:
        """The site's :class:`~consortium.deploy.interpret_site.InterpretSite` for this run
        (made once), holding the model of its latest evaluation task."""
        from consortium.deploy.interpret_site import InterpretSite

        site = session.site
        if site.interpreter is None:
            site.interpreter = InterpretSite(
                self.site, site.client, site.feature_names, policy=self.policy,
                cfg=session.config, identity=self.identity,
                floor=_secagg_floor(self.policy, can_sign=self.identity is not None))
        if site.final is not None:
            site.interpreter.saw(*site.final)
        return site.interpreter

    def _work(self, session: _Session, item: Any) -> Any:
        """Run a task: the ``ResultEnvelope`` or ``EvaluationEnvelope`` to send back."""
        from consortium.deploy.codec import EvaluationEnvelope, ResultEnvelope
        from consortium.messages import EvaluationResult, Result

        if item.evaluate:
            try:
                evaluation = session.site.evaluate(item.task)
            except Exception as exc:
                log.exception("evaluating the server's task failed")
                evaluation = EvaluationResult(item.task.round, self.site, 0, {})
                log.warning("answered with no metrics: %s", type(exc).__name__)
            return EvaluationEnvelope(item.task_id, evaluation)
        from consortium.compression.downlink import DownlinkMismatch

        try:  # under downlink compression: the model rebuilt from this site's reference
            task = session.site.model_of(item.task)
        except DownlinkMismatch as exc:  # the server sends the task again with the whole model
            log.warning("%s", exc)
            return ResultEnvelope(item.task_id, Result(item.task.round, self.site, None,
                                                       error=str(exc)))
        try:
            result = session.site.fit(task)
        except Exception as exc:
            log.exception("training on the server's task failed")
            result = Result(item.task.round, self.site, None,
                            error=f"the site could not train on this task: {type(exc).__name__}: {exc}")
        if result.refused:
            log.warning("%s", result.error)
        session.site.save_state()  # the spend and the site's own model are on disk before it leaves
        result, parts = session.site.shared_part(result, task.parameters.layout)
        return ResultEnvelope(item.task_id, result, parts=parts)


def _site_policy(path: str | Path, site: str) -> Any:
    from consortium.privacy.policy import load_policies

    policies = load_policies(path)
    policy = policies.get(site, policies.get("*"))
    if policy is None:
        raise ConfigError(
            f"policy file {str(path)!r} has no rule for site {site!r}: add [default] or "
            f"[sites.{site}]"
        )
    return policy


@dataclass
class _Site:
    """The site's client with what must outlive a reconnection: its state (privacy spend, an
    algorithm's client state) and the algorithm state it had before the latest round."""

    client: Any
    info: tuple[tuple[int, ...], int, int, int]
    state_file: Path | None = None
    before: tuple[int, dict[str, Any]] | None = None
    finetune_steps: int = 0  # personalization.finetune_steps: fine-tune before the last evaluation
    rounds: int = 0  # the run's rounds (the last evaluation fine-tunes)
    base: tuple[str, str] | None = None  # minilm-lora: (the base's SHA-256, [model.peft] path)
    downlink: str = "none"  # compression.downlink: the site keeps the model it received
    downlink_bits: int = 4  # compression.bits and .chunk: what the messages' headers must say
    downlink_chunk: int = 512
    reference: Any = None  # its SiteReference (per-client downlink), made at the first task
    saved_reference: tuple[int, Any] | None = None  # (round, model) read from the state file
    # server.mode fedbuff/fedasync: several tasks may carry one round (the server's version),
    # so a repeated round is not a restarted server's and nothing is rolled back
    asynchronous: bool = False
    feature_names: Any = None  # the data set's encoded column names ([interpret] after the run)
    final: tuple[int, Any] | None = None  # (round, model) of the latest evaluation task
    interpreter: Any = None  # its InterpretSite, made at the first interpret/contribution task
    local_baseline: bool = False  # evaluation.baselines names "local": train alone at home
    init_seed: int = 0  # the run's initial model (derive_init_seed), the local-only model's start
    local_metrics: dict[str, float] | None = None  # its local-only model's, once trained
    # evaluation.baseline_budget: "matched" trains the local-only model for the steps this
    # site trained in the federation (its own count, per round; several a round when async)
    baseline_budget: str = "full"
    steps_trained: dict[str, int] = field(default_factory=dict)

    def attach(self, policy: Any, state_file: Path | None, kept: _Site | None = None) -> None:
        """Enforce ``policy``; take the state from ``kept`` (this process's previous session of
        the same run) or from ``state_file`` (an earlier process), and keep saving it there."""
        self.client.policy = policy
        self.state_file = state_file
        if kept is not None:
            self.client.state, self.before = kept.client.state, kept.before
            self.reference, self.saved_reference = kept.reference, kept.saved_reference
            self.steps_trained = kept.steps_trained
        elif state_file is not None and state_file.exists():
            self._load(state_file)

    def _load(self, state_file: Path) -> None:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        from consortium.client.state import ClientStateStore

        try:
            flat = load_file(str(state_file))
            with safe_open(str(state_file), "pt") as fh:
                meta = fh.metadata() or {}
        except (OSError, SafetensorError) as exc:
            raise ConfigError(
                f"the site's saved state {str(state_file)!r} is unreadable ({exc}); it holds "
                "the site's privacy spend for this run, so it is not discarded: restore it "
                "from a backup, or move it away to start the site's record afresh"
            ) from exc
        snapshot = {k[len(_BEFORE):]: v for k, v in flat.items() if k.startswith(_BEFORE)}
        self.client.state = ClientStateStore.from_flat(
            {k: v for k, v in flat.items()
             if not k.startswith(_BEFORE) and not k.startswith(_DOWNLINK)}
        )
        if _DOWNLINK + "model" in flat and "downlink_round" in meta:
            self.saved_reference = (int(meta["downlink_round"]), flat[_DOWNLINK + "model"])
        if "before_round" in meta:
            self.before = (int(meta["before_round"]), snapshot)
        if "steps_trained" in meta:
            self.steps_trained = _steps_record(meta["steps_trained"], state_file)
        log.info("site state restored from %s", state_file)

    def fit(self, task: Any) -> Any:
        """Train on ``task``. A task for the round this site last trained is that round again
        (the server restarted from its checkpoint and lost our result): the algorithm state
        goes back to what it was before that round — the privacy spend does not, the first
        update did leave the site. Not in the asynchronous modes, where several tasks carry
        the same round (the server's version) and each builds on the state the last left."""
        mine = self.client.state.get(self.client.client_id)
        if self.asynchronous:  # each task builds on the last (an uplink EF residual); the
            self.before = (task.round, {})  # round stays in the state file's metadata
        elif self.before is not None and self.before[0] == task.round:
            spent = {n: t for n, t in mine.items() if n.startswith(_PRIVACY)}
            mine.clear()
            mine.update({n: t.clone() for n, t in self.before[1].items()})
            mine.update(spent)
            log.info("round %d again (the server restarted): client state rolled back", task.round)
        else:
            self.before = (task.round, {n: t.clone() for n, t in mine.items()
                                        if not n.startswith(_PRIVACY)})
        result = self.client.fit(task)
        self.check_base_unchanged()
        update = getattr(result, "update", None)
        if update is not None:  # a repeated round (restarted server) replaces its count
            key = f"{task.round}.{len(self.steps_trained)}" if self.asynchronous else str(task.round)
            self.steps_trained[key] = int(update.metrics.get("steps", 0))
        return result

    def check_base_unchanged(self) -> None:
        """A LoRA site's frozen base still hashes as the experiment's (training must never
        write to it; ~0.08 s for MiniLM's 22.7 M values).

        Raises:
            ModelError: it changed: the update is not sent (the task fails with the reason).
        """
        if self.base is None:
            return
        from consortium.models.peft import base_hash, load_base

        expected, path = self.base
        now = base_hash(load_base(path).encoder)
        if now != expected:
            raise ModelError(f"training changed this site's frozen base (SHA-256 {now}, the "
                             f"experiment's {expected}); the update is not sent: restart the "
                             "site, and report this as a bug")

    def model_of(self, task: Any) -> Any:
        """``task`` with the model to train from: under downlink compression a task's
        :class:`~consortium.compression.downlink.ModelDelta` is applied to this site's
        reference (:meth:`SiteReference.resolve`), and a whole model becomes the reference.

        Raises:
            DownlinkMismatch: the model cannot be rebuilt here (the reason says why).
        """
        import dataclasses

        if self.downlink == "none":
            return task
        if self.reference is None:
            from consortium.compression.downlink import SiteReference
            from consortium.types import Parameters

            layout = Parameters.from_module(self.client.model_factory()).layout
            self.reference = SiteReference(self.downlink, layout, bits=self.downlink_bits,
                                           chunk=self.downlink_chunk)
            if self.saved_reference is not None:
                self.reference.keep(*self.saved_reference)
        if task.downlink is None:
            self.reference.keep(task.round, task.parameters.vector)
            return task
        params = self.reference.resolve(task.round, task.downlink)
        return dataclasses.replace(task, parameters=params, downlink=None)

    def save_state(self) -> None:
        """Write the site's state atomically (a crash leaves the previous file whole)."""
        if self.state_file is None:
            return
        import os

        from safetensors.torch import save_file

        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        flat = {k: v.contiguous() for k, v in self.client.state.to_flat().items()}
        meta = {}
        if self.before is not None:
            meta["before_round"] = str(self.before[0])
            flat.update({_BEFORE + k: v.contiguous() for k, v in self.before[1].items()})
        if self.steps_trained:
            meta["steps_trained"] = json.dumps(self.steps_trained, sort_keys=True)
        ref = self.reference
        if ref is not None and ref.vector is not None:  # a restarted site continues from it
            meta["downlink_round"] = str(ref.round)
            flat[_DOWNLINK + "model"] = ref.vector.contiguous()
        save_file(flat, str(tmp), metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)

    @classmethod
    def build(cls, cfg: Any, name: str, dataset: Any, *, environment: Any = None,
              allow_models: Sequence[str] = ()) -> _Site:
        from consortium.client.app import SiteClient
        from consortium.client.state import ClientStateStore
        from consortium.federation import Federation, Given, build_algorithm_parts, site_pipeline
        from consortium.models.zoo import freeze, model_factory

        (data,) = dataset.clients.values()
        factory = freeze(model_factory(cfg.model.name, dataset.input_shape, dataset.num_classes,
                                       hidden=cfg.model.hidden, allowed=allow_models,
                                       peft=cfg.model.peft),
                         cfg.model.freeze)
        # the server's own builder: the algorithm with every setting of the experiment the
        # operator approved ([algorithm] and [personalization]), as the server builds it
        parts = Federation(cfg, Given())
        build_algorithm_parts(parts)
        algorithm, settings = parts.algorithm, parts.settings
        client = SiteClient(
            name, data, model_factory=factory, algorithm=algorithm,
            pipeline=site_pipeline(cfg, algorithm, settings), settings=settings,
            loss_fn=_cross_entropy, num_classes=dataset.num_classes, state=ClientStateStore(),
            environment=environment,
        )
        info = (tuple(dataset.input_shape), dataset.num_classes, len(data.train), len(data.test))
        site = cls(client, info)
        if cfg.model.name == "minilm-lora" and cfg.model.peft.base_sha256:
            site.base = (cfg.model.peft.base_sha256, cfg.model.peft.path)
        site.finetune_steps = cfg.personalization.finetune_steps
        site.rounds = cfg.rounds
        site.asynchronous = cfg.server.mode != "sync"
        site.downlink = cfg.compression.downlink
        site.downlink_bits, site.downlink_chunk = cfg.compression.bits, cfg.compression.chunk
        site.feature_names = dataset.feature_names
        from consortium.federation import derive_init_seed

        site.local_baseline = "local" in cfg.evaluation.baselines
        site.baseline_budget = cfg.evaluation.baseline_budget
        site.init_seed = derive_init_seed(cfg)
        return site

    @property
    def personal(self) -> bool:
        """Whether the algorithm keeps a model of the site's own (FedPer, FedRep, FedBN, Ditto,
        APFL)."""
        return hasattr(self.client.algorithm, "own_parameters")

    def shared_part(self, result: Any, layout: Any) -> tuple[Any, Any]:
        """``(result, parts)`` to send: under an algorithm with personal tensors (FedPer,
        FedRep, FedBN) the update's delta cut down to the shared tensors, which ``parts`` names
        (:mod:`consortium.deploy.shared`); the personal ones never leave the site, not even
        as zeros. Any other result goes as it is, with ``parts`` None."""
        import dataclasses

        from consortium.deploy.shared import cut, shared_layout

        shared = shared_layout(self.client.algorithm, layout)
        update = result.update
        # under secure aggregation the delta is empty: its values travel masked, whole
        if shared is None or update is None or update.delta.numel() != layout.size:
            return result, None
        update = dataclasses.replace(update, delta=cut(update.delta, layout, shared))
        return dataclasses.replace(result, update=update), shared

    def evaluate(self, task: Any) -> Any:
        """The global model's metrics on the site's test split, and, under a personalised
        algorithm (or with ``personalization.finetune_steps`` in the last round), its own
        model's as ``personalized_<name>`` (fine-tuned first when asked, without DP noise:
        only the metrics leave the site, never the model)."""
        import dataclasses

        from consortium.deploy.validate import PERSONALIZED

        if self.final is None or task.round >= self.final[0]:  # [interpret] explains it
            self.final = (task.round, task.parameters)
        evaluation = self.client.evaluate(task)
        evaluation = self._with_local_baseline(task, evaluation)
        finetune = self.finetune_steps if task.round >= self.rounds else 0
        if not (self.personal or finetune):
            return evaluation
        own = self.client.evaluate_personalized(task, finetune_steps=finetune)
        metrics = {**evaluation.metrics,
                   **{PERSONALIZED + k: v for k, v in own.metrics.items()}}
        return dataclasses.replace(evaluation, metrics=metrics)

    def _with_local_baseline(self, task: Any, evaluation: Any) -> Any:
        """In the last round, with ``evaluation.baselines`` naming ``"local"``: ``evaluation``
        plus this site's local-only baseline as ``local_<name>`` (a model trained alone here
        from the run's initial model for ``rounds`` × its local work, evaluated on its test
        split: :func:`~consortium.server.baselines.train_alone`), each metric only if the
        site's policy lets it leave (``send_metrics`` names it, e.g. ``"local_accuracy"``)."""
        import dataclasses

        from consortium.server.baselines import train_alone

        if not self.local_baseline or task.round < self.rounds:
            return evaluation
        client = self.client
        env = client.environment
        if self.local_metrics is None:  # trained once, even if the evaluation is asked again
            steps = sum(self.steps_trained.values()) if self.baseline_budget == "matched" else None
            self.local_metrics = {} if steps == 0 else train_alone(  # 0: nothing to match
                client.model_factory, self.init_seed, client.data, client.settings,
                rounds=self.rounds, loss_fn=client.loss_fn, num_classes=client.num_classes,
                randomness=env.randomness if env is not None else None, steps=steps,
            )
        allowed = env.send_metrics if env is not None else None
        local = {f"local_{k}": v for k, v in self.local_metrics.items()
                 if allowed is None or f"local_{k}" in allowed}
        if not local:
            return evaluation
        return dataclasses.replace(evaluation, metrics={**evaluation.metrics, **local})

    def describe(self) -> Any:
        from consortium.deploy.proto import consortium_pb2 as pb

        shape, classes, n_train, n_test = self.info
        return pb.SiteInfo(input_shape=list(shape), num_classes=classes, num_train=n_train,
                           num_test=n_test)


def _steps_record(text: str, state_file: Path) -> dict[str, int]:
    """The steps-per-round record in a site's state file (its matched local-only budget)."""
    try:
        record = json.loads(text)
        if isinstance(record, dict) and all(
                isinstance(k, str) and type(v) is int and v >= 0 for k, v in record.items()):
            return record
    except ValueError:
        pass
    raise ConfigError(
        f"the site's saved state {str(state_file)!r} has an unreadable steps record; restore "
        "the file from a backup, or move it away to start the site's record afresh"
    )


def _sent_delta(update: Any, layout: Any = None) -> Any:
    """The delta an update stands for: a compressed one's decoding (the server's audit log
    records the digest of the same decoded delta; ``layout``'s shapes decode PowerSGD's
    factors), else the delta as sent."""
    enc = getattr(update, "encoded", None)
    if enc is None:
        return update.delta
    from consortium.compression.encoded import decode

    shapes = [s.shape for s in layout.specs] if layout is not None else None
    return decode(enc, size=enc.size, shapes=shapes)


def _secure(cfg: Any) -> bool:
    """Whether the experiment sums with SecAgg+ (then the encoding's sums do too)."""
    return bool(getattr(getattr(cfg, "secure_aggregation", None), "enabled", False))


def _secagg_floor(policy: Any, *, can_sign: bool) -> Any:
    """The site's own secure-aggregation minimums (never lowered by the server)."""
    from consortium.secagg.floor import SecAggFloor

    kwargs: dict[str, Any] = {"require_signatures": can_sign}
    if policy is not None:
        if policy.secagg_threshold:
            kwargs["min_threshold"] = policy.secagg_threshold
        if policy.secagg_neighbours:
            kwargs["min_neighbours"] = policy.secagg_neighbours
        if policy.min_sites:
            kwargs["min_cohort"] = policy.min_sites + 1
    return SecAggFloor(**kwargs)


def _cross_entropy(logits: Any, y: Any) -> Any:
    import torch

    return torch.nn.functional.cross_entropy(logits, y)


def run_client(server: str, **kwargs: Any) -> int:
    return SiteRunner(server, **kwargs).run()
