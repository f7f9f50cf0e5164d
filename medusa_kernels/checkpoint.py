"""Checkpoints: HF-layout base models and the public Medusa heads layouts.

Base model: a directory with config.json and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), tensors named as in transformers.

Medusa heads, both layouts of the Medusa repository:
(a) heads only: config.json with ``medusa_num_heads``, ``medusa_num_layers``,
    ``base_model_name_or_path``; weights in ``medusa_lm_head.safetensors`` (or ``.pt``) with keys
    ``{head}.{layer}.linear.weight``, ``{head}.{layer}.linear.bias``, ``{head}.{L}.weight``;
(b) one directory with the base model whose weights also hold ``medusa_head.{same keys}``
    (found by those names, whether config.json says ``medusa_num_heads`` or not).

Loading checks before it allocates a weight: config.json through ``ModelConfig.from_hf``'s audit,
the safetensors headers against the config (every tensor used or explained, every expected one
present with its shape, the layer count), the shard index against its shards. Errors are
ValueError / TypeError / FileNotFoundError naming the file and the key or tensor. Weights are
read one tensor at a time into the model's parameters, allocated once on the target device in
the target dtype (``parallel.iter_shards``): the host holds one tensor beyond the model.

Tensor parallelism (``load_model(..., tp=True)`` under ``torchrun``): every rank runs the same
checks on the same headers, then reads only its slices of the split tensors (``parallel.layout``:
attention by KV-head groups, MLP by intermediate chunks, embedding / lm_head / Medusa heads'
projections by vocabulary rows); no process ever holds the whole model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._dtypes import DTYPE_NAMES, to_torch_dtype
from .chat import chat_files
from .gguf_loader import is_gguf, read_gguf
from .heads import HEAD_KINDS, MedusaHeads
from .hf_config import defaulted_note
from .model import ModelConfig, Transformer
from .parallel import (
    SINGLE,
    TPGroup,
    TPLayout,
    VocabLayout,
    check_device,
    init_tp,
    iter_shards,
    rank_device,
    sync_random_state,
    vocab_range,
)

HEADS_FILE = "medusa_lm_head.safetensors"
HEADS_PREFIX = "medusa_head."
TOKEN_MAP_KEY = "token_map"  # a trimmed vocabulary's token ids, int64 [R], in the heads file
KIND_KEY = "medusa_head_kind"  # heads config.json: "separate" (absent: public heads), "shared"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of ``path``; FileNotFoundError / ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a JSON file") from None


def read_config(path: str | os.PathLike) -> dict:
    """A config.json that must hold a JSON object (TypeError naming the file otherwise)."""
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise TypeError(f"{path}: must hold a JSON object, got a JSON {type(cfg).__name__}")
    return cfg


def _check_dir(path) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")


def weight_files(model_dir: str | os.PathLike) -> list[str]:
    """The safetensors files of an HF model directory, as transformers picks them: the shards
    of ``model.safetensors.index.json``, else ``model.safetensors``."""
    _check_dir(model_dir)
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files")
        files = []
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(model_dir, shard)
            if os.path.dirname(os.path.normpath(shard)) or not os.path.isfile(path):
                raise FileNotFoundError(f"{index} lists shard {shard!r}, which is not a file "
                                        f"in {model_dir}")
            files.append(path)
        return files
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(
            f"{model_dir}: no model.safetensors or {INDEX_FILE} (HF layout expected)")
    return [single]


@dataclass(frozen=True)
class TensorInfo:
    path: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...


def _safetensors_error(path, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file ({e})")


def tensor_index(files: list[str]) -> dict[str, TensorInfo]:
    """Name -> (file, shape, dtype) of every tensor in ``files``, from their headers only."""
    out: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in out:
                        raise ValueError(f"tensor {name} is in both {out[name].path} and {path}")
                    sl = f.get_slice(name)
                    out[name] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise _safetensors_error(path, e) from None
    return out


def _layers_in(names) -> int:
    """How many decoder layers the names ``model.layers.{i}.*`` cover (max i + 1)."""
    found = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    return max(found) + 1 if found else 0


def check_layer_count(cfg: ModelConfig, index: dict[str, TensorInfo], where: str) -> None:
    """config.json's num_hidden_layers must be the checkpoint's (checked before the model is
    built: a corrupt count cannot build thousands of layers)."""
    held = _layers_in(index)
    if held != cfg.num_layers and held:
        raise ValueError(
            f"{where}: config.json num_hidden_layers = {cfg.num_layers} but the checkpoint holds "
            f"{held} layers (model.layers.0-{held - 1}.*): refusing to "
            f"{'drop' if held > cfg.num_layers else 'invent'} layers")


def check_base_tensors(model: Transformer, index: dict[str, TensorInfo], where: str) -> None:
    """Every tensor of the checkpoint used or explained, every expected one present with the
    shape config.json implies, floating-point weights only: else a ValueError naming them."""
    cfg = model.cfg
    check_layer_count(cfg, index, where)
    expected = {hf: shape for parts in model.hf_layout().values() for hf, shape in parts}
    names = {n: info for n, info in index.items() if not n.startswith(HEADS_PREFIX)}
    missing = [n for n in expected if n not in names]
    if missing:
        shown = ", ".join(f"{n} {list(expected[n])}" for n in missing[:6])
        raise ValueError(f"{where}: {len(missing)} tensor(s) that config.json "
                         f"(model_type {cfg.model_type}) needs are missing: {shown}")
    for n, shape in expected.items():
        info = names[n]
        if info.shape != shape:
            raise ValueError(f"{where}: tensor {n} in {info.path} has shape {list(info.shape)}, "
                             f"config.json implies {list(shape)}")
        if info.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: tensor {n} in {info.path} has dtype {info.dtype}: only "
                             f"float weights ({', '.join(FLOAT_DTYPES)}) are supported")

    def explained(n: str) -> bool:
        if n.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE buffer
            return True
        # tied embeddings: a saved lm_head must equal the embedding (checked after loading)
        return n == "lm_head.weight" and cfg.tie_word_embeddings and \
            names[n].shape == expected["model.embed_tokens.weight"]

    extra = [n for n in names if n not in expected and not explained(n)]
    if extra:
        raise ValueError(
            f"{where}: {len(extra)} tensor(s) in the checkpoint that config.json (model_type "
            f"{cfg.model_type}) does not use: {', '.join(extra[:6])}")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


MODEL_DTYPES = {name: getattr(torch, t) for name, t in DTYPE_NAMES.items()}  # every --dtype's too


def check_load_args(base_dir, medusa, dtype, device) -> tuple[torch.dtype | None, torch.device]:
    """``load_model``'s arguments checked before any file is read: paths (str / os.PathLike),
    ``dtype`` (None, a float torch.dtype or one of ``_dtypes.DTYPE_NAMES``, the names every
    CLI's ``--dtype`` takes), ``device`` (a torch.device or its name, present on this machine).
    Returns (dtype, device)."""
    for name, value in (("base_dir", base_dir), ("medusa", medusa)):
        if value is not None and not isinstance(value, (str, os.PathLike)) or (
                name == "base_dir" and value is None):
            raise TypeError(f"{name} must be a directory path (str or os.PathLike), got "
                            f"{type(value).__name__} {value!r}")
    dtype = to_torch_dtype(dtype, "dtype")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a name like 'cpu', 'cuda' or "
                         f"'cuda:1', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device is available here")
    return dtype, device


def load_base_model(model_dir, dtype=None, device="cpu", tp: TPGroup = SINGLE) -> Transformer:
    """A ``Transformer`` from an HF-layout directory, in ``dtype`` on ``device``; under tensor
    parallelism (``tp``, world > 1) this rank's part of it, read as slices.

    Checks, before any weight is allocated: config.json (``ModelConfig.from_hf``'s audit), the
    files (errors name them), the tensors against the config (``check_base_tensors``) and, for
    ``tp``, that the head counts and intermediate size divide by the world size (a ValueError
    naming the config key)."""
    device = torch.device(device)
    cfg_path = os.path.join(model_dir, "config.json")
    _check_dir(model_dir)
    cfg_json = read_config(cfg_path)
    note = defaulted_note(cfg_json)  # a size key left out: say so first, not a shape later
    try:
        cfg = ModelConfig.from_hf(cfg_json)
    except (TypeError, ValueError) as e:
        msg = str(e).removeprefix("config.json ")
        raise type(e)(f"{cfg_path}: {note + '; ' if note else ''}{msg}") from None
    files = weight_files(model_dir)
    index = tensor_index(files)
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):  # the index must describe the shards it lists
        listed = read_config(index_path)["weight_map"]
        wrong = sorted(n for n in set(listed) | set(index)
                       if n not in index or n not in listed
                       or os.path.basename(index[n].path) != listed[n])
        if wrong:
            raise ValueError(f"{index_path}: weight_map disagrees with the shards about "
                             f"{len(wrong)} tensor(s), e.g. {wrong[:3]}")
    try:
        check_layer_count(cfg, index, str(model_dir))
        try:
            with torch.device("meta"):
                model = Transformer(cfg, tp)
        except ValueError as e:  # a size that does not split over the ranks
            raise ValueError(f"{cfg_path}: {str(e).removeprefix('config.json ')}") from None
        check_base_tensors(model, index, str(model_dir))
    except ValueError as e:
        if note:
            raise ValueError(f"{cfg_path}: {note}, and the weights do not fit it: {e}") from None
        raise
    model = model.to(dtype=dtype or default_dtype(device)).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: tie them again
        model.lm_head.weight = model.embed.weight
    layout = model.layout or TPLayout(1, 0, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                      cfg.intermediate_size, cfg.vocab_size)
    wanted = set(model.hf_slots())
    model.load_hf_tensors(iter_shards(files, layout, keep=wanted.__contains__))
    if cfg.tie_word_embeddings and "lm_head.weight" in index:
        _check_tied(files, layout, tp, device, str(model_dir))
    return model.eval()


def _check_tied(files, layout, tp: TPGroup, device, where: str) -> None:
    """A saved lm_head of a tied model must equal the embedding (each rank compares its rows;
    the ranks agree on the verdict, so all of them raise or none)."""
    pair = dict(iter_shards(files, layout, keep=("lm_head.weight",
                                                 "model.embed_tokens.weight").__contains__))
    differs = torch.tensor([float(not torch.equal(pair["lm_head.weight"],
                                                  pair["model.embed_tokens.weight"]))])
    if tp.world > 1:
        differs = tp.all_reduce(differs.to(device if tp.backend == "nccl" else "cpu")).cpu()
    if differs.item():
        raise ValueError(f"{where}: tie_word_embeddings is true but lm_head.weight differs "
                         "from model.embed_tokens.weight")


def load_gguf_base(path, dtype=None, device="cpu"):
    """(``Transformer``, ``gguf_loader.GGUFCheckpoint``) from a GGUF file: its metadata through
    the same config audit as a config.json, its tensors checked against the config and
    dequantized to ``dtype`` one at a time (``gguf_loader``)."""
    device = torch.device(device)
    ckpt = read_gguf(path)
    note = defaulted_note(ckpt.config)
    try:
        cfg = ModelConfig.from_hf(ckpt.config)
    except (TypeError, ValueError) as e:
        msg = str(e).removeprefix("config.json ")
        raise type(e)(f"{path}: GGUF metadata -> config {note + '; ' if note else ''}"
                      f"{msg}") from None
    index = {n: TensorInfo(str(path), shape, "F32") for n, shape in ckpt.shapes.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    check_base_tensors(model, index, str(path))
    model = model.to(dtype=dtype or default_dtype(device)).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.load_hf_tensors(ckpt.iter_tensors(model.lm_head.weight.dtype, cfg.num_heads,
                                            cfg.num_kv_heads))
    return model.eval(), ckpt


def save_base_model(model: Transformer, out_dir, hf_config: dict) -> None:
    """Write config.json and model.safetensors in the HF layout."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    state = {k: v.cpu() for k, v in model.hf_state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def heads_state_dict(heads: MedusaHeads, dtype: torch.dtype | None = None
                     ) -> dict[str, torch.Tensor]:
    """Heads weights under the public Medusa key names (one process's heads only), on the CPU,
    floats cast to ``dtype`` when given. Shared heads have no ``{h}.{L}.weight``; a trimmed
    vocabulary adds ``token_map`` (int64)."""
    if heads.tp.world > 1:
        raise ValueError(f"heads_state_dict: these heads are rank {heads.tp.rank} of a "
                         f"{heads.tp.world}-way tensor-parallel set and hold only its vocabulary "
                         "rows; save from heads loaded in one process")
    out = {}
    for h in range(heads.num_heads):
        for layer in range(heads.num_layers):
            out[f"{h}.{layer}.linear.weight"] = heads.w1[h, layer]
            out[f"{h}.{layer}.linear.bias"] = heads.b1[h, layer]
        if heads.kind == "separate":
            out[f"{h}.{heads.num_layers}.weight"] = heads.w2[h]
    out = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in out.items()}
    if heads.token_map is not None:
        out[TOKEN_MAP_KEY] = heads.token_map.detach().cpu().contiguous()
    return out


