"""Checking a weight update before it is served, and receiving one over gRPC.

Only versions the learner published are served (`published`: the lineage rule), a stream
is capped at the size of the model it replaces (`max_update_bytes`) before a byte is written.

A full update must have exactly the base model's tensor names and shapes (a tied lm_head may
be left out); a LoRA adapter must target linear layers the model has, with A/B shapes that
fit them and a rank the engine accepts. Anything else is refused with `WeightsRefused` before
the serving weights are touched, so the old version keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Mapping

import torch
from safetensors import safe_open

from rlhf.generation.types import NotPublished, WeightsRefused
from rlhf.weightstore import FULL, LORA, WEIGHTS_FILE, CorruptWeights, UnknownVersion, WeightStore, sha256_file

LORA_CONFIG_FILE = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSpec:
    rank: int
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    modules: list[str]  # e.g. "model.layers.0.self_attn.q_proj"


@dataclass
class WeightUpdate:
    """A version checked and ready to hand to a backend."""

    version: int
    fmt: str  # FULL or LORA
    files: list[Path]  # safetensors files holding the tensors
    folder: Path | None = None  # LoRA: adapter_config.json + adapter_model.safetensors
    lora: LoraSpec | None = None
    sha256: tuple[str, ...] = ()  # digests files[0] must match (checked during prepare)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model folder (one file or the shards of an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors")
    return [single]


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in `files`, read from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as e:  # noqa: BLE001 - any unreadable file is a refused update
            raise WeightsRefused(f"{path.name} is not a readable safetensors file: {e}") from e
    return shapes


def check_full(files: list[Path], base: dict[str, tuple[int, ...]], tied: bool) -> None:
    got = tensor_shapes(files)
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(base) - set(got) - optional)
    unknown = sorted(set(got) - set(base) - optional)
    if missing or unknown:
        raise WeightsRefused(
            f"tensor names do not match the model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unknown {unknown[:5]}{'…' if len(unknown) > 5 else ''}"
        )
    for name, shape in got.items():
        want = base.get(name, shape)
        if shape != want:
            raise WeightsRefused(f"tensor {name} has shape {list(shape)}, the model needs {list(want)}")


def check_lora(folder: Path, base: dict[str, tuple[int, ...]], max_rank: int) -> LoraSpec:
    cfg_path = folder / LORA_CONFIG_FILE
    if not cfg_path.is_file():
        raise WeightsRefused(f"LoRA adapter without {LORA_CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
        rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsRefused(f"{LORA_CONFIG_FILE} is not a LoRA config (needs r, lora_alpha): {e}") from e
    if not 1 <= rank <= max_rank:
        raise WeightsRefused(f"LoRA rank r={rank} is outside 1..{max_rank} (the generator's max_lora_rank)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
        raise WeightsRefused("LoRA rank_pattern, alpha_pattern and modules_to_save are not supported")
    shapes = tensor_shapes([folder / WEIGHTS_FILE[LORA]])
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        module, kind = _lora_key(name)
        pairs.setdefault(module, {})[kind] = shape
    if not pairs:
        raise WeightsRefused("LoRA adapter holds no lora_A/lora_B tensors")
    for module, ab in pairs.items():
        weight = base.get(f"{module}.weight")
        if weight is None or len(weight) != 2:
            raise WeightsRefused(f"LoRA targets {module}, which is not a linear layer of the model")
        if set(ab) != {"lora_A", "lora_B"}:
            raise WeightsRefused(f"LoRA module {module} needs both lora_A and lora_B")
        out_f, in_f = weight
        if ab["lora_A"] != (rank, in_f) or ab["lora_B"] != (out_f, rank):
            raise WeightsRefused(
                f"LoRA {module}: lora_A {list(ab['lora_A'])} / lora_B {list(ab['lora_B'])} do not fit "
                f"a {out_f}x{in_f} layer at r={rank} (need [{rank}, {in_f}] / [{out_f}, {rank}])"
            )
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return LoraSpec(rank=rank, scale=scale, modules=sorted(pairs))


def _lora_key(name: str) -> tuple[str, str]:
    """ "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" → (module, "lora_A")."""
    parts = name.removeprefix(_PEFT_PREFIX).split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        raise WeightsRefused(f"unexpected tensor {name} in a LoRA adapter (only lora_A/lora_B weights)")
    return ".".join(parts[:-2]), parts[-2]


def lora_factors(folder: Path, spec: LoraSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{"<module>": (A, scale · B)}` in fp32: the adapter as its two low-rank factors, A of
    shape (r, in) and B of shape (out, r), so that ΔW = (scale · B) @ A."""
    with safe_open(str(folder / WEIGHTS_FILE[LORA]), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    ab: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        module, kind = _lora_key(name)
        ab.setdefault(module, {})[kind] = t.float()
    return {m: (t["lora_A"], spec.scale * t["lora_B"]) for m, t in ab.items()}


def lora_deltas(folder: Path, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """`{"<module>.weight": scale · B @ A}`: what merging the adapter adds to each base weight."""
    # ΔW = (α/r) · B A, Hu et al. 2021 eq. 3
    return {f"{m}.weight": b @ a for m, (a, b) in lora_factors(folder, spec).items()}


def verify_sha256(path: Path, *expected: str) -> str:
    actual = sha256_file(path)
    for want in expected:
        if want and want.lower() != actual:
            raise WeightsRefused(f"sha256 mismatch: the weights hash to {actual[:16]}…, expected {want[:16]}…")
    return actual


@dataclass(frozen=True)
class Announced:
    """A version the learner announced PROMOTED or ROLLED_BACK on rlhf.policy-updates."""

    sha256: str
    fmt: str  # FULL or LORA ("" when the event did not say)


def published(store: WeightStore, version: int, announced: Mapping[int, Announced]) -> tuple[str, str]:
    """(sha256, format) of `version` if the learner published it for serving, else NotPublished.

    The lineage rule. The learner writes every trained version to the weight store (its
    manifest holds the drift gate's verdict, `meta.promoted`), then announces it on
    rlhf.policy-updates: PROMOTED or REJECTED; an operator's rollback re-announces an earlier
    *promoted* version as ROLLED_BACK; version 0, the initial policy, is stored promoted. So:

    - a generator that sees the weight store (its folder exists: the shared volume) serves
      a version only if the store holds it with a valid manifest and `promoted: true`, and
      only the bytes whose sha256 is the manifest's;
    - a generator without access to the store (remote, fed by UpdateWeights) checks against
      what its PolicyUpdate follower saw instead: the version must have been announced
      PROMOTED or ROLLED_BACK, and the bytes must hash to the announced sha256 (the follower
      refuses events whose version is negative or whose sha256 is not 64 hex digits).

    Version 0 without a store entry is the weights the generator started with (LoadVersion
    only: there is nothing to stream)."""
    if version < 0:
        raise WeightsRefused(f"version: must be ≥ 0, got {version}")
    if store.root.is_dir():
        try:
            record = store.get(version)
        except UnknownVersion:
            raise NotPublished(
                f"version {version} was never published by the learner: it is not in the weight store {store.root}"
            ) from None
        except CorruptWeights as e:
            raise WeightsRefused(str(e)) from e
        if not record.promoted:
            why = record.meta.get("reason") or "no promoted flag in its manifest"
            raise NotPublished(
                f"version {version} is in the weight store but was not promoted ({why}); only "
                "promoted versions are served"
            )
        return record.sha256, record.format
    if version in announced:
        a = announced[version]
        return a.sha256, a.fmt
    raise NotPublished(
        f"version {version} was never published by the learner: this generator has no weight store "
        f"({store.root}) and saw no PROMOTED/ROLLED_BACK PolicyUpdate for it"
    )


def store_version(store: WeightStore, version: int, uri: str = "", sha256: str = "") -> WeightUpdate:
    """A published weight-store version (see `published`), to be checked against the
    manifest's sha256 and the caller's (`Generator` hashes while the backend reads). `uri`,
    when given (a version folder, optionally `file://`), must name that version's folder in
    this store: a generator serves only what the learner published there."""
    if not store.root.is_dir():
        raise NotPublished(
            f"this generator has no weight store ({store.root}): versions reach it through UpdateWeights"
        )
    if uri:
        folder = Path(uri.removeprefix("file://")).expanduser()
        if folder.resolve() != store.folder(version).resolve():
            raise WeightsRefused(
                f"uri: {uri} is not version {version}'s folder in this generator's weight store "
                f"({store.folder(version)})"
            )
    published(store, version, {})
    record = store.get(version)
    update = update_from_folder(version, record.format, Path(record.path))
    update.sha256 = tuple(s for s in (record.sha256, sha256) if s)
    return update


# safetensors header: 8 length bytes, then JSON naming each tensor's dtype, shape and offsets
# (≈ 100 bytes + the name per tensor here) and a small __metadata__
_HEADER_BYTES, _HEADER_BYTES_PER_TENSOR = 64 * 1024, 512
_MAX_ELEMENT_BYTES = 4  # fp32: the widest dtype the learner stores a version in


def max_update_bytes(fmt: str, base: Mapping[str, tuple[int, ...]], adapter_config_json: str, max_rank: int) -> int:
    """The largest weights file an update of `fmt` may announce (header.total_bytes).

    FULL replaces the model: every tensor of the base model at 4 bytes an element, plus
    the safetensors header. LORA: an A (r × in) and a B (out × r) per linear layer (every 2-D
    tensor of the model: what `check_lora` accepts as a target), r from the adapter config
    (1..max_rank), 4 bytes an element, plus the header."""
    if fmt == FULL:
        elements = sum(math.prod(shape) for shape in base.values())
        return elements * _MAX_ELEMENT_BYTES + _HEADER_BYTES + _HEADER_BYTES_PER_TENSOR * len(base)
    if fmt != LORA:
        raise WeightsRefused(f"header.format: unknown weight format {fmt!r}")
    if not adapter_config_json:
        raise WeightsRefused("header.adapter_config_json: a LoRA update needs it")
    try:
        cfg = json.loads(adapter_config_json)
        rank = cfg["r"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsRefused(f"header.adapter_config_json: not a LoRA config with an integer r: {e}") from e
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise WeightsRefused(
            f"header.adapter_config_json.r: {rank!r} is outside 1..{max_rank} (the generator's max_lora_rank)"
        )
    linear = [shape for shape in base.values() if len(shape) == 2]
    elements = sum(rank * (out_f + in_f) for out_f, in_f in linear)
    return elements * _MAX_ELEMENT_BYTES + _HEADER_BYTES + _HEADER_BYTES_PER_TENSOR * 2 * len(linear)


async def receive_stream(
    header_version: int,
    fmt: str,
    sha256: str,
    total_bytes: int,
    adapter_config_json: str,
    data: AsyncIterator[bytes],
    work_dir: Path,
    max_bytes: int,
) -> Path:
    """Write streamed weight bytes into a fresh folder laid out like a weight-store version
    and return it, after checking size and sha256 (the folder is removed on any failure).

    Nothing is written before the header passes: `total_bytes` is required and at most
    `max_bytes` (`max_update_bytes`), and writing stops at the first block past it."""
    if fmt == LORA:
        if not adapter_config_json:
            raise WeightsRefused("header.adapter_config_json: a LoRA update needs it")
        try:
            json.loads(adapter_config_json)
        except ValueError as e:
            raise WeightsRefused(f"header.adapter_config_json: not JSON: {e}") from e
    if total_bytes <= 0:
        raise WeightsRefused("header.total_bytes: required, the size in bytes of the weights file that follows")
    if total_bytes > max_bytes:
        raise WeightsRefused(
            f"header.total_bytes: {total_bytes} is over {max_bytes}, the most a {fmt} update of this model can take"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"v{header_version:06d}-", dir=work_dir))
    try:
        h, n = hashlib.sha256(), 0
        with open(folder / WEIGHTS_FILE[fmt], "wb") as f:
            async for block in data:
                n += len(block)
                if n > total_bytes:
                    raise WeightsRefused(f"received more than header.total_bytes={total_bytes} bytes")
                h.update(block)
                f.write(block)
        if n != total_bytes:
            raise WeightsRefused(f"received {n} bytes, header.total_bytes says {total_bytes}")
        actual = h.hexdigest()
        if not sha256 or actual != sha256.lower():
            raise WeightsRefused(
                f"sha256 mismatch: the data hashes to {actual[:16]}…, header says {sha256[:16] or '(none)'}…"
            )
        if fmt == LORA:
            (folder / LORA_CONFIG_FILE).write_text(adapter_config_json)
        return folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def update_from_folder(version: int, fmt: str, folder: Path) -> WeightUpdate:
    if fmt not in WEIGHTS_FILE:
        raise WeightsRefused(f"unknown weight format {fmt!r}")
    return WeightUpdate(version=version, fmt=fmt, files=[folder / WEIGHTS_FILE[fmt]], folder=folder)


__all__ = [
    "FULL",
    "LORA",
    "Announced",
    "LoraSpec",
    "WeightUpdate",
    "check_full",
    "check_lora",
    "lora_deltas",
    "lora_factors",
    "max_update_bytes",
    "published",
    "receive_stream",
    "safetensors_files",
    "store_version",
    "tensor_shapes",
    "update_from_folder",
    "verify_sha256",
]
