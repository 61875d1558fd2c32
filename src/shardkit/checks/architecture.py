"""Architecture check: compare a checkpoint's tensors with what ``config.json`` describes.

The expected tensors are obtained by instantiating the model class named by the config on
PyTorch's *meta* device (no storage is allocated and no random initialisation runs), exactly
the way ``transformers``' ``PreTrainedModel.from_pretrained`` builds its skeleton before loading.

The comparison then reuses transformers' own key-matching machinery
(``core_model_loading.convert_and_load_state_dict_in_model``) on meta tensors built from the
checkpoint header, so key renames (legacy ``LayerNorm.gamma``, ``base_model_prefix``
add/strip, per-model conversion mappings such as fused MoE experts), tied weights
(``tie_weights``) and the ``_keys_to_ignore_on_load_*`` rules
(``_adjust_missing_and_unexpected_keys``) behave like a real ``from_pretrained`` call.
If those internals are not available (another transformers version), a simpler
re-implementation of the same rules is used.

``torch`` and ``transformers`` are optional: they are imported lazily, and their absence
raises :class:`~shardkit.errors.MissingExtraError` (also an :class:`ImportError`) with an
installation hint.

This module is self-contained on purpose: of ``shardkit`` it imports only the exception
family, so what it raises is a ``ShardkitError`` like everything else.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInputError, MissingExtraError
from ..format.header import DTYPES
from ..plan.fp8_layout import is_fp8, quantised_names

__all__ = [
    "ArchitectureCheckError",
    "ArchitectureProblem",
    "ExpectedTensor",
    "check_architecture",
    "expected_tensors",
]

# safetensors dtype code -> name of the torch dtype attribute (looked up lazily; some only
# exist in recent torch versions).
_CODE_TO_TORCH_NAME = {code: dtype.torch for code, dtype in DTYPES.items() if dtype.torch is not None}
_TORCH_NAME_TO_CODE = {name: code for code, name in _CODE_TO_TORCH_NAME.items()}

_KIND_ORDER = {"missing": 0, "unexpected": 1, "shape": 2, "dtype": 3}


class ArchitectureCheckError(BadInputError, ValueError):
    """The config cannot be turned into a model skeleton (bad JSON, unknown model type, ...);
    also a ValueError, as it was before it joined the family."""


@dataclass(frozen=True)
class ExpectedTensor:
    """A tensor the model described by ``config.json`` stores in its checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: str | None  # safetensors dtype code (e.g. "BF16"); None when the config names no dtype
    # Name of the tensor this one is tied to (e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``
    # when ``tie_word_embeddings`` is true). A tied tensor may be absent from the checkpoint.
    tied_to: str | None = None


@dataclass(frozen=True)
class ArchitectureProblem:
    """One disagreement between the config's architecture and the checkpoint."""

    kind: str  # "missing" | "unexpected" | "shape" | "dtype"
    tensor: str
    expected: str | None
    found: str | None

    def message(self) -> str:
        if self.kind == "missing":
            return f"missing tensor {self.tensor}: expected {self.expected}, not found in the checkpoint"
        if self.kind == "unexpected":
            return f"unexpected tensor {self.tensor}: found {self.found}, not part of the architecture"
        if self.kind == "shape":
            return f"shape mismatch for {self.tensor}: expected {self.expected}, found {self.found}"
        if self.kind == "dtype":
            return f"dtype mismatch for {self.tensor}: expected {self.expected}, found {self.found}"
        return f"{self.kind} {self.tensor}: expected {self.expected}, found {self.found}"


# --------------------------------------------------------------------------- public API


def expected_tensors(config_path: Path) -> dict[str, ExpectedTensor]:
    """Return the tensors a checkpoint for ``config_path`` should contain, keyed by name.

    Non-persistent buffers (e.g. rotary ``inv_freq``) are excluded. Tied tensors are included
    with ``tied_to`` set: a checkpoint may legitimately omit them.
    """
    torch, transformers = _import_hf()
    with _quiet(transformers):
        skeleton = _build_skeleton(Path(config_path), torch, transformers)
        result = {
            name: ExpectedTensor(
                name=name,
                shape=tuple(int(d) for d in tensor.shape),
                dtype=skeleton.expected_code(name, tensor),
                tied_to=skeleton.tied.get(name),
            )
            for name, tensor in skeleton.state_dict.items()
        }
    del skeleton
    _settle_gc()
    return result