_HEAD_KEY = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)")


@dataclass(frozen=True)
class HeadsSpec:
    """What a heads checkpoint holds: kind, K heads, L ResBlocks, d, V, and R draft rows (the
    token map's length; None without one)."""

    kind: str
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    draft_vocab: int | None


def heads_dims(tensors: dict[str, tuple[tuple[int, ...], str, bool]], num_heads: int | None,
               num_layers: int | None, source: str, kind: str = "separate",
               vocab_size: int | None = None) -> HeadsSpec:
    """The ``HeadsSpec`` of public-layout head tensors given as name -> (shape, dtype name, is
    floating) (from the tensors, or from safetensors headers before reading any).
    ``num_heads`` / ``num_layers`` / ``kind`` / ``vocab_size`` from the heads' config.json
    (None: read from the names; separate heads without a map take V from the projection).
    Every tensor must be one of the heads' (``{h}.{i}.linear.weight|bias``, ``{h}.{L}.weight``
    for separate heads, ``token_map``), heads 0..K-1 complete, with consistent shapes: else a
    ValueError naming the tensors and ``source``."""
    tensors = dict(tensors)
    tmap = tensors.pop(TOKEN_MAP_KEY, None)
    parsed = {}
    for key in tensors:
        m = _HEAD_KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(f"{source}: {key!r} is not a Medusa head tensor "
                             "({h}.{i}.linear.weight, {h}.{i}.linear.bias, {h}.{L}.weight, "
                             f"{TOKEN_MAP_KEY})")
        parsed[key] = (int(m.group(1)), int(m.group(2)), m.group(3))
    if not parsed:
        raise ValueError(f"{source}: no Medusa head tensors")
    present = sorted({h for h, _, _ in parsed.values()})
    shared = kind == "shared"
    if num_layers is None:  # separate: the projection's index is the layer count
        if shared:
            num_layers = 1 + max(i for _, i, _ in parsed.values())
        else:
            projections = [i for _, i, kind_ in parsed.values() if kind_ == "weight"]
            if not projections:
                raise ValueError(f"{source}: no head projection {{h}}.{{L}}.weight (separate "
                                 f"heads; shared heads say medusa_head_kind = 'shared')")
            num_layers = max(projections)
    if num_heads is None:
        num_heads = len(present)
    if present != list(range(num_heads)):
        raise ValueError(
            f"{source}: the config says medusa_num_heads = {num_heads} but the weights hold "
            f"heads {present}"
        )
    need = set() if shared else {f"{h}.{num_layers}.weight" for h in range(num_heads)}
    need |= {f"{h}.{i}.linear.{p}" for h in range(num_heads) for i in range(num_layers)
             for p in ("weight", "bias")}
    missing, extra = sorted(need - set(tensors)), sorted(set(tensors) - need)
    if missing or extra:
        raise ValueError(f"{source}: Medusa head tensors do not fit medusa_num_layers = "
                         f"{num_layers} ({kind} heads): missing {missing[:4]}, unexpected "
                         f"{extra[:4]}")
    d_shape = tuple(tensors["0.0.linear.weight"][0])
    if len(d_shape) != 2 or 0 in d_shape:
        raise ValueError(f"{source}: head tensor 0.0.linear.weight has shape {list(d_shape)}, "
                         "expected [d, d] with d >= 1")
    d = d_shape[1]
    R = None
    if tmap is not None:
        shape, dtype, floating = tmap
        if len(shape) != 1 or shape[0] < 1 or floating or dtype not in ("I64", torch.int64):
            raise ValueError(f"{source}: {TOKEN_MAP_KEY} must be a 1-D int64 tensor of R >= 1 "
                             f"token ids, got {dtype} of shape {list(shape)}")
        R = shape[0]
        if vocab_size is None:
            raise ValueError(f"{source}: heads with a {TOKEN_MAP_KEY} need vocab_size (the base "
                             "vocabulary) in their config.json")
    if shared:
        if vocab_size is None:
            raise ValueError(f"{source}: shared heads need vocab_size (the base vocabulary) in "
                             "their config.json")
        V = vocab_size
        rows = R or V
    else:
        w2_shape = tuple(tensors[f"0.{num_layers}.weight"][0])
        if len(w2_shape) != 2 or 0 in w2_shape:
            raise ValueError(f"{source}: head tensor 0.{num_layers}.weight has shape "
                             f"{list(w2_shape)}, expected [V, d] with V, d >= 1")
        rows = w2_shape[0]
        if R is not None and rows != R:
            raise ValueError(f"{source}: head tensor 0.{num_layers}.weight has {rows} rows but "
                             f"{TOKEN_MAP_KEY} holds {R} token ids")
        V = vocab_size if R is not None else rows
    if R is not None and R > V:
        raise ValueError(f"{source}: {TOKEN_MAP_KEY} holds {R} ids, more than vocab_size {V}")
    shapes = {"linear.weight": (d, d), "linear.bias": (d,), "weight": (rows, d)}
    for key, (_, _, kind_) in parsed.items():
        shape, dtype, floating = tensors[key]
        if tuple(shape) != shapes[kind_]:
            raise ValueError(f"{source}: head tensor {key} has shape {list(shape)}, "
                             f"expected {list(shapes[kind_])} (d = {d}, rows = {rows})")
        if not floating:
            raise ValueError(f"{source}: head tensor {key} has dtype {dtype}, not float")
    return HeadsSpec(kind, num_heads, num_layers, d, V, R)


