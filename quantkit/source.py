"""Alias / Hub id / local folder → a validated `Checkpoint` (folder, config, architecture, dtype, fingerprint)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from quantkit.arch import Architecture, for_checkpoint, lookup, unsupported
from quantkit.errors import QuantkitError
from quantkit.hubname import HUB_ID as _HUB_ID
from quantkit.models import KnownModel, find_known
from quantkit.safetensors_io import FLOAT_DTYPES, TensorSource

DOWNLOAD_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
    "LICENSE*",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")


@dataclass
class Checkpoint:
    """A local bf16/fp16/fp32 safetensors checkpoint ready to quantize."""

    name: str  # the short name used for files: T-lite-0.1
    path: Path
    config: dict[str, Any]
    source: str  # what the user typed
    hub_id: str | None = None
    known: KnownModel | None = None
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype → tensor count

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    @cached_property
    def arch(self) -> Architecture:
        """Everything quantkit knows about this checkpoint's architecture (the registry in `quantkit.arch`)."""
        return for_checkpoint(self.path, self.config)

    @property
    def family(self) -> str:
        return self.arch.family

    @cached_property
    def canonical_names(self) -> dict[str, str]:
        """Text-model tensor name (``model.layers.0…``) → the checkpoint's own name, in file order; tensors the
        architecture leaves out (a vision tower) are not listed."""
        out: dict[str, str] = {}
        for hf_name in self.tensors.names():
            name = self.arch.canonical_name(hf_name)
            if name is not None:
                out[name] = hf_name
        return out

    def read_f32(self, name: str) -> Any:
        """A text-model tensor by its canonical name, as float32."""
        return self.tensors.read_f32(self.canonical_names[name])

    @property
    def dtype(self) -> str:
        floats = {k: v for k, v in self.dtypes.items() if k in FLOAT_DTYPES}
        return max(floats, key=lambda k: floats[k]) if floats else "?"

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        path = self.path / "tokenizer_config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    @property
    def chat_template(self) -> str | None:
        tpl = self.tokenizer_config.get("chat_template")
        jinja = self.path / "chat_template.jinja"
        if not tpl and jinja.exists():
            tpl = jinja.read_text(encoding="utf-8")
        if isinstance(tpl, list):  # named templates: take "default"
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), tpl[0]["template"])
        return tpl or None

    @property
    def instruct(self) -> bool:
        """Instruct models get chat-formatted calibration. Known models say; otherwise a chat template does."""
        if self.known is not None:
            return self.known.instruct
        return self.chat_template is not None

    @cached_property
    def tensors(self) -> TensorSource:
        return TensorSource(self.path)

    @cached_property
    def n_params(self) -> int:
        total = 0
        for info in self.tensors.tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total

    @cached_property
    def license(self) -> str | None:
        card = self.path / "README.md"
        if card.exists():
            meta = card_metadata(card.read_text(encoding="utf-8", errors="replace"))
            if meta.get("license"):
                return str(meta["license"])
        return self.known.license if self.known else None

    @cached_property
    def fingerprint(self) -> str:
        """Hash of config, tokenizer files, every safetensors header and size, and what identifies each file's
        weights (its Hub blob hash, or a cached content hash: `quantkit.fingerprint`)."""
        from quantkit.fingerprint import weights_identity

        h = hashlib.sha256()
        h.update((self.path / "config.json").read_bytes())
        for name in TOKENIZER_FILES:
            p = self.path / name
            if p.exists():
                h.update(name.encode())
                h.update(p.read_bytes())
        for file in self.tensors.files:  # sorted, with headers already read
            h.update(file.name.encode())
            h.update(str(file.stat().st_size).encode())
            h.update(self.tensors.headers[file.name])
            h.update(weights_identity(file).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "hub_id": self.hub_id,
            "path": str(self.path),
            "architecture": self.architecture,
            "family": self.family,
            "dtype": self.dtype,
            "instruct": self.instruct,
            "license": self.license,
            "license_note": self.known.license_note if self.known and self.known.license_note else None,
            "params": self.n_params,
            "fingerprint": self.fingerprint,
        }


