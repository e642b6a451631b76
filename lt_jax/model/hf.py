"""Hugging Face folders <-> lt_jax models: config conversion, name tables, load and save.

Generic machinery: everything family-specific (the name table, transforms, defaults, refused
switches) lives in the family's spec module under `lt_jax.model.families`. Each table row maps a
Hugging Face tensor to one or more paths of the parameter tree documented in `lt_jax.model`
(several: a fused tensor, split on load and fused on save) with a transform object that converts
both ways. Rows whose HF name holds "{i}" are per-layer tensors, stacked along axis 0 of the
scanned parameter.

Loading never materialises the whole model on one host or device: every parameter is built with
`jax.make_array_from_callback`, whose callback reads only the slice a device asks for from a
`SafetensorsFolder` (lt_jax/model/safetensors_io.py: memory-mapped local files, byte ranges on gs://).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import re
from typing import Any, Optional, Sequence

import numpy as np

from lt_jax import storage
from lt_jax.model import families
from lt_jax.model.config import ModelConfig, RopeScaling
from lt_jax.model.families import FAMILIES
from lt_jax.model.families.spec import EMBED_NAME, TIED_HEAD  # noqa: F401  (TIED_HEAD re-exported)
from lt_jax.model.safetensors_io import (  # noqa: F401  (re-exported: part of this module's API)
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    HFFormatError,
    SafetensorsFolder,
    TensorInfo,
    plan_shards,
    remove_weight_files,
    shard_file_names,
    write_index,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Files of a tokenizer folder that export copies byte for byte (plus any *.jinja chat template).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.json",
)

# Tensors some checkpoints carry that are not parameters (old Llama exports saved the RoPE buffer).
IGNORED_TENSORS = (re.compile(r"\.rotary_emb\.inv_freq$"),)


# ---------------------------------------------------------------------------------------------
# Name tables: the family spec's rows, resolved against one model's parameter shapes

TABLES = FAMILIES  # the supported families (kept under its old name for callers)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: the HF tensor it lives in, how to lay it out, and (fused tensors) its rows.

    `start`/`size`: this parameter's extent along the HF tensor's axis 0 when the HF tensor fuses
    several parameters (None: the whole tensor is this parameter).
    """

    hf_name: str  # with "{i}" for per-layer tensors
    path: str
    transform: Any
    start: Optional[int] = None
    size: Optional[int] = None
    layer_ids: tuple[int, ...] = ()  # per-layer tensors: the HF layer of each index of axis 0
    experts: int = 0  # a Stack transform's expert count (the parameter's axis 1)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    def entries(self) -> list[tuple[str, Optional[int], Optional[int]]]:
        """(HF name, index along the parameter's layer axis, expert) of every HF tensor it spans."""
        if not self.per_layer:
            return [(self.hf_name, None, None)]
        experts = range(self.experts) if self.experts else [None]
        return [(self.hf_name.format(i=i, e=e), j, e) for j, i in enumerate(self.layer_ids) for e in experts]

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of this parameter's part of one HF tensor, given the lt_jax parameter's shape."""
        return self.transform.hf_shape(tuple(shape[1:] if self.per_layer else shape))

    def hf_index(self, inner: tuple, shape: Sequence[int]) -> tuple:
        """The HF tensor index holding block `inner` (an index of one layer of the parameter)."""
        index = self.transform.hf_index(inner)
        if self.start is None:
            return index
        lo, hi, step = index[0].indices(self.size)
        return (slice(self.start + lo, self.start + hi, step),) + tuple(index[1:])


def tensor_maps(config: ModelConfig, shapes: Optional[dict[str, Sequence[int]]] = None) -> list[TensorMap]:
    """One TensorMap per parameter of `config`'s family (no lm_head when tied).

    Fused HF tensors need the parameter `shapes` (path -> shape) to place each part.
    """
    maps = []
    for r in families.get(config.family).tensor_rows(config):
        if len(r.paths) == 1:
            path = r.paths[0]
            layers = config.layer_groups[path.split(".")[0]] if r.per_layer else ()
            experts = shapes[path][1] if getattr(r.transform, "stacked", False) else 0
            maps.append(TensorMap(r.hf_name, path, r.transform, layer_ids=layers, experts=experts))
            continue
        start = 0
        for path in r.paths:
            size = TensorMap(r.hf_name, path, r.transform).hf_shape(shapes[path])[0]
            maps.append(TensorMap(r.hf_name, path, r.transform, start, size, tuple(range(config.num_layers))))
            start += size
    return maps


# ---------------------------------------------------------------------------------------------
# Config conversion

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def hf_to_model_config(hf_config: dict[str, Any], path: str = CONFIG_FILE, **overrides) -> ModelConfig:
    """ModelConfig for a Hugging Face config.json dict; `path` names the file in errors.

    Reads both the classic hub layout (top-level `rope_theta`, `rope_scaling` with "type" or
    "rope_type") and transformers 5's `rope_parameters`. `overrides` set ModelConfig fields that
    config.json does not describe (param_dtype, compute_dtype, remat, attention).
    """
    family = hf_config.get("model_type")
    if family not in FAMILIES:
        raise HFFormatError(
            f"{path}: model_type {family!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    spec = FAMILIES[family]
    missing = [k for k in _REQUIRED if k not in hf_config]
    if missing:
        raise HFFormatError(f"{path}: required field {missing[0]!r} is missing")
    _check_supported(hf_config, spec, path)
    theta, scaling = _rope(hf_config, spec, path)
    head_dim = hf_config.get("head_dim") or spec.default("head_dim")
    if head_dim is not None and head_dim * hf_config["num_attention_heads"] == hf_config["hidden_size"]:
        head_dim = None  # the derived value: keep configs comparable across families
    fields = dict(
        family=family,
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        head_dim=head_dim,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf_config.get("rms_norm_eps", spec.default("rms_norm_eps", 1e-6))),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_position_embeddings=hf_config.get("max_position_embeddings", spec.default("max_position_embeddings")),
        bos_token_id=_token_id(hf_config, "bos_token_id", path),
        eos_token_id=_token_id(hf_config, "eos_token_id", path),
    )
    fields.update(spec.moe_from_hf(hf_config) if spec.moe_from_hf else {})
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{path}: {e}") from e


def _check_supported(hf: dict[str, Any], spec: families.FamilySpec, path: str) -> None:
    """Rejects switches this decoder does not implement instead of silently ignoring them."""
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported; only 'silu'")
    try:
        spec.check_supported(hf)
    except families.UnsupportedConfig as e:
        raise HFFormatError(f"{path}: {e}") from e
    if hf.get("mlp_bias"):
        raise HFFormatError(f"{path}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise HFFormatError(f"{path}: use_sliding_window=true is not supported; every layer must use full attention")
    other = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
    if other:
        raise HFFormatError(f"{path}: layer_types {other} are not supported; only 'full_attention'")


def _rope(hf: dict[str, Any], spec: families.FamilySpec, path: str) -> tuple[float, Optional[RopeScaling]]:
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})  # transformers 5 folds theta and scaling in here
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in spec.rope_types or kind != "llama3":
        supported = ", ".join(spec.rope_types)
        raise HFFormatError(f"{path}: rope type {kind!r} is not supported for {spec.name}; supported: {supported}")
    names = [f.name for f in dataclasses.fields(RopeScaling) if f.name != "rope_type"]
    absent = [n for n in names if n not in params]
    if absent:
        raise HFFormatError(f"{path}: llama3 rope scaling lacks field {absent[0]!r}")
    return theta, RopeScaling(**{n: params[n] for n in names})


def _token_id(hf: dict[str, Any], key: str, path: str):
    value = hf.get(key)
    if isinstance(value, list) and key == "eos_token_id":  # Llama 3.1 instruct lists three: keep all
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise HFFormatError(f"{path}: {key} must be an integer or a list of integers, got {value!r}")
        return tuple(value) or None
    if isinstance(value, list):
        log.warning("%s: %s is a list %s; keeping the first id", path, key, value)
        value = value[0] if value else None
    if value is not None and not isinstance(value, int):
        raise HFFormatError(f"{path}: {key} must be an integer, got {value!r}")
    return value


def model_config_to_hf(config: ModelConfig, dtype: Optional[str] = None) -> dict[str, Any]:
    """config.json contents for `config`, in the classic layout every transformers version reads."""
    spec = families.get(config.family)
    hf: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        "torch_dtype": dtype or config.param_dtype,
        "use_cache": True,
    }
    if config.rope_scaling is not None:
        hf["rope_scaling"] = dataclasses.asdict(config.rope_scaling)
    hf.update(spec.config_to_hf(config))
    return hf


def generation_config(config: ModelConfig, tokenizer_dir: Optional[str] = None) -> dict[str, Any]:
    """generation_config.json: the model's bos/eos, plus the tokenizer's eos_token when it differs.

    A base model's eos is often <|endoftext|> while its chat template ends turns with another
    token (<|im_end|>); after SFT on that template, generation must stop at both.
    """
    candidates = config.eos_token_ids + (tokenizer_eos_id(tokenizer_dir) if tokenizer_dir else None,)
    eos = list(dict.fromkeys(i for i in candidates if i is not None))
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    return {k: v for k, v in ids.items() if v is not None}


def generation_config_eos(folder: str) -> tuple[int, ...]:
    """EOS ids listed in a Hugging Face folder's generation_config.json (none when absent)."""
    path = storage.join(folder, "generation_config.json")
    if not storage.exists(path):
        return ()
    eos = json.loads(storage.read_text(path)).get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(int(i) for i in eos)