def _build_heads(spec: HeadsSpec, tp: TPGroup = SINGLE) -> MedusaHeads:
    with torch.device("meta"):
        return MedusaHeads(spec.num_heads, spec.num_layers, spec.hidden_size, spec.vocab_size,
                           tp, kind=spec.kind, token_map=spec.draft_vocab)


def heads_from_state(state: dict[str, torch.Tensor], num_heads: int | None,
                     num_layers: int | None, source: str, kind: str = "separate",
                     vocab_size: int | None = None) -> MedusaHeads:
    """Stack public-layout tensors into ``MedusaHeads`` (checked by ``heads_dims``)."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: {key!r} is not a Medusa head tensor "
                             "({h}.{i}.linear.weight, {h}.{i}.linear.bias, {h}.{L}.weight)")
    spec = heads_dims(
        {k: (tuple(v.shape), v.dtype, v.is_floating_point()) for k, v in state.items()}, num_heads,
        num_layers, source, kind, vocab_size)
    heads = _build_heads(spec).to_empty(device="cpu")
    _fill_heads(heads, state.items(), source)
    return heads


def _fill_heads(heads: MedusaHeads, tensors, source: str = "heads") -> None:
    """Copy (public name, tensor) pairs into ``heads`` (projections: this rank's rows)."""
    with torch.no_grad():
        for key, value in tensors:
            if key == TOKEN_MAP_KEY:
                try:
                    heads.set_token_map(value)
                except ValueError as e:
                    raise ValueError(f"{source}: {e}") from None
                continue
            h, i, kind = _HEAD_KEY.fullmatch(key).groups()
            h, i = int(h), int(i)
            if kind == "weight":
                heads.w2[h].copy_(value)
            else:
                (heads.w1 if kind == "linear.weight" else heads.b1)[h, i].copy_(value)


def has_heads(path) -> bool:
    """Whether ``path`` holds Medusa heads in either public layout: a heads file, or
    ``medusa_head.*`` tensors in its weights (found by their names, config or not)."""
    if not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, f)) for f in (HEADS_FILE, "medusa_lm_head.pt")):
        return True
    if _heads_config(path)[0] is not None:  # claimed by the config: loading says if absent
        return True
    try:
        files = weight_files(path)
    except FileNotFoundError:
        return False
    return any(n.startswith(HEADS_PREFIX) for n in tensor_index(files))