def card_metadata(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card, or {}."""
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


Requirement = Callable[[type[Architecture]], "str | None"]


def resolve(spec: str, *, revision: str | None = None, allow_download: bool = True,
            require: Requirement | None = None) -> Checkpoint:
    """Turn what the user typed (alias, Hub id, local folder, or ``demo``) into a validated checkpoint.

    `require(architecture_class)` returns why the job cannot use that architecture (a format its engine does not
    support), or None. It is asked before any weight is downloaded: from the known-model table for an alias, from
    ``config.json`` alone for another Hub id.
    """
    known = find_known(spec)
    local = Path(spec).expanduser()
    if known is not None and known.built_here:
        return _checked(load_local(known.build(), name=known.name, source=spec), require)
    if local.exists():
        if not local.is_dir():
            raise QuantkitError(f"{spec} is a file, not a checkpoint folder",
                                "pass the folder that holds config.json and *.safetensors")
        return _checked(load_local(local, name=local.resolve().name, source=spec), require)
    if known is not None:
        _require(known.architecture, require)
        folder = download(known.hub_id, revision=revision, allow_download=allow_download)
        return load_local(folder, name=known.alias, source=spec, hub_id=known.hub_id, known=known)
    if looks_like_path(spec):
        raise QuantkitError(f"no such folder: {spec}", "check the path, or use a Hub id or an alias (quantkit models)")
    if _HUB_ID.match(spec):
        _require(peek_architecture(spec, revision=revision, allow_download=allow_download), require)
        folder = download(spec, revision=revision, allow_download=allow_download)
        return load_local(folder, name=spec.split("/")[-1], source=spec, hub_id=spec)
    raise QuantkitError(
        f"unknown model or alias '{spec}'",
        "use a local folder, a Hub id like org/name, or an alias listed by `quantkit models`",
    )


def architecture_of(spec: str) -> type[Architecture] | None:
    """The registered architecture of what `spec` names, when that is known without downloading (an alias, a local
    folder); None otherwise (an unknown architecture, or a Hub id not fetched yet)."""
    known = find_known(spec)
    if known is not None:
        return lookup(known.architecture)
    config = Path(spec).expanduser() / "config.json"
    if config.is_file():
        try:
            name = (read_config(config).get("architectures") or [""])[0]
        except (QuantkitError, OSError):
            return None
        return lookup(name)
    return None


def read_config(path: Path) -> dict[str, Any]:
    """A checkpoint's config.json: a JSON object whose ``architectures`` (when present) is a list of names."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"{path} is not valid JSON", "download the checkpoint again") from exc
    arches = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not (arches is None or (isinstance(arches, list)
                                                               and all(isinstance(a, str) for a in arches))):
        raise QuantkitError(f"{path} is not a Hugging Face model config (a JSON object with an `architectures` list)",
                            "download the checkpoint again")
    return config


def _require(architecture: str | None, require: Requirement | None) -> None:
    """Refuse an architecture the registry does not know, or that `require` rejects (None: not known yet)."""
    if architecture is None:
        return
    cls = lookup(architecture)
    if cls is None:
        raise unsupported(architecture)
    reason = require(cls) if require else None
    if reason:
        raise QuantkitError(reason, "quantkit models lists which formats each architecture supports")


def _checked(ckpt: Checkpoint, require: Requirement | None) -> Checkpoint:
    _require(ckpt.architecture, require)
    return ckpt


def peek_architecture(repo_id: str, *, revision: str | None, allow_download: bool) -> str | None:
    """``architectures[0]`` of a Hub model's ``config.json``, fetched alone (into the Hub cache); None when the Hub
    cannot tell (the full download that follows then says why)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=not allow_download)
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreachable, gated, missing: `download` reports it properly
        return None
    return (config.get("architectures") or [None])[0]


def looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1) or spec.endswith("/")


def download(repo_id: str, *, revision: str | None, allow_download: bool) -> Path:
    """Fetch only safetensors, configs and tokenizer files via huggingface_hub (its cache and offline mode)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a core dependency
        raise QuantkitError("huggingface_hub is not installed", "pip install 'quantkit-ru[hub]'") from exc
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=DOWNLOAD_PATTERNS,
            local_files_only=not allow_download,
        )
    except GatedRepoError as exc:
        raise QuantkitError(f"{repo_id} is gated on the Hub",
                            "accept its licence on the model page and log in (hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise QuantkitError(f"{repo_id} was not found on the Hub",
                            "check the id, or log in if the repo is private") from exc
    except RevisionNotFoundError as exc:
        raise QuantkitError(f"revision {revision} of {repo_id} does not exist", "check --revision") from exc
    except LocalEntryNotFoundError as exc:
        raise QuantkitError(
            f"cannot download {repo_id}: the Hub is unreachable (or offline mode is on) and it is not in the cache",
            "connect to the network, or pass a local folder",
        ) from exc
    except OSError as exc:
        raise QuantkitError(f"cannot download {repo_id}: {type(exc).__name__}: {exc}",
                            "check the network and try again; finished files are kept in the cache") from exc
    return Path(path)