def tokenizer_eos_id(tokenizer_dir: str) -> Optional[int]:
    """Id of tokenizer_config.json's eos_token, looked up among the added tokens; None if absent."""
    config_path = storage.join(tokenizer_dir, "tokenizer_config.json")
    if not storage.exists(config_path):
        return None
    tok_config = json.loads(storage.read_text(config_path))
    eos = tok_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    added = {spec.get("content"): int(i) for i, spec in (tok_config.get("added_tokens_decoder") or {}).items()}
    tok_json = storage.join(tokenizer_dir, "tokenizer.json")
    if eos and eos not in added and storage.exists(tok_json):
        added.update({t["content"]: t["id"] for t in json.loads(storage.read_text(tok_json)).get("added_tokens", [])})
    return added.get(eos) if eos else None


def read_config(path: str, **overrides) -> ModelConfig:
    """ModelConfig of the Hugging Face folder at `path` (local or gs://)."""
    config_path = storage.join(path, CONFIG_FILE)
    if not storage.exists(config_path):
        raise HFFormatError(f"{path}: no {CONFIG_FILE} in this folder (is it a Hugging Face model folder?)")
    try:
        hf = json.loads(storage.read_text(config_path))
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{config_path}: invalid JSON: {e}") from e
    return hf_to_model_config(hf, config_path, **overrides)


