"""Per-architecture facts: where the layer stack lives, how positions enter, which norms and projections exist.

A family is one `FamilySpec` entry of facts, never a subclass: `LLMBlocks` runs the architecture's own
`transformers` layer instances and only needs to know how to reach and call them. Every entry is checked
against the model's own forward by `tests/test_llm_oracle.py`.

Paths are relative to the *base* model (`AutoModel.from_config(config)`, e.g. `LlamaModel`); checkpoint keys
may carry the causal-LM prefix (`model.`, `transformer.`, `gpt_neox.`, `bert.`), which the loader strips.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ..errors import MMBlocksError

__all__ = ["FamilySpec", "FAMILIES", "get_family", "list_families", "UnknownFamilyError"]

NormKind = Literal["rms", "rms_offset", "layer"]


class UnknownFamilyError(MMBlocksError, ValueError):
    """The architecture has no `FamilySpec` entry."""


@dataclass(frozen=True)
class FamilySpec:
    """How to reach and call the decoder (or encoder) layers of one `transformers` architecture.

    Attributes:
        model_type: `config.model_type` of the architecture.
        layers: path of the `nn.ModuleList` of layers inside the base model.
        final_norm: path of the final norm inside the base model (`None`: the family has none).
        rotary: path of the rotary-embedding module (`None`: positions are absolute and added to the
            embeddings outside the layers — OPT, GPT-2, BERT — so `rope` has nothing to do).
        norm: `rms` (x * w), `rms_offset` (x * (1 + w), Gemma) or `layer` (LayerNorm).
        attn: name of the self-attention submodule inside a layer (LoRA `target="attention"`).
        mlp: names of the MLP submodules or linears inside a layer (LoRA `target="mlp"`).
        residual_out: the projections that write into the residual stream; zeroing them makes a pre-norm
            layer the identity (LLaMA Pro block expansion).
        pre_norm: True if the residual stream is never normalised inside the layer (a config attribute
            name may be given when it depends on the checkpoint, as OPT's `do_layer_norm_before`).
        sliding_all: True if `config.sliding_window` applies to every layer (Mistral); otherwise sliding
            layers are read from `config.layer_types`.
        eps: config attribute holding the norm epsilon (used by `final_norm="rms_unit"`).
        encoder: True for bidirectional encoder layers (BERT-style); decoders are causal in their own model.
    """

    model_type: str
    layers: str = "layers"
    final_norm: str | None = "norm"
    rotary: str | None = "rotary_emb"
    norm: NormKind = "rms"
    attn: str = "self_attn"
    mlp: tuple[str, ...] = ("mlp",)
    residual_out: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    pre_norm: bool | str = True
    sliding_all: bool = False
    eps: str = "rms_norm_eps"
    encoder: bool = False

    @property
    def default_attention(self) -> str:
        """How the layers attend inside their own model: encoders are bidirectional, decoders causal."""
        return "bidirectional" if self.encoder else "causal"

    @property
    def positions(self) -> str:
        return "rotary" if self.rotary is not None else "absolute (outside the layers)"


_LLAMA = FamilySpec("llama")
_GPT2 = FamilySpec(
    "gpt2",
    layers="h",
    final_norm="ln_f",
    rotary=None,
    norm="layer",
    attn="attn",
    residual_out=("attn.c_proj", "mlp.c_proj"),
    eps="layer_norm_epsilon",
)
_BERT = FamilySpec(
    "bert",
    layers="encoder.layer",
    final_norm=None,
    rotary=None,
    norm="layer",
    attn="attention",
    mlp=("intermediate", "output"),
    residual_out=(),
    pre_norm=False,
    eps="layer_norm_eps",
    encoder=True,
)
_LAYERNORM = dict(norm="layer", eps="layer_norm_eps")


def _like(model_type: str, base: FamilySpec = _LLAMA, **changes: object) -> FamilySpec:
    return replace(base, model_type=model_type, **changes)


_ENTRIES: list[FamilySpec] = [
    # Llama layout: model.layers, model.norm, model.rotary_emb, RMSNorm, o_proj / down_proj.
    _LLAMA,
    _like("mistral", sliding_all=True),
    _like("ministral"),
    _like("qwen2"),
    _like("qwen3"),
    _like("olmo", norm="layer", eps="rms_norm_eps"),  # OLMo's LayerNorm has no weights
    _like("olmo2"),
    _like("olmo3"),
    _like("granite"),
    _like("helium"),
    _like("glm"),
    _like("glm4"),
    _like("smollm3"),
    _like("arcee", mlp=("mlp",), residual_out=("self_attn.o_proj", "mlp.down_proj")),
    _like("seed_oss"),
    _like("hunyuan_v1_dense"),
    _like("ernie4_5"),
    _like("apertus"),
    _like("exaone4"),
    _like("gemma", norm="rms_offset"),
    _like("gemma2", norm="rms_offset"),
    _like("gemma3_text", norm="rms_offset"),
    _like("phi3"),
    _like("internlm3"),
    _like("bitnet"),
    _like("diffllama"),
    _like("hyperclovax"),
    _like("ministral3"),
    _like("cwm"),
    _like("apertus1p5_text"),
    _like("nanochat", residual_out=("self_attn.o_proj", "mlp.fc2")),
    _like("cohere2", norm="layer", eps="layer_norm_eps"),
    _like("nemotron", norm="layer", eps="norm_eps"),  # LayerNorm1P: weight stored as w - 1
    _like(
        "persimmon",
        final_norm="final_layernorm",
        residual_out=("self_attn.dense", "mlp.dense_4h_to_h"),
        **_LAYERNORM,
    ),
    _like("cohere", norm="layer", eps="layer_norm_eps"),
    _like("stablelm", **_LAYERNORM),
    _like("starcoder2", norm="layer", eps="norm_epsilon", residual_out=("self_attn.o_proj", "mlp.c_proj")),
    _like(
        "phi",
        final_norm="final_layernorm",
        residual_out=("self_attn.dense", "mlp.fc2"),
        **_LAYERNORM,
    ),
    _like(
        "gpt_neox",
        final_norm="final_layer_norm",
        attn="attention",
        residual_out=("attention.dense", "mlp.dense_4h_to_h"),
        **_LAYERNORM,
    ),
    # Absolute positions added to the embeddings outside the layers: nothing for `rope` to do.
    FamilySpec(
        "opt",
        layers="decoder.layers",
        final_norm="decoder.final_layer_norm",
        rotary=None,
        norm="layer",
        mlp=("fc1", "fc2"),
        residual_out=("self_attn.out_proj", "fc2"),
        pre_norm="do_layer_norm_before",
        eps="layer_norm_eps",
    ),
    _GPT2,
    _like("gpt-sw3", base=_GPT2),
    # BERT-style post-norm encoder layers (MiniLM): bidirectional by nature, positions in the embeddings.
    _BERT,
    _like("roberta", base=_BERT),
    _like("xlm-roberta", base=_BERT),
    _like("camembert", base=_BERT),
    _like("data2vec-text", base=_BERT),
    _like("electra", base=_BERT),
]

FAMILIES: dict[str, FamilySpec] = {spec.model_type: spec for spec in _ENTRIES}


def list_families() -> list[str]:
    """The supported `config.model_type` values, sorted."""
    return sorted(FAMILIES)


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_")


def get_family(model_type: str) -> FamilySpec:
    """The `FamilySpec` of `model_type`; an unknown architecture gets an error listing the supported ones."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for name, spec in FAMILIES.items():
        if _normalise(name) == _normalise(model_type):
            return spec
    raise UnknownFamilyError(
        f"unsupported architecture {model_type!r}: mmblocks knows the layer layout of "
        f"{', '.join(list_families())}. A standard decoder family is one FamilySpec entry in "
        "mmblocks/llm/families.py (please open an issue or a pull request)."
    )
