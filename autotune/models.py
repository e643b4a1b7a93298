"""The shape space to tune: model presets, Hugging Face configs, token buckets.

A model's attention layer becomes one :class:`~kernels.RopeSpec` per tensor-parallel size and
dtype. Tensor parallelism splits query heads evenly and key heads the way vLLM does: each GPU
holds ``max(1, num_kv_heads // tp)`` key heads (a kv head is replicated when there are fewer kv
heads than GPUs).

The presets are of two kinds, kept apart so that they can be tuned and reported apart: plain
RoPE (text models) and multimodal RoPE (vision-language models with ``mrope_section``:
Qwen2-VL, Qwen2.5-VL, Qwen3-VL); :func:`default_specs` takes either or both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kernels import RopeSpec, parse_dtype
from kernels.providers import MROPE, ROPE

__all__ = [
    "CPU_DEFAULT_MODELS",
    "CPU_DEFAULT_TOKENS",
    "DEFAULT_DTYPES",
    "DEFAULT_TOKENS",
    "MAX_TOKENS",
    "MODEL_PRESETS",
    "MROPE_MODELS",
    "ModelPreset",
    "default_specs",
    "get_preset",
    "load_hf_config",
    "model_specs",
    "parse_tokens",
    "shard_heads",
    "spec_from_hf_config",
    "unique_specs",
]

# Token buckets 1, 2, 4, ..., 65536: decode batches up to long prefills.
DEFAULT_TOKENS: tuple[int, ...] = tuple(2**i for i in range(17))
DEFAULT_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
# The largest token bucket: 2**20 tokens, 16x the default space's largest bucket and beyond any
# serving batch. The tuner holds several q/k input sets of a bucket on the device at once; one
# set of the largest preset (Llama-3 70B at TP 1: 64 + 8 heads x 128 x 2 bytes = 18 KiB a
# token) is already 18 GiB at 2**20 tokens.
MAX_TOKENS = 2**20
# The CPU run is for a quick real table and for smoke tests: fewer models and buckets.
CPU_DEFAULT_TOKENS: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
CPU_DEFAULT_MODELS: tuple[str, ...] = ("llama-3-8b", "gpt-j-6b", "phi-2")


@dataclass(frozen=True)
class ModelPreset:
    """The RoPE shape of one model family's attention layer, before tensor parallelism.

    Attributes:
        name: Name accepted by ``--model``.
        description: One line for ``--list-models``.
        head_size: Elements per head.
        rotary_dim: Leading elements of each head that rotate.
        num_heads: Query heads of the whole model.
        num_kv_heads: Key heads of the whole model.
        is_neox: NeoX style (True) or GPT-J style (False).
        tp_sizes: Tensor-parallel sizes tuned by default.
        mrope_section: Multimodal RoPE's frequencies per position stream (time, height,
            width); None for plain RoPE.
        mrope_interleaved: The sections interleave ``THWTHW...`` (Qwen3-VL).
    """

    name: str
    description: str
    head_size: int
    rotary_dim: int
    num_heads: int
    num_kv_heads: int
    is_neox: bool = True
    tp_sizes: tuple[int, ...] = (1,)
    mrope_section: tuple[int, int, int] | None = None
    mrope_interleaved: bool = False

    @property
    def layout(self) -> str:
        """``"mrope"`` for a multimodal preset, else ``"rope"``."""
        return ROPE if self.mrope_section is None else MROPE

    def specs(
        self,
        dtypes: Iterable[torch.dtype] = DEFAULT_DTYPES,
        tp_sizes: Iterable[int] | None = None,
    ) -> list[RopeSpec]:
        """One spec per tensor-parallel size and dtype.

        Raises:
            ValueError: a tensor-parallel size does not divide the query heads.
        """
        specs = []
        layout = {"mrope_section": self.mrope_section, "mrope_interleaved": self.mrope_interleaved}
        for tp in self.tp_sizes if tp_sizes is None else tp_sizes:
            heads, kv_heads = shard_heads(self.num_heads, self.num_kv_heads, tp)
            for dtype in dtypes:
                specs.append(
                    RopeSpec(
                        self.head_size,
                        self.rotary_dim,
                        heads,
                        kv_heads,
                        self.is_neox,
                        dtype,
                        **layout,
                    )
                )
        return specs


def shard_heads(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """Query and key heads on one GPU at tensor-parallel size ``tp`` (vLLM's split).

    Raises:
        ValueError: ``tp`` is not a positive divisor of ``num_heads``.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp <= 0:
        raise ValueError(f"tensor_parallel_size: expected a positive int, got {tp!r}")
    if num_heads % tp:
        raise ValueError(
            f"tensor_parallel_size: expected a divisor of num_heads={num_heads}, got {tp}"
        )
    return num_heads // tp, max(1, num_kv_heads // tp)


_PRESETS = (
    ModelPreset(
        "llama-3-8b", "Llama-3 8B (also Llama-3.1 8B)", 128, 128, 32, 8, tp_sizes=(1, 2, 4, 8)
    ),
    ModelPreset(
        "llama-3-70b",
        "Llama-3 70B (also Llama-3.1/3.3 70B)",
        128,
        128,
        64,
        8,
        tp_sizes=(1, 2, 4, 8),
    ),
    ModelPreset("qwen2.5-7b", "Qwen2.5 7B", 128, 128, 28, 4),
    ModelPreset("mistral-7b", "Mistral 7B", 128, 128, 32, 8),
    ModelPreset("gemma-2-9b", "Gemma-2 9B (head 256)", 256, 256, 16, 8),
    ModelPreset(
        "gpt-j-6b", "GPT-J 6B (GPT-J style, rotary 64 of head 256)", 256, 64, 16, 16, is_neox=False
    ),
    ModelPreset("pythia-6.9b", "Pythia 6.9B / GPT-NeoX (rotary 25% of head 128)", 128, 32, 32, 32),
    ModelPreset("phi-2", "Phi-2 (head 80, rotary 32)", 80, 32, 32, 32),
    # MLA: only the decoupled rope part rotates, 64 dims, one key head shared by all queries.
    ModelPreset(
        "deepseek-v2",
        "DeepSeek-V2 rope part (64 dims, GPT-J style, one kv head)",
        64,
        64,
        128,
        1,
        is_neox=False,
    ),
)
# Vision-language models (mRoPE): head counts of their language model, at the tensor-parallel
# sizes they are served at.
_QWEN_VL_CHUNKED = (16, 24, 24)  # Qwen2-VL and Qwen2.5-VL: T, H, W in contiguous chunks
_QWEN3_VL_INTERLEAVED = (24, 20, 20)  # Qwen3-VL: THWTHW..., the time stream taking the rest
_MROPE_PRESETS = (
    ModelPreset("qwen2-vl-2b", "Qwen2-VL 2B (mRoPE 16/24/24)", 128, 128, 12, 2,
                mrope_section=_QWEN_VL_CHUNKED),
    ModelPreset("qwen2-vl-7b", "Qwen2-VL 7B (mRoPE 16/24/24)", 128, 128, 28, 4, tp_sizes=(1, 2),
                mrope_section=_QWEN_VL_CHUNKED),
    ModelPreset("qwen2.5-vl-3b", "Qwen2.5-VL 3B (mRoPE 16/24/24)", 128, 128, 16, 2,
                mrope_section=_QWEN_VL_CHUNKED),
    ModelPreset("qwen2.5-vl-7b", "Qwen2.5-VL 7B (mRoPE 16/24/24)", 128, 128, 28, 4,
                tp_sizes=(1, 2), mrope_section=_QWEN_VL_CHUNKED),
    ModelPreset("qwen2.5-vl-32b", "Qwen2.5-VL 32B (mRoPE 16/24/24)", 128, 128, 40, 8,
                tp_sizes=(1, 2, 4), mrope_section=_QWEN_VL_CHUNKED),
    ModelPreset("qwen2.5-vl-72b", "Qwen2.5-VL 72B (also Qwen2-VL 72B; mRoPE 16/24/24)", 128, 128,
                64, 8, tp_sizes=(2, 4, 8), mrope_section=_QWEN_VL_CHUNKED),
    ModelPreset("qwen3-vl-8b", "Qwen3-VL 8B (interleaved mRoPE 24/20/20)", 128, 128, 32, 8,
                tp_sizes=(1, 2), mrope_section=_QWEN3_VL_INTERLEAVED, mrope_interleaved=True),
    ModelPreset("qwen3-vl-32b", "Qwen3-VL 32B (interleaved mRoPE 24/20/20)", 128, 128, 64, 8,
                tp_sizes=(1, 2, 4), mrope_section=_QWEN3_VL_INTERLEAVED, mrope_interleaved=True),
    ModelPreset("qwen3-vl-30b-a3b", "Qwen3-VL 30B-A3B MoE (interleaved mRoPE 24/20/20)", 128, 128,
                32, 4, tp_sizes=(1, 2, 4), mrope_section=_QWEN3_VL_INTERLEAVED,
                mrope_interleaved=True),
)  # fmt: skip
MODEL_PRESETS: dict[str, ModelPreset] = {
    preset.name: preset for preset in (*_PRESETS, *_MROPE_PRESETS)
}
# The multimodal (mRoPE) presets' names, e.g. for ``--model`` to tune them alone.
MROPE_MODELS: tuple[str, ...] = tuple(p.name for p in _MROPE_PRESETS)


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name`` (case-insensitive).

    Raises:
        ValueError: no such preset; the message lists them.
    """
    preset = MODEL_PRESETS.get(name.strip().lower())
    if preset is None:
        raise ValueError(f"model: expected one of {sorted(MODEL_PRESETS)}, got {name!r}")
    return preset


def model_specs(
    models: Iterable[str],
    model_configs: Iterable[str | os.PathLike],
    *,
    tensor_parallel_size: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    is_neox: bool | None = None,
    preset_dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
) -> list[RopeSpec]:
    """The specs of model presets and Hugging Face ``config.json`` files, on one GPU's share of
    the heads, without repeats.

    Args:
        models: Preset names (``llama-3-8b``, ...).
        model_configs: Paths to ``config.json`` files or directories holding one.
        tensor_parallel_size: GPUs the heads are split over; None for each preset's own
            sizes (and 1 for the configs).
        dtypes: Element types; None for ``preset_dtypes`` (presets) and each config's own
            ``torch_dtype``.
        is_neox: Rope style of the ``model_configs``; None for the config's own.

    Raises:
        ValueError: an unknown preset, a bad config, or a tensor-parallel size that does not
            divide the heads.
    """
    tp_sizes = None if tensor_parallel_size is None else [tensor_parallel_size]
    specs = []
    for name in models:
        specs += get_preset(name).specs(dtypes or preset_dtypes, tp_sizes)
    for path in model_configs:
        config = load_hf_config(path)
        for dtype in dtypes or [None]:
            specs.append(
                spec_from_hf_config(
                    config,
                    tensor_parallel_size=tensor_parallel_size or 1,
                    dtype=dtype,
                    is_neox=is_neox,
                )
            )
    return unique_specs(specs)


def unique_specs(specs: Iterable[RopeSpec]) -> list[RopeSpec]:
    """``specs`` without repeats, in first-seen order (presets share shapes, e.g. Mistral and
    Llama-3 8B)."""
    return list(dict.fromkeys(specs))


def default_specs(
    device: torch.device | str, layouts: Iterable[str] = (ROPE, MROPE)
) -> list[RopeSpec]:
    """The default shape space: every preset on a GPU; a few text models in bfloat16 on the CPU.

    Args:
        layouts: The kinds of preset to include: ``"rope"`` (text models) and/or ``"mrope"``
            (vision-language models); plain RoPE specs come first.

    Raises:
        ValueError: an unknown layout.
    """
    layouts = tuple(layouts)
    unknown = sorted(set(layouts) - {ROPE, MROPE})
    if unknown:
        raise ValueError(f"layouts: expected {ROPE!r} and/or {MROPE!r}, got {unknown}")
    if torch.device(device).type == "cpu":
        presets = [MODEL_PRESETS[name] for name in CPU_DEFAULT_MODELS]
        return unique_specs(
            s for p in presets if p.layout in layouts for s in p.specs((torch.bfloat16,), (1,))
        )
    return unique_specs(
        s for p in (*_PRESETS, *_MROPE_PRESETS) if p.layout in layouts for s in p.specs()
    )


def parse_tokens(text: str | Sequence[int]) -> list[int]:
    """Token buckets from ``"1,16,256"`` (or a sequence of ints), sorted, without repeats.

    Raises:
        ValueError: an item is not an integer from 1 to :data:`MAX_TOKENS`, or there is none.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    buckets = set()
    for item in items:
        try:
            value = int(str(item).strip())
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"tokens: expected positive integers like 1,16,256, got {item!r}")
        if value > MAX_TOKENS:
            raise ValueError(
                f"tokens: expected at most {MAX_TOKENS} tokens a bucket (the tuner's inputs "
                f"must fit on the device), got {item!r}"
            )
        buckets.add(value)
    if not buckets:
        raise ValueError("tokens: expected at least one token count")
    return sorted(buckets)