# ---------------------------------------------------------------------------------------------
# Loading


def _maps_for(config: ModelConfig, params: dict[str, Any]) -> list[TensorMap]:
    """The checked TensorMaps of `config`'s family for a model whose parameters are `params`."""
    families.spec.check_paths(families.get(config.family), list(params), config)
    return tensor_maps(config, {path: leaf.shape for path, leaf in params.items()})


def _expected_tensors(maps: Sequence[TensorMap], params: dict[str, Any], num_layers: int) -> dict[str, tuple]:
    """HF name -> shape; a fused tensor's axis 0 is the sum of its parts'."""
    out: dict[str, tuple] = {}
    for m in maps:
        shape = m.hf_shape(params[m.path].shape)
        for name, _, _ in m.entries():
            rows = out[name][0] + shape[0] if name in out else shape[0]
            out[name] = (rows,) + tuple(shape[1:])
    return out


def check_tensors(folder: SafetensorsFolder, config: ModelConfig, expected: dict[str, tuple]) -> None:
    """Every expected tensor present with its shape, nothing unexpected; errors name file and tensor."""
    for name, shape in expected.items():
        info = folder.tensors.get(name)
        if info is None:
            raise HFFormatError(f"{folder.source}: tensor {name!r} is missing (a {config.family} model needs it)")
        if info.shape != tuple(shape):
            raise HFFormatError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json implies {list(shape)}"
            )
    extra = [n for n in folder.tensors if n not in expected and not any(p.search(n) for p in IGNORED_TENSORS)]
    if config.tie_word_embeddings and TIED_HEAD in extra:
        _check_tied_head(folder)
        extra.remove(TIED_HEAD)
    if extra:
        info = folder.tensors[extra[0]]
        more = f" ({len(extra)} unexpected tensors in all)" if len(extra) > 1 else ""
        raise HFFormatError(
            f"{info.file}: unexpected tensor {extra[0]!r}: not part of a {config.family} model with this "
            f"config.json{more}"
        )


def _check_tied_head(folder: SafetensorsFolder, rows_per_read: int = 8192) -> None:
    """A tied checkpoint may still store lm_head.weight, but only as a copy of the embedding."""
    head, emb = folder.tensors[TIED_HEAD], folder.tensors[EMBED_NAME]
    same = head.shape == emb.shape and head.dtype == emb.dtype
    for r in range(0, head.shape[0] if same else 0, rows_per_read):
        rows = (slice(r, min(r + rows_per_read, head.shape[0])), slice(None))
        a, b = folder.read([(TIED_HEAD, rows), (EMBED_NAME, rows)])
        if not np.array_equal(a, b):
            same = False
            break
    if not same:
        raise HFFormatError(
            f"{head.file}: tensor {TIED_HEAD!r} differs from {EMBED_NAME!r}, but config.json sets "
            "tie_word_embeddings=true"
        )


