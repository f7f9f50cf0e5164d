"""Checkpoints: HF-layout base models and the public Medusa heads layouts.

Base model: a directory with config.json and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), tensors named as in transformers.

Medusa heads, both layouts of the Medusa repository:
(a) heads only: config.json with ``medusa_num_heads``, ``medusa_num_layers``,
    ``base_model_name_or_path``; weights in ``medusa_lm_head.safetensors`` (or ``.pt``) with keys
    ``{head}.{layer}.linear.weight``, ``{head}.{layer}.linear.bias``, ``{head}.{L}.weight``;
(b) one directory with the base model whose weights also hold ``medusa_head.{same keys}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .heads import MedusaHeads
from .model import ModelConfig, Transformer

HEADS_FILE = "medusa_lm_head.safetensors"
HEADS_PREFIX = "medusa_head."


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def weight_files(model_dir: str | os.PathLike) -> list[str]:
    """The safetensors files of an HF model directory (sharded or not)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [os.path.join(model_dir, s) for s in shards]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    files = [f for f in files if f != HEADS_FILE]
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (HF layout expected)")
    return [os.path.join(model_dir, f) for f in files]


def read_tensors(files: list[str], keep=lambda name: True) -> dict[str, torch.Tensor]:
    out = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if keep(name):
                    out[name] = f.get_tensor(name)
    return out


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base_model(model_dir, dtype=None, device="cpu") -> Transformer:
    """A ``Transformer`` from an HF-layout directory, in ``dtype`` on ``device``."""
    device = torch.device(device)
    cfg = ModelConfig.from_hf(read_json(os.path.join(model_dir, "config.json")))
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: tie them again
        model.lm_head.weight = model.embed.weight
    state = read_tensors(weight_files(model_dir), keep=lambda n: not n.startswith(HEADS_PREFIX))
    model.load_hf_state_dict(state)
    return model.to(device=device, dtype=dtype or default_dtype(device)).eval()


