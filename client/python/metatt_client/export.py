"""Reader of exported adapter families (adapters/FORMAT.md), in PyTorch.

A MetaTT family (``family.json`` + ``cores.safetensors``, format_version 1)
is rebuilt into dense weight deltas, one per (task, layer, projection):

    dW[l, m, t] = s . G1[:, rows of m] . G2[:, l, :] . G3[:, m, :] (. GT[t]) . G4[:, cols of m]

(``s`` = family.json ``scale``; 5D: the output map is ``G4[r3, H, r4] . G5``
laid out head-major), which a projection adds as ``y = x W^T + b + x . dW``.
``apply_to`` merges them into a ``transformers`` BERT-family model, so the
server's Predict scores can be reproduced without the server:

    from transformers import AutoModel, AutoTokenizer
    from metatt_client.export import load_family
    fam = load_family("exported/")                 # family.json + cores.safetensors
    model = fam.apply_to(AutoModel.from_pretrained(base), task="MRPC")
    probs = fam.predict(model, AutoTokenizer.from_pretrained(base), "MRPC", ["a text"])

A LoRA family's export is a PEFT folder (``adapter_config.json`` +
``adapter_model.safetensors``) with our ``family.json`` and
``heads.safetensors`` beside it; ``load_family`` reads its heads and task
records the same way (``fam.form == "lora"``) and ``peft.PeftModel`` loads the
adapter itself.
"""
import json
import os
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

FORMAT_VERSION = 1
META_FILE = "family.json"
CORES_FILE = "cores.safetensors"
HEADS_FILE = "heads.safetensors"  # LoRA (PEFT) exports
PROJECTIONS = ("q", "k", "v", "o", "ffn_up", "ffn_down", "gate")
# BERT-family modules of each projection (transformers' BertModel naming).
BERT_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ffn_up": "intermediate.dense",
    "ffn_down": "output.dense",
}


class FormatError(ValueError):
    """The files do not follow adapters/FORMAT.md; the message names the field."""


# FNV-1a 64 as base/file_io.cc computes it. Its offset basis is
# 1469598103934665603 (decimal), not FNV's published 14695981039346656037:
# the format records hashes with this value, so a reader must use it too.
FNV_OFFSET = 1469598103934665603
FNV_PRIME = 0x100000001b3


def _fnv1a64(data: bytes) -> str:
    h = FNV_OFFSET
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _bert_geometry(cfg: dict) -> Dict[str, Tuple[int, int, int, int]]:
    """projection -> (in width, out width, in port, out port) of the encoder
    family.json's config describes (ports: 0 hidden stream, 1 MLP width)."""
    d_in, d_out, d_ffn = cfg["d_in"], cfg["d_out"], cfg.get("d_ffn", 0)
    g = {p: (d_in, d_out, 0, 0) for p in ("q", "k", "v", "o")}
    g["ffn_up"] = (d_in, d_ffn, 0, 1)
    g["ffn_down"] = (d_ffn, d_out, 1, 0)
    return g


def _geometry(cfg: dict) -> Dict[str, Tuple[int, int, int, int]]:
    model = cfg.get("model")
    if model is None:
        return _bert_geometry(cfg)
    try:
        return {name: (p["in"], p["out"], p["in_port"], p["out_port"])
                for name, p in model["projections"].items()}
    except (KeyError, TypeError) as e:
        raise FormatError(f"config.model.projections: {e}") from None