def check_architecture(
    config_path: Path, present: Mapping[str, tuple[str, tuple[int, ...]]]
) -> list[ArchitectureProblem]:
    """Compare the tensors of a checkpoint with the architecture described by ``config_path``.

    ``present`` maps each tensor name of the checkpoint (all shards together) to its
    ``(safetensors dtype code, shape)``. Returns the problems sorted by kind
    (missing, unexpected, shape, dtype) and then by tensor name; an empty list means the
    checkpoint loads into the architecture without missing/unexpected/mismatched tensors.
    """
    torch, transformers = _import_hf()
    present = {str(k): (str(v[0]).upper(), tuple(int(d) for d in v[1])) for k, v in present.items()}
    # An FP8 checkpoint's scales belong to the FP8 layers transformers swaps in, and its
    # FP8 weights are that dtype on purpose: neither is a problem of the architecture.
    scales, quantised = quantised_names(present)
    present = {k: v for k, v in present.items() if k not in scales}
    with _quiet(transformers):
        skeleton = _build_skeleton(Path(config_path), torch, transformers)
        try:
            classification = _classify_with_transformers(skeleton, present, torch)
        except (_InternalsUnavailable, ImportError, AttributeError, TypeError):
            # transformers' loader internals differ from 5.x: use the re-implementation
            # (on a fresh skeleton, the failed attempt may have touched the model)
            skeleton = _build_skeleton(Path(config_path), torch, transformers)
            classification = _classify_simple(skeleton, present)

    problems = list(classification.problems)
    problems.extend(p for p in _dtype_problems(skeleton, present, classification.renamed) if p.tensor not in quantised)
    problems.sort(key=lambda p: (_KIND_ORDER.get(p.kind, 9), _natural_key(p.tensor)))
    del skeleton, classification
    _settle_gc()
    return problems


# --------------------------------------------------------------------------- helpers


def _import_hf() -> tuple[Any, Any]:
    first_import = "transformers" not in sys.modules
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingExtraError("the architecture check", "hf") from exc
    if first_import:
        # torch + transformers create millions of long-lived objects; moving them out of the
        # collector's reach keeps later GC passes cheap (see also `_settle_gc`).
        gc.freeze()
    return torch, transformers


_SETTLED = False


def _settle_gc() -> None:
    """Once per process, after the first check: collect our garbage, then freeze what is left.

    The modules imported lazily during the check (modeling code, loader internals) add
    another large object graph; without this, interpreter shutdown spends 1-3 s traversing it
    (measured: exit 1.0-1.9 s -> 0.4 s, for 0.15 s of collection here).
    """
    global _SETTLED
    if not _SETTLED:
        _SETTLED = True
        gc.collect()
        gc.freeze()


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Silence transformers' logging, progress bars and Python warnings, then restore them."""
    hf_logging = getattr(getattr(transformers, "utils", None), "logging", None)
    old_verbosity = None
    old_bar = None
    if hf_logging is not None:
        with contextlib.suppress(Exception):
            old_verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity(logging.ERROR + 10)  # above ERROR: load reports are logged as errors
        with contextlib.suppress(Exception):
            old_bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if hf_logging is not None:
            if old_verbosity is not None:
                with contextlib.suppress(Exception):
                    hf_logging.set_verbosity(old_verbosity)
            if old_bar:
                with contextlib.suppress(Exception):
                    hf_logging.enable_progress_bar()