def save_base_model(model: Transformer, out_dir, hf_config: dict) -> None:
    """Write config.json and model.safetensors in the HF layout."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    state = {k: v.cpu() for k, v in model.hf_state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def heads_state_dict(heads: MedusaHeads) -> dict[str, torch.Tensor]:
    """Heads weights under the public Medusa key names."""
    out = {}
    for h in range(heads.num_heads):
        for layer in range(heads.num_layers):
            out[f"{h}.{layer}.linear.weight"] = heads.w1[h, layer]
            out[f"{h}.{layer}.linear.bias"] = heads.b1[h, layer]
        out[f"{h}.{heads.num_layers}.weight"] = heads.w2[h]
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def heads_from_state(state: dict[str, torch.Tensor], num_heads: int, num_layers: int,
                     source: str) -> MedusaHeads:
    """Stack public-layout tensors into ``MedusaHeads``; clear errors for missing heads."""
    present = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    if num_heads > len(present) or present[:num_heads] != list(range(num_heads)):
        raise ValueError(
            f"{source}: the config says medusa_num_heads = {num_heads} but the weights hold "
            f"heads {present}"
        )
    need = [f"{h}.{num_layers}.weight" for h in range(num_heads)]
    need += [f"{h}.{i}.linear.{p}" for h in range(num_heads) for i in range(num_layers)
             for p in ("weight", "bias")]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{source}: missing Medusa head tensors {missing[:4]} "
                         f"(medusa_num_layers = {num_layers})")
    V, d = state[f"0.{num_layers}.weight"].shape
    with torch.device("meta"):
        heads = MedusaHeads(num_heads, num_layers, d, V)
    heads = heads.to_empty(device="cpu")
    with torch.no_grad():
        for h in range(num_heads):
            heads.w2[h].copy_(state[f"{h}.{num_layers}.weight"])
            for i in range(num_layers):
                heads.w1[h, i].copy_(state[f"{h}.{i}.linear.weight"])
                heads.b1[h, i].copy_(state[f"{h}.{i}.linear.bias"])
    return heads


def has_heads(path) -> bool:
    """Whether ``path`` holds Medusa heads in either public layout."""
    if not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, f)) for f in (HEADS_FILE, "medusa_lm_head.pt")):
        return True
    cfg_path = os.path.join(path, "config.json")
    return os.path.isfile(cfg_path) and "medusa_num_heads" in read_json(cfg_path)


def load_medusa_heads(path, dtype=None, device="cpu") -> MedusaHeads:
    """Heads from layout (a) (heads-only directory) or (b) (base model dir with medusa_head.*)."""
    device = torch.device(device)
    cfg_path = os.path.join(path, "config.json")
    cfg = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    st, pt = os.path.join(path, HEADS_FILE), os.path.join(path, "medusa_lm_head.pt")
    if os.path.isfile(st):
        state = read_tensors([st])
    elif os.path.isfile(pt):
        state = torch.load(pt, map_location="cpu", weights_only=True)
    else:  # layout (b): heads inside the base model's weights
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        state = read_tensors(weight_files(path) if files else [],
                             keep=lambda n: n.startswith(HEADS_PREFIX))
        state = {k[len(HEADS_PREFIX):]: v for k, v in state.items()}
        if not state:
            raise FileNotFoundError(
                f"{path}: no Medusa heads ({HEADS_FILE}, medusa_lm_head.pt or "
                f"{HEADS_PREFIX}* tensors in the model weights)"
            )
    num_layers = cfg.get("medusa_num_layers")
    if num_layers is None:
        num_layers = max(int(k.split(".")[1]) for k in state if k.endswith(".weight")
                         and not k.endswith("linear.weight"))
    num_heads = cfg.get("medusa_num_heads") or len({k.split(".")[0] for k in state})
    heads = heads_from_state(state, num_heads, num_layers, source=path)
    return heads.to(device=device, dtype=dtype or default_dtype(device)).eval()


def save_medusa_heads(heads: MedusaHeads, out_dir, base_model_name_or_path: str = "") -> None:
    """Write heads in layout (a): config.json + medusa_lm_head.safetensors."""
    os.makedirs(out_dir, exist_ok=True)
    config = {
        "medusa_num_heads": heads.num_heads,
        "medusa_num_layers": heads.num_layers,
        "base_model_name_or_path": base_model_name_or_path,
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(heads_state_dict(heads), os.path.join(out_dir, HEADS_FILE),
              metadata={"format": "pt"})


@dataclass
class MedusaModel:
    """A base model with optional Medusa heads, as ``load_model`` returns it."""

    base: Transformer
    heads: MedusaHeads | None
    model_dir: str | None = None

    @property
    def device(self) -> torch.device:
        return self.base.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.lm_head.weight.dtype

    def eos_token_id(self) -> int | list[int] | None:
        """EOS id(s) from the model dir's generation_config.json or config.json."""
        for name in ("generation_config.json", "config.json"):
            path = os.path.join(self.model_dir or "", name)
            if os.path.isfile(path) and read_json(path).get("eos_token_id") is not None:
                return read_json(path)["eos_token_id"]
        return None

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` of the model dir's tokenizer.json, or None."""
        path = os.path.join(self.model_dir or "", "tokenizer.json")
        if not os.path.isfile(path):
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)

    def generation_defaults(self) -> dict:
        """EOS, BOS and pad ids as transformers takes them: from the model dir's
        generation_config.json when it has one, else from config.json (its ``text_config`` for
        keys the top level lacks); ``add_bos_token`` from tokenizer_config.json (None: as the
        tokenizer does). ``source``: the file the ids came from (None: no file). Unchecked."""
        out: dict = {"eos_token_id": None, "bos_token_id": None, "pad_token_id": None,
                     "add_bos_token": None, "source": None}
        if self.model_dir is None:  # built in memory: no files
            return out
        for name in ("generation_config.json", "config.json"):
            path = os.path.join(self.model_dir, name)
            if os.path.isfile(path):
                try:
                    cfg = read_json(path)
                except (ValueError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path}: not a readable JSON file ({e})") from None
                if not isinstance(cfg, dict):
                    raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
                text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
                for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                    out[key] = cfg[key] if cfg.get(key) is not None else text.get(key)
                out["source"] = path
                break
        path = os.path.join(self.model_dir, "tokenizer_config.json")
        if os.path.isfile(path):
            tok_cfg = read_json(path)
            if isinstance(tok_cfg, dict):
                out["add_bos_token"] = tok_cfg.get("add_bos_token")
        return out

    def cached_tokenizer(self):
        """``tokenizer()``, loaded once per model (None without tokenizer.json)."""
        if "_tokenizer" not in self.__dict__:
            self.__dict__["_tokenizer"] = None if self.model_dir is None else self.tokenizer()
        return self.__dict__["_tokenizer"]


def load_model(base_dir, medusa=None, dtype=None, device="cpu") -> MedusaModel:
    """Load a base model (HF layout) and Medusa heads.

    ``medusa``: a heads directory (layout a or b), or None to take the heads stored in
    ``base_dir`` itself when it has any (layout b), else no heads.
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    base = load_base_model(base_dir, dtype, device)
    heads_dir = medusa if medusa is not None else (base_dir if has_heads(base_dir) else None)
    heads = None
    if heads_dir is not None:
        heads = load_medusa_heads(heads_dir, dtype, device)
        if (heads.hidden_size, heads.vocab_size) != (base.cfg.hidden_size, base.cfg.vocab_size):
            raise ValueError(
                f"{heads_dir}: heads are d={heads.hidden_size}, V={heads.vocab_size} but the base "
                f"model is d={base.cfg.hidden_size}, V={base.cfg.vocab_size}"
            )
    return MedusaModel(base, heads, str(base_dir))