class MetaTTFamily:
    """One exported family: its config, cores, task records and heads."""

    def __init__(self, meta: dict, tensors: Dict[str, torch.Tensor]):
        self.meta = meta
        cfg = meta["config"]
        self.config = cfg
        self.form = cfg["form"]
        self.scale = float(meta["scale"])
        self.extra = meta.get("extra") or {}
        self.pooling = self.extra.get("pooling", "mean")
        self.max_length = int(self.extra.get("max_length", 128))
        self.task_names: List[str] = [t["name"] for t in meta["tasks"]]
        records = {t["index"]: t for t in self.extra.get("tasks", [])}
        self.task_records = [records.get(i, {"name": n, "index": i})
                             for i, n in enumerate(self.task_names)]
        self.cores = {k[5:]: v for k, v in tensors.items() if k.startswith("core.")}
        self.heads = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        self.projections = list(cfg["projections"])
        for p in self.projections:
            if p not in PROJECTIONS:
                raise FormatError(f"config.projections: unknown projection '{p}'")
        self.layers = list(cfg.get("layers") or range(cfg["num_layers"]))
        geom = _geometry(cfg)
        # Boundary blocks: one per port in use on each side, in port order.
        in_ports, out_ports = {}, {}
        for p in self.projections:
            w_in, w_out, pi, po = geom[p]
            in_ports[pi], out_ports[po] = w_in, w_out
        in_off, out_off, off = {}, {}, 0
        for port in sorted(in_ports):
            in_off[port], off = off, off + in_ports[port]
        off = 0
        for port in sorted(out_ports):
            out_off[port], off = off, off + out_ports[port]
        self._blocks = {p: (in_off[geom[p][2]], geom[p][0], out_off[geom[p][3]], geom[p][1])
                        for p in self.projections}
        for name in ("in", "layer", "proj"):
            if name not in self.cores:
                raise FormatError(f"{CORES_FILE}: core.{name} is missing")

    # -- the adapter -------------------------------------------------------------
    def task_index(self, task: Union[str, int]) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.task_names):
                raise KeyError(f"task index {task} outside [0, {len(self.task_names)})")
            return task
        try:
            return self.task_names.index(task)
        except ValueError:
            raise KeyError(f"task '{task}' not in the family ({len(self.task_names)} tasks)") from None

    def _output_map(self) -> torch.Tensor:
        """[r_last, out_cols]: G4 (4D, 4+1D) or G4 . G5 head-major (5D)."""
        if self.form == "5d":
            head, hw = self.cores["head"], self.cores["head_width"]  # [r3, H, r4], [r4, D/H]
            return torch.matmul(head, hw).reshape(head.shape[0], -1)
        return self.cores["out"]

    def delta(self, task: Union[str, int], layer: int, projection: str) -> torch.Tensor:
        """s . dW for one (task, base layer, projection): [D_in, D_out], float64."""
        t = self.task_index(task)
        if projection not in self.projections:
            raise KeyError(f"projection '{projection}' is not adapted ({self.projections})")
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not adapted ({self.layers})")
        li, m = self.layers.index(layer), self.projections.index(projection)
        c = self.cores
        chain = c["layer"][:, li, :].double() @ c["proj"][:, m, :].double()
        if self.form == "4+1d":
            chain = chain @ c[f"task.{t}"].double()
        w = self.scale * (c["in"].double() @ chain @ self._output_map().double())
        r0, rw, c0, cw = self._blocks[projection]
        return w[r0:r0 + rw, c0:c0 + cw]

    def apply_to(self, model, task: Union[str, int] = 0):
        """Adds every delta of `task` into a transformers BERT-family model's
        projection weights in place (Linear: W += dW^T) and returns the model."""
        enc = model.encoder if hasattr(model, "encoder") else model.base_model.encoder
        with torch.no_grad():
            for layer in self.layers:
                block = enc.layer[layer]
                for p in self.projections:
                    if p not in BERT_MODULES:
                        raise KeyError(f"projection '{p}' has no BERT module")
                    lin = block.get_submodule(BERT_MODULES[p])
                    d = self.delta(task, layer, p)
                    lin.weight += d.t().to(lin.weight.dtype)
        return model

    # -- heads -------------------------------------------------------------------
    def head(self, task: Union[str, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Task head: weight [num_labels, D], bias [num_labels] (float32)."""
        t = self.task_index(task)
        name = self.task_names[t]
        if f"{name}.weight" in self.heads:
            return self.heads[f"{name}.weight"], self.heads[f"{name}.bias"]
        n = int(self.heads["stacked.num_labels"][t])
        return self.heads["stacked.weight"][t, :n], self.heads["stacked.bias"][t, :n]

    def is_regression(self, task: Union[str, int]) -> bool:
        rec = self.task_records[self.task_index(task)]
        if "regression" in rec:
            return bool(rec["regression"])
        return self.head(task)[0].shape[0] == 1

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
               task: Union[str, int]) -> torch.Tensor:
        """What Predict returns from the encoder's last hidden states:
        softmax probabilities ([B, num_labels]) or the regression value ([B, 1])."""
        w, b = self.head(task)
        logits = self.pool(hidden, attention_mask).float() @ w.float().t() + b.float()
        return logits if self.is_regression(task) else torch.softmax(logits, -1)

    def predict(self, model, tokenizer, task: Union[str, int],
                texts: Sequence[Union[str, Tuple[str, str]]]) -> torch.Tensor:
        """Tokenises like the server (truncation at the family's max_length)
        and returns scores([B, num_labels]) of `model` (already adapted)."""
        rows = []
        for t in texts:  # one at a time: a batch may mix single texts and pairs
            a, b = (t, None) if isinstance(t, str) else t
            enc = tokenizer(a, b, truncation=True, max_length=self.max_length,
                            return_tensors="pt")
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state
            rows.append(self.scores(hidden, enc["attention_mask"], task))
        return torch.cat(rows, 0)


def _read_safetensors(path: pathlib.Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def load_family(path: Union[str, os.PathLike], check_hash: bool = True) -> MetaTTFamily:
    """Reads an exported family directory (adapters/FORMAT.md). A MetaTT
    family needs family.json + cores.safetensors; a LoRA (PEFT) export needs
    family.json + heads.safetensors (its adapter is PEFT's to load).
    Raises FormatError naming the field or file that is wrong."""
    d = pathlib.Path(path)
    meta_path = d / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{meta_path}: missing") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{meta_path}: not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise FormatError(f"{meta_path}: field 'format_version' is missing")
    if version != FORMAT_VERSION:
        raise FormatError(f"{meta_path}: format_version {version} is not supported "
                          f"(this reader reads {FORMAT_VERSION})")
    for f in ("config", "scale", "tasks"):
        if f not in meta:
            raise FormatError(f"{meta_path}: field '{f}' is missing")
    if meta["config"].get("form") == "lora":
        return LoraFamily(meta, _read_safetensors(d / meta.get("heads_file", HEADS_FILE)), d)
    cores_path = d / meta.get("cores_file", CORES_FILE)
    data = cores_path.read_bytes()
    if check_hash:
        if len(data) != meta.get("cores_bytes"):
            raise FormatError(f"{cores_path}: size {len(data)} differs from family.json "
                              f"cores_bytes {meta.get('cores_bytes')}")
        if _fnv1a64(data) != meta.get("cores_fnv1a64"):
            raise FormatError(f"{cores_path}: content hash differs from family.json cores_fnv1a64")
    from safetensors.torch import load
    return MetaTTFamily(meta, load(data))


class LoraFamily(MetaTTFamily):
    """A LoRA family's export: heads and task records here, the adapter in the
    PEFT files beside them (``peft.PeftModel.from_pretrained(base, path)``)."""

    def __init__(self, meta: dict, heads: Dict[str, torch.Tensor], path: pathlib.Path):
        self.path = path
        self.meta = meta
        self.config = meta["config"]
        self.form = "lora"
        self.scale = float(meta["scale"])
        self.extra = meta.get("extra") or {}
        self.pooling = self.extra.get("pooling", "mean")
        self.max_length = int(self.extra.get("max_length", 128))
        self.task_names = [t["name"] for t in meta["tasks"]]
        records = {t["index"]: t for t in self.extra.get("tasks", [])}
        self.task_records = [records.get(i, {"name": n, "index": i})
                             for i, n in enumerate(self.task_names)]
        self.cores = {}
        self.heads = {k[5:] if k.startswith("head.") else k: v for k, v in heads.items()}
        self.projections = list(self.config.get("projections", []))
        self.layers = list(self.config.get("layers") or range(self.config.get("num_layers", 0)))

    def delta(self, task, layer, projection):
        """s . A^T . B^T of one (layer, projection), [D_in, D_out] (every task
        shares the LoRA), from the PEFT weights."""
        from safetensors.torch import load_file
        mod = BERT_MODULES[projection]
        w = load_file(str(self.path / "adapter_model.safetensors"))
        key = f"base_model.model.encoder.layer.{layer}.{mod}"
        a, b = w[f"{key}.lora_A.weight"].double(), w[f"{key}.lora_B.weight"].double()
        return self.scale * a.t() @ b.t()

    def apply_to(self, model, task=0):
        """The PEFT model: ``peft.PeftModel.from_pretrained(model, <this folder>)``
        (the same LoRA for every task; the task picks the head)."""
        from peft import PeftModel
        return PeftModel.from_pretrained(model, str(self.path)).eval()