def _read_param(folder: SafetensorsFolder, m: TensorMap, shape: tuple, index, num_layers: int) -> np.ndarray:
    """The block `index` of the lt_jax parameter `m.path`, read from its HF tensor(s)."""
    index = tuple(slice(None) for _ in shape) if index is None else tuple(index)
    inner = index[1:] if m.per_layer else index
    hf_index = m.hf_index(inner, shape)
    if not m.per_layer:
        return m.transform.from_hf(folder.read([(m.hf_name, hf_index)])[0])
    layers = m.layer_ids[index[0]]
    experts = range(m.experts)[inner[0]] if m.experts else [None]
    names = [m.hf_name.format(i=i, e=e) for i in layers for e in experts]
    parts = [m.transform.from_hf(p) for p in folder.read([(name, hf_index) for name in names])]
    if m.experts:  # [layer][expert] blocks -> one array with both axes
        return np.stack([np.stack(parts[j:j + len(experts)]) for j in range(0, len(parts), len(experts))])
    return np.stack(parts)


def _make_array(folder: SafetensorsFolder, m: TensorMap, leaf, num_layers: int):
    import jax

    sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    dtype = np.dtype(leaf.dtype)
    blocks: dict[tuple, np.ndarray] = {}  # replicas of one block are read once

    def callback(index):
        key = None if index is None else tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = np.ascontiguousarray(_read_param(folder, m, leaf.shape, index, num_layers), dtype=dtype)
        return blocks[key]

    return jax.make_array_from_callback(tuple(leaf.shape), sharding, callback)


def load_hf(
    path: str,
    mesh=None,
    dtype: Optional[str] = None,
    compute_dtype: Optional[str] = None,
    max_workers: int = 4,
    **overrides,
):
    """A `Transformer` from a Hugging Face folder (local or gs://) holding config.json and safetensors.

    dtype: parameter dtype ("float32" by default, a lossless upcast of bf16 checkpoints);
    compute_dtype: defaults to `dtype`. `overrides` set other ModelConfig fields (remat, attention).
    With `mesh`, each parameter is created in its NamedSharding and each host reads only the
    slices its devices hold. `max_workers` parameters load at a time; each holds its host-local
    blocks in host memory until they are on device (make_array_from_callback needs them all), so
    peak host memory is about `max_workers` x the largest parameter's host-local share.
    """
    from lt_jax.model import transformer as tfm

    param_dtype = dtype or "float32"
    config = read_config(path, param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype, **overrides)
    if "eos_token_id" not in overrides:  # generation_config.json's EOS list ends generation too
        eos = tuple(dict.fromkeys(config.eos_token_ids + generation_config_eos(path)))
        config = dataclasses.replace(config, eos_token_id=eos or None)
    folder = SafetensorsFolder(path)
    abstract = tfm.abstract_model(config, mesh)
    params = tfm.flat_abstract_state(abstract)
    maps = _maps_for(config, params)
    check_tensors(folder, config, _expected_tensors(maps, params, config.num_layers))
    # Reads (gs:// latency, page faults) and numpy's transposes release the GIL: threads overlap them.
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        futures = {m.path: pool.submit(_make_array, folder, m, params[m.path], config.num_layers) for m in maps}
        arrays = {path: f.result() for path, f in futures.items()}
    folder.close()
    return tfm.model_from_state(abstract, arrays)


# ---------------------------------------------------------------------------------------------
# Saving


Entry = tuple[str, list[TensorMap], Optional[int], Optional[int]]


def _ordered_entries(maps: Sequence[TensorMap], num_layers: int) -> list[Entry]:
    """(HF name, its parts, index along the layer axis, expert) in the order transformers writes
    them: embeddings, layers, norm, head. Parts of a fused tensor share one name."""
    by_name: dict[str, tuple[list[TensorMap], Optional[int], Optional[int]]] = {}
    for m in maps:
        for name, layer, expert in m.entries():
            by_name.setdefault(name, ([], layer, expert))[0].append(m)
    hf_layer = {name: parts[0].layer_ids[layer] for name, (parts, layer, _) in by_name.items() if layer is not None}
    rows = list(by_name.items())
    first = next(k for k, (name, _) in enumerate(rows) if name in hf_layer)
    head = [(name, *v) for name, v in rows[:first]]
    layers = sorted(((name, *v) for name, v in rows if name in hf_layer), key=lambda e: hf_layer[e[0]])
    tail = [(name, *v) for name, v in rows[first:] if name not in hf_layer]
    return head + layers + tail