# -- Hugging Face configs ------------------------------------------------------------------------

# model_type values whose rope pairs interleaved elements (GPT-J style), as vLLM builds them.
_GPTJ_STYLE_MODEL_TYPES = frozenset(
    {"gptj", "codegen", "chatglm", "glm", "deepseek_v2", "deepseek_v3", "kimi_k2"}
)


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Hugging Face ``config.json`` (a file, or a directory holding one).

    Raises:
        ValueError: the file is missing or not a JSON object.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model_config: cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"model_config: expected a JSON object in {path}")
    return config


def _first(config: Mapping[str, Any], *names: str) -> tuple[str, Any]:
    """The first of ``names`` set in ``config`` (not None): (name, value), else (names[0], None)."""
    for name in names:
        if config.get(name) is not None:
            return name, config[name]
    return names[0], None


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int: an int, or a float with an integral value (``128.0``).

    Raises:
        ValueError: anything else (a list, a dict, a string, ``127.5``, zero, negative).
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"model_config: {name}: expected a positive integer, got {value!r}")
    return value


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a multimodal config (Gemma-3, Llama-4, ...: under
    ``text_config``), the outer config's dtype and model type filling what it lacks."""
    text = config.get("text_config")
    if not isinstance(text, Mapping) or _first(config, "num_attention_heads", "n_head")[1]:
        return config
    return {
        "torch_dtype": config.get("torch_dtype") or config.get("dtype"),
        "model_type": config.get("model_type"),
        **{k: v for k, v in text.items() if v is not None},
    }


