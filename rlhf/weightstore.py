"""The weight store: one folder per policy version, written atomically, checked by sha256.

    <root>/v000007/
        model.safetensors            full weights      (format FULL)
        adapter_model.safetensors    LoRA adapter      (format LORA)
        adapter_config.json          LoRA only
        manifest.json                written last: version, format, sha256, parent, base model

A version folder without manifest.json is an interrupted write and is ignored. The learner
writes; generators read (from a shared volume, or through UpdateWeights streaming).

Published for serving: a version whose manifest says `meta.promoted = true` (`VersionRecord.
promoted`). The learner writes every version it trains, promoted or not (the drift gate's
verdict is in `meta`), writes the initial policy as version 0, promoted, and rolls back only
to promoted versions; generators serve nothing else (rlhf/generation/weights.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file

from rlhf.durability import atomic_folder

FULL = "full"
LORA = "lora"
WEIGHTS_FILE = {FULL: "model.safetensors", LORA: "adapter_model.safetensors"}


class UnknownVersion(LookupError):
    """No manifest for that version: never written (or an interrupted write). Not a
    CorruptWeights: "not stored yet" is a normal answer (the learner writes a version it
    does not find), a corrupt one never is."""


class CorruptWeights(ValueError):
    """A stored version that cannot be used: base class of BadManifest, and the error when
    its bytes do not match the recorded sha256."""


class BadManifest(CorruptWeights):
    """manifest.json is not JSON, or a field is missing or of the wrong type; names the file
    and the field."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class VersionRecord:
    version: int
    format: str  # "full" or "lora"
    sha256: str  # of the weights file
    path: str  # the version folder
    parent: int = 0
    base_model: str = ""
    created_unix_ms: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        """Published for serving: the drift gate passed it (or it is the initial policy)."""
        return self.meta.get("promoted") is True

    @property
    def weights_path(self) -> Path:
        return Path(self.path) / WEIGHTS_FILE[self.format]

    @property
    def adapter_config(self) -> dict[str, Any] | None:
        p = Path(self.path) / "adapter_config.json"
        return json.loads(p.read_text()) if p.exists() else None


# validated strictly (a manifest's "7" is not the integer 7); unknown keys are refused, not ignored
VersionRecord.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
_RECORD = TypeAdapter(VersionRecord)


class WeightStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def folder(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def put(
        self,
        version: int,
        tensors: dict[str, torch.Tensor],
        fmt: str = FULL,
        adapter_config: dict[str, Any] | None = None,
        parent: int = 0,
        base_model: str = "",
        meta: dict[str, Any] | None = None,
    ) -> VersionRecord:
        """Write a version atomically (temp folder, fsynced, renamed) and return its record."""
        if fmt not in WEIGHTS_FILE:
            raise ValueError(f"format must be one of {sorted(WEIGHTS_FILE)}, got {fmt!r}")
        if fmt == LORA and adapter_config is None:
            raise ValueError("a LoRA version needs its adapter_config")
        final = self.folder(version)
        if (final / "manifest.json").exists():
            raise FileExistsError(f"version {version} already in {self.root}")
        # an earlier interrupted write of the same version (no manifest) is replaced whole
        with atomic_folder(final, prefix=f".v{version:06d}-") as tmp:
            weights = tmp / WEIGHTS_FILE[fmt]
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights))
            if adapter_config is not None:
                (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, default=str))
            record = VersionRecord(
                version=version,
                format=fmt,
                sha256=sha256_file(weights),
                path=str(final),
                parent=parent,
                base_model=base_model,
                created_unix_ms=int(time.time() * 1000),
                meta=meta or {},
            )
            (tmp / "manifest.json").write_text(json.dumps(asdict(record), indent=2))
        return record

    def get(self, version: int) -> VersionRecord:
        """The version's checked manifest: UnknownVersion without one, BadManifest when it
        does not parse as a VersionRecord of that version."""
        manifest = self.folder(version) / "manifest.json"
        if not manifest.exists():
            raise UnknownVersion(f"version {version} is not in the weight store {self.root}")
        where = f"{manifest.parent.name}/{manifest.name}"
        try:
            record = _RECORD.validate_json(manifest.read_bytes(), strict=True)
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "json_invalid":
                raise BadManifest(f"{where} is not JSON: {first['msg']}") from None
            if not first["loc"]:
                raise BadManifest(
                    f"{where} must be a JSON object with the fields of a VersionRecord: {first['msg']}"
                ) from None
            field_name = ".".join(str(p) for p in first["loc"])
            raise BadManifest(f"{where}: field {field_name}: {first['msg']}") from None
        record.path = str(self.folder(version))  # the store may have moved (volume mounts)
        if record.version != version:
            raise BadManifest(f"{where}: field version: says {record.version}, the folder holds {version}")
        if record.format not in WEIGHTS_FILE:
            raise BadManifest(f"{where}: field format: {record.format!r}, must be one of {sorted(WEIGHTS_FILE)}")
        if len(record.sha256) != 64 or any(c not in "0123456789abcdef" for c in record.sha256):
            raise BadManifest(f"{where}: field sha256: must be 64 lower-case hex digits")
        return record

    def load(self, version: int, expected_sha256: str = "") -> tuple[VersionRecord, dict[str, torch.Tensor]]:
        """The version's tensors, after checking the bytes against the manifest (and caller's) sha256."""
        record = self.get(version)
        actual = sha256_file(record.weights_path)
        for expected in (record.sha256, expected_sha256):
            if expected and actual != expected:
                raise CorruptWeights(f"version {version}: sha256 {actual[:12]}… does not match {expected[:12]}…")
        return record, load_file(str(record.weights_path))

    def versions(self) -> list[VersionRecord]:
        if not self.root.exists():
            return []
        out = []
        for d in sorted(self.root.glob("v[0-9]*")):
            if (d / "manifest.json").exists():
                out.append(self.get(int(d.name[1:])))
        return out

    def latest(self) -> VersionRecord | None:
        v = self.versions()
        return v[-1] if v else None