def _natural_key(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _is_float_code(code: str | None) -> bool:
    """What transformers casts to the config's dtype on load (C64 is not cast)."""
    dtype = DTYPES.get(code) if code is not None else None
    return dtype is not None and dtype.is_float


def _code_of(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return _TORCH_NAME_TO_CODE.get(name, name.upper())


def _torch_dtype_of(code: str, torch: Any) -> Any:
    dtype = getattr(torch, _CODE_TO_TORCH_NAME.get(code, ""), None)
    # Unknown / exotic codes: the dtype of a meta tensor is irrelevant for key/shape matching.
    return dtype if isinstance(dtype, torch.dtype) else torch.uint8


# --------------------------------------------------------------------------- skeleton


class _Skeleton:
    """A meta-device model plus the facts derived from it."""

    def __init__(self, model: Any, config: Any, dtype: Any, torch: Any) -> None:
        self.model = model
        self.config = config
        self.dtype = dtype  # torch dtype named by the config, or None
        self.dtype_code = _code_of(dtype) if dtype is not None else None
        # Persistent parameters and buffers only: exactly what `save_pretrained` writes and
        # what `from_pretrained` expects (non-persistent buffers are excluded by torch).
        self.state_dict: dict[str, Any] = dict(model.state_dict())
        self.tied: dict[str, str] = _tied_mapping(model)
        self.dtype_plan: dict[str, Any] = {}
        if dtype is not None and hasattr(model, "_get_dtype_plan"):
            with contextlib.suppress(Exception):
                self.dtype_plan = dict(model._get_dtype_plan(dtype) or {})
        elif dtype is not None:  # transformers 4.x: fp16 loads keep these modules in fp32
            keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
            if dtype == torch.float16:
                self.dtype_plan = dict.fromkeys(keep, torch.float32)
        # Modules transformers may keep in fp32 (`_keep_in_fp32_modules(_strict)`): F32 is accepted there.
        self.fp32_patterns = [
            str(p)
            for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")
            for p in (getattr(model, attr, None) or [])
        ]

    def expected_code(self, name: str, tensor: Any) -> str | None:
        """dtype code `from_pretrained(dtype=<config dtype>)` gives this tensor (None: unknown)."""
        if self.dtype is None:
            return None if tensor.is_floating_point() else _code_of(tensor.dtype)
        planned = _match_dtype_plan(self.dtype_plan, name)
        if planned is not None:
            return _code_of(planned)
        return _code_of(tensor.dtype)


def _tied_mapping(model: Any) -> dict[str, str]:
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None and hasattr(model, "get_expanded_tied_weights_keys"):
        with contextlib.suppress(Exception):
            tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    if tied is None:  # older transformers: list of target names tied to the input embeddings
        tied = {}
        if getattr(model.config, "tie_word_embeddings", False):
            keys = getattr(model, "_tied_weights_keys", None) or []
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            src = None
            for n, p in model.named_parameters(remove_duplicate=False):
                if emb is not None and p is getattr(emb, "weight", None):
                    src = n
                    break
            if src is not None:
                tied = {k: src for k in keys if isinstance(k, str) and k != src}
    return dict(tied or {})


def _match_dtype_plan(plan: Mapping[str, Any], name: str) -> Any:
    for pattern, dtype in plan.items():
        try:
            if re.search(pattern.replace("*", ".*"), name):
                return dtype
        except re.error:
            if pattern in name:
                return dtype
    return None


def _load_config(config_path: Path, transformers: Any) -> tuple[Any, dict]:
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArchitectureCheckError(f"config not found: {config_path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArchitectureCheckError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ArchitectureCheckError(f"{config_path}: expected a JSON object")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ArchitectureCheckError(f"{config_path}: no 'model_type' field")
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as exc:  # pragma: no cover
        raise MissingExtraError("the architecture check", "hf") from exc
    if model_type not in CONFIG_MAPPING:
        raise ArchitectureCheckError(
            f"model_type {model_type!r} is not known to transformers {transformers.__version__} "
            "(models that need trust_remote_code are not supported)"
        )
    try:
        config = CONFIG_MAPPING[model_type].from_dict(dict(raw))
    except Exception as exc:
        raise ArchitectureCheckError(f"{config_path}: invalid {model_type} config: {exc}") from exc
    return config, raw


def _config_dtype(config: Any, raw: dict, torch: Any) -> Any:
    value = getattr(config, "dtype", None)
    if value is None:
        value = getattr(config, "torch_dtype", None)
    if value is None:
        value = raw.get("dtype", raw.get("torch_dtype"))
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    return None  # absent, "auto" or not a floating dtype


def _model_class(config: Any, raw: dict, transformers: Any) -> Any:
    from transformers import PreTrainedModel

    for name in raw.get("architectures") or []:
        cls = getattr(transformers, str(name), None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            config_class = getattr(cls, "config_class", None)
            if config_class is None or isinstance(config, config_class):
                return cls
    for auto_name in ("AutoModelForCausalLM", "AutoModel"):
        auto = getattr(transformers, auto_name, None)
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is None:
            continue
        try:
            candidates = mapping[type(config)]
        except (KeyError, ValueError):
            continue
        if isinstance(candidates, (list, tuple)):
            names = {c.__name__: c for c in candidates}
            for arch in raw.get("architectures") or []:
                if arch in names:
                    return names[arch]
            return candidates[0]
        return candidates
    raise ArchitectureCheckError(
        f"transformers {transformers.__version__} has no model class for "
        f"model_type {raw.get('model_type')!r} / architectures {raw.get('architectures')!r}"
    )


def _init_contexts(cls: Any, dtype: Any, torch: Any) -> list:
    """The context managers `from_pretrained` instantiates the model under (meta device)."""
    contexts: list = []
    try:
        from transformers import initialization as hf_init

        contexts.append(hf_init.no_init_weights())  # skip (meta) random init entirely
    except (ImportError, AttributeError):
        with contextlib.suppress(ImportError, AttributeError):
            from transformers.modeling_utils import no_init_weights

            contexts.append(no_init_weights())
    get_init_context = getattr(cls, "get_init_context", None)
    if get_init_context is not None:
        try:
            ctx = list(get_init_context(dtype or torch.get_default_dtype(), False, False, False))
        except TypeError:
            ctx = []
        # Only accept it if it really puts the model on the meta device (no DeepSpeed etc.).
        if any(isinstance(c, torch.device) and c.type == "meta" for c in ctx):
            return contexts + ctx
    contexts.append(torch.device("meta"))
    if dtype is not None:
        contexts.append(_default_dtype(dtype, torch))
    return contexts


@contextlib.contextmanager
def _default_dtype(dtype: Any, torch: Any) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build_skeleton(config_path: Path, torch: Any, transformers: Any) -> _Skeleton:
    config, raw = _load_config(config_path, transformers)
    quant = raw.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if quant and not (isinstance(quant, dict) and is_fp8(quant)):
        # Quantized checkpoints store different tensors (qweight/scales/...) that only the
        # quantizer's module replacement (`hf_quantizer.preprocess_model`) knows about;
        # FP8 ones keep the model's names and shapes plus scales, set aside in check_architecture.
        raise ArchitectureCheckError(
            f"{config_path}: quantized checkpoints (quant_method={method!r}) are not supported "
            "by the architecture check"
        )
    dtype = _config_dtype(config, raw, torch)
    cls = _model_class(config, raw, transformers)
    config = copy.deepcopy(config)
    if dtype is not None:
        with contextlib.suppress(Exception):
            config.dtype = dtype
    try:
        with contextlib.ExitStack() as stack:
            for ctx in _init_contexts(cls, dtype, torch):
                stack.enter_context(ctx)
            model = cls(config)
    except ArchitectureCheckError:
        raise
    except Exception as exc:
        raise ArchitectureCheckError(
            f"cannot build {cls.__name__} from {config_path}: {type(exc).__name__}: {exc}"
        ) from exc
    return _Skeleton(model, config, dtype, torch)


# --------------------------------------------------------------------------- classification


class _InternalsUnavailable(Exception):
    pass


@dataclass
class _Classification:
    problems: list[ArchitectureProblem]
    renamed: dict[str, str]  # checkpoint name -> model name (for the dtype check)


def _missing(skeleton: _Skeleton, name: str) -> ArchitectureProblem:
    tensor = skeleton.state_dict.get(name)
    if tensor is None:
        return ArchitectureProblem("missing", name, None, None)
    shape = _fmt_shape(tuple(tensor.shape))
    code = skeleton.expected_code(name, tensor)
    return ArchitectureProblem("missing", name, f"{shape} {code}" if code else shape, None)


def _unexpected(name: str, present: Mapping[str, tuple[str, tuple[int, ...]]]) -> ArchitectureProblem:
    found = None
    if name in present:
        code, shape = present[name]
        found = f"{_fmt_shape(shape)} {code}"
    return ArchitectureProblem("unexpected", name, None, found)


def _classify_with_transformers(
    skeleton: _Skeleton, present: Mapping[str, tuple[str, tuple[int, ...]]], torch: Any
) -> _Classification:
    """Run transformers' own key matching (renames, converters, tying, ignore rules) on meta tensors."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            convert_and_load_state_dict_in_model,
            rename_source_key,
        )
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError as exc:
        raise _InternalsUnavailable(str(exc)) from exc

    model = skeleton.model
    if not (hasattr(model, "tie_weights") and hasattr(model, "_adjust_missing_and_unexpected_keys")):
        raise _InternalsUnavailable("PreTrainedModel lacks the 5.x loading hooks")
    try:
        weight_mapping = get_model_conversion_mapping(model, None, None)
        load_config = LoadStateDictConfig(
            dtype=skeleton.dtype,
            dtype_plan=skeleton.dtype_plan,
            weight_mapping=weight_mapping,
            device_map={"": "meta"},  # "materialise" checkpoint tensors on the meta device
        )
    except TypeError as exc:
        raise _InternalsUnavailable(str(exc)) from exc

    # Where does each checkpoint key land in the model? (same renaming as step 1 of the loader,
    # done on a copy because renamings carry state)
    renamed: dict[str, str] = {}
    mapping_copy = copy.deepcopy(weight_mapping)
    renamings = [m for m in mapping_copy if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping_copy if isinstance(m, WeightConverter)]
    try:
        from transformers.core_model_loading import dot_natural_key as order
    except ImportError:
        order = _natural_key
    prefix = model.base_model_prefix
    for key in sorted(present, key=order):  # loader order: some renamings are stateful
        try:
            new, _ = rename_source_key(key, renamings, converters, prefix, skeleton.state_dict)
            if new not in skeleton.state_dict and key in skeleton.state_dict:
                new, _ = rename_source_key(key, [], [], prefix, skeleton.state_dict)
        except Exception:
            new = key
        renamed[key] = new

    meta_state = {
        key: torch.empty(shape, dtype=_torch_dtype_of(code, torch), device="meta")
        for key, (code, shape) in present.items()
    }
    info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=meta_state, load_config=load_config)
    # Conversion failures leave their targets in missing_keys; report them as shape problems.
    conversion_errors = dict(getattr(info, "conversion_errors", None) or {})
    # `_finalize_model_loading`: tie (symmetrically: a missing source is fine if its target is
    # present), then drop keys matching `_keys_to_ignore_on_load_*` and legacy buffers.
    model.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
    model._adjust_missing_and_unexpected_keys(info)

    originals: dict[str, list[str]] = {}
    for key, new in renamed.items():
        originals.setdefault(new, []).append(key)

    problems: list[ArchitectureProblem] = []
    for name in info.missing_keys:
        if name in conversion_errors:
            continue
        problems.append(_missing(skeleton, name))
    for name in info.unexpected_keys:
        sources = originals.get(name, [])
        problems.append(_unexpected(sources[0] if len(sources) == 1 else name, present))
    for name, found_shape, expected_shape in info.mismatched_keys:
        sources = originals.get(name, [])
        shown = sources[0] if len(sources) == 1 else name
        problems.append(
            ArchitectureProblem("shape", shown, _fmt_shape(tuple(expected_shape)), _fmt_shape(tuple(found_shape)))
        )
    for name in conversion_errors:
        # e.g. per-expert tensors of different shapes that cannot be stacked into a fused param
        tensor = skeleton.state_dict.get(name)
        expected = _fmt_shape(tuple(tensor.shape)) if tensor is not None else None
        sources = originals.get(name, [])
        counts: dict[str, int] = {}
        for key in sources:
            shape = _fmt_shape(present[key][1])
            counts[shape] = counts.get(shape, 0) + 1
        shapes = ", ".join(f"{s} x{n}" for s, n in counts.items())
        found = (
            f"{len(sources)} checkpoint tensors that cannot be converted ({shapes})"
            if sources
            else "checkpoint tensors that cannot be converted"
        )
        problems.append(ArchitectureProblem("shape", name, expected, found))
    return _Classification(problems, renamed)


def _classify_simple(skeleton: _Skeleton, present: Mapping[str, tuple[str, tuple[int, ...]]]) -> _Classification:
    """Fallback for transformers versions without the 5.x loader internals.

    Same rules, without per-model conversion mappings: ``base_model_prefix`` add/strip,
    tied weights, ``_keys_to_ignore_on_load_*`` and legacy rotary/position_ids buffers.
    """
    model = skeleton.model
    expected = skeleton.state_dict
    prefix = getattr(model, "base_model_prefix", "") or ""

    renamed: dict[str, str] = {}
    for key in present:
        new = key
        if key not in expected and prefix:
            if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
                new = key[len(prefix) + 1 :]
            elif f"{prefix}.{key}" in expected:
                new = f"{prefix}.{key}"
        renamed[key] = new

    loaded = {new: key for key, new in renamed.items() if new in expected}
    missing = set(expected) - set(loaded)
    unexpected = {key for key, new in renamed.items() if new not in expected}
    problems: list[ArchitectureProblem] = []
    for new, key in loaded.items():
        want = tuple(expected[new].shape)
        got = tuple(present[key][1])
        if want != got:
            problems.append(ArchitectureProblem("shape", key, _fmt_shape(want), _fmt_shape(got)))

    # Tied weights: either side may be absent as long as the other one is present.
    for target, source in skeleton.tied.items():
        if target in missing and source not in missing:
            missing.discard(target)
        elif source in missing and target not in missing:
            missing.discard(source)

    ignore_missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    ignore_unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    buffers = [n for n, _ in model.named_buffers()]
    # transformers 4.x: checkpoint entries for (non-persistent) model buffers are not unexpected
    unexpected = {k for k in unexpected if renamed[k] not in set(buffers)}
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        ignore_unexpected.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        ignore_unexpected.add(r"(^|\.)position_ids$")
    if ignore_missing:
        rx = re.compile("|".join(f"({p})" for p in ignore_missing))
        missing = {k for k in missing if rx.search(k) is None}
    if ignore_unexpected:
        rx = re.compile("|".join(f"({p})" for p in ignore_unexpected))
        unexpected = {k for k in unexpected if rx.search(renamed[k]) is None}

    problems.extend(_missing(skeleton, name) for name in missing)
    problems.extend(_unexpected(name, present) for name in unexpected)
    return _Classification(problems, renamed)


def _dtype_problems(
    skeleton: _Skeleton, present: Mapping[str, tuple[str, tuple[int, ...]]], renamed: Mapping[str, str]
) -> list[ArchitectureProblem]:
    """Floating-point checkpoint tensors whose dtype differs from the config's ``dtype``.

    Accepted: the config dtype itself, or the dtype the loader would give that tensor
    (fp32 for ``_keep_in_fp32_modules(_strict)`` or buffers created in fp32).
    Integer/bool tensors are never reported.
    """
    if skeleton.dtype_code is None:
        return []
    problems = []
    for key, (code, _shape) in present.items():
        if not _is_float_code(code):
            continue
        target = renamed.get(key, key)
        tensor = skeleton.state_dict.get(target)
        if tensor is None:  # unexpected tensor: already reported as such
            continue
        shown = skeleton.expected_code(target, tensor) or skeleton.dtype_code
        allowed = {skeleton.dtype_code, shown}
        if skeleton.fp32_patterns and _match_dtype_plan(dict.fromkeys(skeleton.fp32_patterns, 1), target):
            allowed.add("F32")
        if code not in allowed:
            problems.append(ArchitectureProblem("dtype", key, shown, code))
    return problems