def _heads_config(path) -> tuple[int | None, int | None, str, int | None]:
    """medusa_num_heads, medusa_num_layers (None where absent), medusa_head_kind ("separate"
    where absent) and, for heads that say their kind, vocab_size, from ``path``/config.json."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return None, None, "separate", None
    cfg = read_config(cfg_path)
    out = []
    for key in ("medusa_num_heads", "medusa_num_layers"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= 1024):
            raise ValueError(f"{cfg_path}: {key} = {value!r} must be an int in [1, 1024]")
        out.append(value)
    kind = cfg.get(KIND_KEY, "separate")
    if kind not in HEAD_KINDS:
        raise ValueError(f"{cfg_path}: {KIND_KEY} = {kind!r} must be one of {HEAD_KINDS}")
    vocab = cfg.get("vocab_size") if KIND_KEY in cfg else None
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
        raise ValueError(f"{cfg_path}: vocab_size = {vocab!r} must be an int >= 1")
    return out[0], out[1], kind, vocab


def load_medusa_heads(path, dtype=None, device="cpu", tp: TPGroup = SINGLE) -> MedusaHeads:
    """Heads from layout (a) (heads-only directory) or (b) (base model dir with medusa_head.*);
    under tensor parallelism (``tp``) this rank's vocabulary rows of every projection, read as
    slices from safetensors (a ``medusa_lm_head.pt`` cannot be sliced: each rank reads it
    whole, keeps its rows and frees the rest). Shared heads come back without their
    projection: ``attach_lm_head`` (``load_model`` does it)."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    _check_dir(path)
    num_heads, num_layers, kind, vocab = _heads_config(path)
    st, pt = os.path.join(path, HEADS_FILE), os.path.join(path, "medusa_lm_head.pt")
    prefix = ""
    if os.path.isfile(st):
        files, source = [st], st
    elif os.path.isfile(pt):
        files, source = None, pt
    else:  # layout (b): heads inside the base model's weights
        try:
            files = weight_files(path)
        except FileNotFoundError:
            files = []
        prefix, source = HEADS_PREFIX, path
    if files is None:
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch errors alike: name the file
            raise ValueError(f"{pt}: not a readable torch file ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise TypeError(f"{pt}: must hold a dict of tensors, got {type(state).__name__}")
        heads = heads_from_state(state, num_heads, num_layers, str(source), kind, vocab)
        if tp.world > 1:
            whole = heads
            spec = HeadsSpec(whole.kind, whole.num_heads, whole.num_layers, whole.hidden_size,
                             whole.vocab_size, None if whole.token_map is None
                             else whole.draft_vocab)  # fmt: skip
            heads = _build_heads(spec, tp).to(dtype=dtype).to_empty(device=device)
            with torch.no_grad():
                for name in ("w1", "b1"):
                    getattr(heads, name).copy_(getattr(whole, name))
                if whole.token_map is not None:
                    heads.token_map.copy_(whole.token_map)
                if whole.kind == "separate":
                    start, stop = vocab_range(whole.draft_vocab, tp.world, tp.rank)
                    heads.w2.copy_(whole.w2[:, start:stop])
        return heads.to(device=device, dtype=dtype).eval()
    index = {k[len(prefix):]: info for k, info in tensor_index(files).items()
             if k.startswith(prefix)}
    if not index:
        raise FileNotFoundError(
            f"{path}: no Medusa heads ({HEADS_FILE}, medusa_lm_head.pt or "
            f"{HEADS_PREFIX}* tensors in the model weights)"
        )
    spec = heads_dims({k: (info.shape, info.dtype, info.dtype in FLOAT_DTYPES)
                       for k, info in index.items()}, num_heads, num_layers, str(source), kind,
                      vocab)  # fmt: skip
    heads = _build_heads(spec, tp).to(dtype=dtype).to_empty(device=device)
    layout = VocabLayout(tp.world, tp.rank, spec.draft_vocab or spec.vocab_size)
    map_name = prefix + TOKEN_MAP_KEY
    tensors = iter_shards(files, layout,
                          keep=lambda n: n.startswith(prefix) and n != map_name)
    _fill_heads(heads, ((n[len(prefix):], t) for n, t in tensors), str(source))
    if spec.draft_vocab is not None:  # the whole map on every rank
        owner = next(f for f in files if map_name in tensor_index([f]))
        with safe_open(owner, framework="pt") as f:
            _fill_heads(heads, [(TOKEN_MAP_KEY, f.get_tensor(map_name))], str(source))
    return heads.eval()


def save_medusa_heads(heads: MedusaHeads, out_dir, base_model_name_or_path: str = "",
                      dtype: torch.dtype | None = None) -> None:
    """Write heads in layout (a): config.json + medusa_lm_head.safetensors (floats in
    ``dtype`` when given). Shared heads add ``medusa_head_kind: "shared"`` and hold no
    projection; a trimmed vocabulary adds the ``token_map`` tensor and
    ``medusa_draft_vocab_size``."""
    os.makedirs(out_dir, exist_ok=True)
    config = {
        "medusa_num_heads": heads.num_heads,
        "medusa_num_layers": heads.num_layers,
        KIND_KEY: heads.kind,
        "base_model_name_or_path": base_model_name_or_path,
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
    }
    if heads.token_map is not None:
        config["medusa_draft_vocab_size"] = heads.draft_vocab
    state = heads_state_dict(heads, dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(state, os.path.join(out_dir, HEADS_FILE), metadata={"format": "pt"})


@dataclass
class MedusaModel:
    """A base model with optional Medusa heads, as ``load_model`` returns it."""

    base: Transformer
    heads: MedusaHeads | None
    model_dir: str | None = None  # a GGUF model: the .gguf file
    gguf: Any = None  # gguf_loader.GGUFCheckpoint of a GGUF model: tokenizer, template, ids
    heads_dir: str | None = None  # where the heads came from (their shipped trees live there)

    @property
    def device(self) -> torch.device:
        return self.base.lm_head.weight.device

    @property
    def tp(self) -> TPGroup:
        """The tensor-parallel group this rank's model is part of (``SINGLE``: one process)."""
        return self.base.tp

    @property
    def dtype(self) -> torch.dtype:
        return self.base.lm_head.weight.dtype

    def eos_token_id(self) -> int | list[int] | None:
        """EOS id(s) from the model dir's generation_config.json or config.json (GGUF: its
        metadata)."""
        if self.gguf is not None:
            return self.gguf.special_ids.get("eos_token_id")
        for name in ("generation_config.json", "config.json"):
            path = os.path.join(self.model_dir or "", name)
            if os.path.isfile(path) and read_json(path).get("eos_token_id") is not None:
                return read_json(path)["eos_token_id"]
        return None

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` of the model dir's tokenizer.json (GGUF: built from its
        metadata), or None."""
        if self.gguf is not None:
            return self.gguf.tokenizer()
        path = os.path.join(self.model_dir or "", "tokenizer.json")
        if not os.path.isfile(path):
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)

    def generation_defaults(self) -> dict:
        """EOS, BOS and pad ids as transformers takes them: from the model dir's
        generation_config.json when it has one, else from config.json; ``add_bos_token`` from
        tokenizer_config.json (None: as the tokenizer does). ``source``: the file the ids came
        from (None: no file). Unchecked."""
        out: dict = {"eos_token_id": None, "bos_token_id": None, "pad_token_id": None,
                     "add_bos_token": None, "source": None}
        if self.gguf is not None:
            return self.gguf.generation_defaults()
        if self.model_dir is None:  # built in memory: no files
            return out
        for name in ("generation_config.json", "config.json"):
            path = os.path.join(self.model_dir, name)
            if os.path.isfile(path):
                cfg = read_config(path)
                for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                    out[key] = cfg.get(key)
                out["source"] = path
                break
        path = os.path.join(self.model_dir, "tokenizer_config.json")
        if os.path.isfile(path):
            tok_cfg = read_json(path)
            if isinstance(tok_cfg, dict):
                out["add_bos_token"] = tok_cfg.get("add_bos_token")
        return out

    def chat_template(self) -> str | None:
        """The checkpoint's chat template (tokenizer_config.json's ``chat_template`` or
        chat_template.jinja; GGUF: ``tokenizer.chat_template``), or None."""
        if self.gguf is not None:
            return self.gguf.chat_template
        return None if self.model_dir is None else chat_files(self.model_dir)[0]

    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as strings: what transformers gives a chat template."""
        if self.gguf is not None:
            return self.gguf.special_tokens()
        return {} if self.model_dir is None else chat_files(self.model_dir)[1]

    def cached_tokenizer(self):
        """``tokenizer()``, loaded once per model (None without tokenizer.json)."""
        if "_tokenizer" not in self.__dict__:
            self.__dict__["_tokenizer"] = None if self.model_dir is None else self.tokenizer()
        return self.__dict__["_tokenizer"]


def load_model(base_dir, medusa=None, dtype=None, device="cpu", tp=None) -> MedusaModel:
    """Load a base model (an HF-layout directory, or a GGUF file: ``gguf_loader``) and Medusa
    heads.

    ``medusa``: a heads directory (layout a or b), or None to take the heads stored in
    ``base_dir`` itself when it has any (layout b), else no heads.

    ``tp``: tensor parallelism. None (default): the whole model in this process. True: under
    ``torchrun --nproc-per-node N`` each of the N ranks loads its part (``parallel.init_tp``
    joins or creates the process group: NCCL on ``cuda:LOCAL_RANK`` when ``device`` is CUDA,
    gloo on CPUs; without torchrun, one process). A ``parallel.TPGroup`` or a
    ``torch.distributed`` process group: that group. The model then runs ``generate`` on every
    rank with identical results; rank 0's torch random state is copied to every rank here, so
    unseeded sampling draws the same numbers on each.
    """
    dtype, device = check_load_args(base_dir, medusa, dtype, device)
    if tp is None or tp is False:
        tp = SINGLE
    elif tp is True:
        tp = init_tp(device=device)
    elif isinstance(tp, dist.ProcessGroup):
        tp = init_tp(tp)
    elif not isinstance(tp, TPGroup):
        raise TypeError(f"tp must be None, True, a parallel.TPGroup or a torch.distributed "
                        f"process group, got {type(tp).__name__} {tp!r}")
    device = rank_device(device) if tp.world > 1 else torch.device(device)
    check_device(tp, device)
    dtype = dtype or default_dtype(device)
    ckpt = None
    if os.path.isfile(base_dir):  # a .gguf file
        if not is_gguf(base_dir):
            raise ValueError(f"{base_dir}: a file without GGUF's magic number: give an HF "
                             "model directory or a GGUF file")
        if tp.world > 1:
            raise ValueError(f"{base_dir}: tensor parallelism is not supported for GGUF files")
        base, ckpt = load_gguf_base(base_dir, dtype, device)
    else:
        base = load_base_model(base_dir, dtype, device, tp)
    heads_dir = medusa if medusa is not None else (base_dir if has_heads(base_dir) else None)
    heads = None
    if heads_dir is not None:
        heads = load_medusa_heads(heads_dir, dtype, device, tp)
        if (heads.hidden_size, heads.vocab_size) != (base.cfg.hidden_size, base.cfg.vocab_size):
            raise ValueError(
                f"{heads_dir}: heads are d={heads.hidden_size}, V={heads.vocab_size} but the base "
                f"model is d={base.cfg.hidden_size}, V={base.cfg.vocab_size}"
            )
        if heads.kind == "shared":  # the base model's lm_head (this rank's rows)
            heads.attach_lm_head(base.lm_head.weight)
    sync_random_state(tp, device)
    return MedusaModel(base, heads, str(base_dir), gguf=ckpt,
                       heads_dir=None if heads_dir is None else str(heads_dir))