def load_local(folder: Path, *, name: str, source: str, hub_id: str | None = None,
               known: KnownModel | None = None) -> Checkpoint:
    """Validate a checkpoint folder: config, safetensors weights, float dtype, supported architecture."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise QuantkitError(f"{folder} has no config.json", "pass a Hugging Face checkpoint folder")
    config = read_config(config_path)
    _check_tokenizer_files(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf")]
        found = f" (found {', '.join(other[:3])})" if other else ""
        raise QuantkitError(
            f"{folder} has no *.safetensors weights{found}",
            "convert the weights to safetensors first (transformers: save_pretrained(safe_serialization=True))",
        )
    ckpt = Checkpoint(name=name, path=folder, config=config, source=source, hub_id=hub_id, known=known)
    ckpt.arch  # noqa: B018 - refuses an architecture the registry does not know, before anything else
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise QuantkitError(f"{folder} is already quantized ({method})", "start from the bf16 checkpoint")
    dtypes: dict[str, int] = {}
    for info in ckpt.tensors.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    bad = sorted(d for d in dtypes if d not in FLOAT_DTYPES)
    if bad:
        raise QuantkitError(
            f"weights in {folder.name} are {'/'.join(bad)}, not bf16/fp16/fp32",
            "quantkit starts from unquantized weights: use the original bf16 checkpoint",
        )
    ckpt.dtypes = dtypes
    missing = ckpt.arch.missing_tensors(set(ckpt.canonical_names))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise QuantkitError(f"incomplete checkpoint {folder.name}: {ckpt.architecture} needs {', '.join(missing[:3])}"
                            f"{more}, which its safetensors do not hold",
                            "download the checkpoint again (all shards), or check config.json's architectures and "
                            "num_hidden_layers")
    _check_shapes(ckpt, folder)
    return ckpt


def _check_tokenizer_files(folder: Path) -> None:
    """Refuse a tokenizer file that is not JSON (damaged in a download), naming it, before any work."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise QuantkitError(f"{path} is damaged (not valid JSON)", "download the checkpoint again") from exc


def _check_shapes(ckpt: Checkpoint, folder: Path) -> None:
    """Refuse a layer tensor whose shape is not the one config.json implies (caught before any work, not as a
    loader's error half way)."""
    shapes = ckpt.arch.layer_shapes()
    for i in range(ckpt.arch.n_layer):
        for suffix, want in shapes.items():
            hf_name = ckpt.canonical_names.get(f"model.layers.{i}.{suffix}")
            got = tuple(ckpt.tensors.tensors[hf_name].shape) if hf_name else want
            if got != want:
                raise QuantkitError(f"{hf_name} in {folder.name} is {list(got)}, but config.json implies {list(want)}",
                                    "the weights and config.json do not belong together: download the checkpoint "
                                    "again")