def _to_host(array, layer: Optional[int], transform, dtype: np.dtype, expert: Optional[int] = None) -> np.ndarray:
    """One parameter's HF block on the host: slice one layer (and expert) on device, gather it (all
    processes), cast, lay out as HF does."""
    import jax
    from jax.experimental import multihost_utils

    if layer is not None:
        array = _take_layer(array, layer)
    if expert is not None:
        array = _take_layer(array, expert)
    if jax.process_count() > 1:
        host = np.asarray(multihost_utils.process_allgather(array, tiled=True))
    else:
        host = np.asarray(jax.device_get(array))
    host = host.astype(dtype, copy=False)
    return np.ascontiguousarray(transform.to_hf(host))


@functools.cache
def _layer_taker():
    import jax

    # The layer index is traced: one compile per parameter shape, not one per layer.
    return jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False))


def _take_layer(array, layer: int):
    return _layer_taker()(array, np.int32(layer))


def save_hf(
    model,
    out_dir: str,
    tokenizer_dir: Optional[str] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: Optional[str] = None,
    generation: Optional[dict[str, Any]] = None,
) -> list[str]:
    """Writes `model` as a Hugging Face folder (local or gs://); returns the file names written.

    Safetensors are split at `max_shard_bytes` (with model.safetensors.index.json) and written in
    `dtype` (default: the parameter dtype). Parameters are gathered one tensor (one layer) at a time;
    every process must call this, process 0 writes. Tokenizer files from `tokenizer_dir` are copied
    byte for byte, so the chat template is the one used in training. `generation` replaces the
    derived generation_config.json (see `generation_config`).
    """
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import save as save_safetensors

    from lt_jax.model import transformer as tfm

    config = model.config
    params = tfm.flat_abstract_state(model)
    maps = _maps_for(config, params)
    out_dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    entries = _ordered_entries(maps, config.num_layers)
    by_name = {name: (parts, layer, expert) for name, parts, layer, expert in entries}
    sizes = [
        (n, sum(int(np.prod(m.hf_shape(params[m.path].shape))) for m in parts) * out_dtype.itemsize)
        for n, parts, _, _ in entries
    ]
    shards = plan_shards(sizes, max_shard_bytes)
    files = shard_file_names(len(shards))
    # Inputs are checked on every process before the gathers, so a bad tokenizer folder fails
    # fast and everywhere instead of after the weights (or in one process while others wait).
    tokenizer_files = tokenizer_file_names(tokenizer_dir) if tokenizer_dir is not None else []
    generation = generation_config(config, tokenizer_dir) if generation is None else generation
    writer = jax.process_index() == 0
    if writer:
        remove_weight_files(out_dir)
    for file, names in zip(files, shards):
        tensors = {}
        for name in names:
            parts, layer, expert = by_name[name]
            blocks = [_to_host(params[m.path], layer, m.transform, out_dtype, expert) for m in parts]
            tensors[name] = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)  # fused
        if writer:
            storage.write_bytes(storage.join(out_dir, file), save_safetensors(tensors, metadata={"format": "pt"}))
        del tensors
    written = list(files)
    if writer:
        written += _write_metadata(out_dir, config, files, shards, dict(sizes), str(out_dtype), generation)
        for name in tokenizer_files:  # byte for byte: the chat template stays the training one
            storage.write_bytes(storage.join(out_dir, name), storage.read_bytes(storage.join(tokenizer_dir, name)))
        written += tokenizer_files
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lt_jax.save_hf")
    return written


def _write_metadata(out_dir, config, files, shards, sizes, dtype, generation) -> list[str]:
    written = [write_index(out_dir, files, shards, sum(sizes.values()))] if len(files) > 1 else []
    hf_config = model_config_to_hf(config, dtype)
    storage.write_text(storage.join(out_dir, CONFIG_FILE), json.dumps(hf_config, indent=2) + "\n")
    storage.write_text(storage.join(out_dir, GENERATION_CONFIG_FILE), json.dumps(generation, indent=2) + "\n")
    return written + [CONFIG_FILE, GENERATION_CONFIG_FILE]


def tokenizer_file_names(tokenizer_dir: str) -> list[str]:
    """The tokenizer files (and *.jinja chat templates) in `tokenizer_dir`; an error if none."""
    if not storage.exists(tokenizer_dir):
        raise HFFormatError(f"{tokenizer_dir}: tokenizer folder does not exist")
    names = [n for n in storage.listdir(tokenizer_dir) if n in TOKENIZER_FILES or n.endswith(".jinja")]
    if not names:
        raise HFFormatError(f"{tokenizer_dir}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}, *.jinja)")
    return names