def _mrope_layout(config: Mapping[str, Any]) -> tuple[tuple[int, int, int], bool] | None:
    """The multimodal RoPE layout (``mrope_section``, ``mrope_interleaved``) of a config's
    ``rope_scaling`` or ``rope_parameters`` (Qwen2-VL family), or None for plain RoPE.

    Raises:
        ValueError: ``mrope_section`` is not three non-negative integers.
    """
    for field in ("rope_scaling", "rope_parameters"):
        params = config.get(field)
        if not isinstance(params, Mapping):
            continue
        # rope_parameters may hold one dict per attention type (full, sliding).
        nested = [params, *(v for v in params.values() if isinstance(v, Mapping))]
        for p in nested:
            if "mrope_section" not in p:
                continue
            section = p["mrope_section"]
            if (
                not isinstance(section, (list, tuple))
                or len(section) != 3
                or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in section)
            ):
                raise ValueError(
                    f"model_config: {field}.mrope_section: expected three non-negative integers "
                    f"(time, height, width), got {section!r}"
                )
            return tuple(section), bool(p.get("mrope_interleaved", False))
    return None


def spec_from_hf_config(
    config: Mapping[str, Any],
    *,
    tensor_parallel_size: int = 1,
    dtype: torch.dtype | str | None = None,
    is_neox: bool | None = None,
) -> RopeSpec:
    """The RoPE spec of one GPU's share of a Hugging Face model.

    Reads ``head_dim`` (else ``hidden_size / num_attention_heads``; GPT-J's ``n_embd`` and
    ``n_head`` too), ``num_key_value_heads`` (default: all heads), the rotated part from
    ``partial_rotary_factor``, ``rotary_pct`` (GPT-NeoX) or ``rotary_dim`` (GPT-J), and
    DeepSeek's ``qk_rope_head_dim`` (only the decoupled rope part rotates, with one key head).
    A multimodal config's ``text_config`` (Gemma-3) is read when the top level has no heads.
    Counts may be written as integral floats (``128.0``).

    Args:
        config: The decoded ``config.json``.
        tensor_parallel_size: GPUs the heads are split over.
        dtype: Element type; default the config's ``torch_dtype``, else bfloat16.
        is_neox: Rope style; default from ``model_type`` (GPT-J style for GPT-J, CodeGen,
            ChatGLM and DeepSeek-V2/V3, NeoX style otherwise).

    A multimodal RoPE model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) gets an mRoPE spec: its
    ``rope_scaling`` or ``rope_parameters`` (at the top level or in ``text_config``) gives
    ``mrope_section`` and ``mrope_interleaved``.

    Raises:
        ValueError: a field is missing, not a positive integer (a list, ``127.5``, ``0``), or
            inconsistent, the message naming it (``mrope_section`` too: three non-negative
            integers summing to half the rotary dim).
    """
    layout = _mrope_layout(config)
    config = _text_config(config)
    layout = layout or _mrope_layout(config)
    model_type = str(config.get("model_type", "")).lower()
    name, num_heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    if num_heads is None:
        raise ValueError("model_config: num_attention_heads missing")
    num_heads = _positive_int(name, num_heads)
    if config.get("qk_rope_head_dim") is not None:  # MLA (DeepSeek-V2/V3): the rope part alone
        head_size = rotary_dim = _positive_int("qk_rope_head_dim", config["qk_rope_head_dim"])
        num_kv_heads = 1
    else:
        if config.get("head_dim") is not None:
            head_size = _positive_int("head_dim", config["head_dim"])
        else:
            name, hidden = _first(config, "hidden_size", "n_embd", "d_model")
            if hidden is None or _positive_int(name, hidden) % num_heads:
                raise ValueError(
                    "model_config: expected head_dim, or hidden_size divisible by "
                    f"num_attention_heads={num_heads}, got hidden_size={hidden!r}"
                )
            head_size = int(hidden) // num_heads
        name, kv = _first(config, "num_key_value_heads", "n_head_kv")
        num_kv_heads = num_heads if kv is None else _positive_int(name, kv)
        rotary_dim = _rotary_dim(config, head_size)
    if dtype is None:
        dtype = config.get("torch_dtype") or config.get("dtype") or torch.bfloat16
    if is_neox is None:
        is_neox = model_type not in _GPTJ_STYLE_MODEL_TYPES
    heads, kv_heads = shard_heads(num_heads, num_kv_heads, tensor_parallel_size)
    section, interleaved = layout or (None, False)
    try:
        return RopeSpec(
            head_size, rotary_dim, heads, kv_heads, is_neox, parse_dtype(dtype),
            mrope_section=section, mrope_interleaved=interleaved,
        )  # fmt: skip
    except ValueError as exc:
        if section is None:
            raise
        raise ValueError(f"model_config: {exc}") from None


def _rotary_dim(config: Mapping[str, Any], head_size: int) -> int:
    if config.get("rotary_dim") is not None:
        return _positive_int("rotary_dim", config["rotary_dim"])
    name, factor = _first(config, "partial_rotary_factor", "rotary_pct")
    if factor is None:
        return head_size
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
        raise ValueError(f"model_config: {name}: expected a number in (0, 1], got {factor!r}")
    return int(head_size * factor)  # vLLM's rounding
