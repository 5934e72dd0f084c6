"""The weight store: one folder per policy version, written atomically, checked by sha256.

    <root>/v000007/
        model.safetensors            full weights      (format FULL)
        adapter_model.safetensors    LoRA adapter      (format LORA)
        adapter_config.json          LoRA only
        manifest.json                written last: version, format, sha256, parent, base model

A version folder without manifest.json is an interrupted write and is ignored. The learner
writes; generators read (from a shared volume, or through UpdateWeights streaming).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FULL = "full"
LORA = "lora"
WEIGHTS_FILE = {FULL: "model.safetensors", LORA: "adapter_model.safetensors"}


class CorruptWeights(ValueError):
    """The bytes do not match the recorded sha256, or the version is unknown."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class VersionRecord:
    version: int
    format: str                    # "full" or "lora"
    sha256: str                    # of the weights file
    path: str                      # the version folder
    parent: int = 0
    base_model: str = ""
    created_unix_ms: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return Path(self.path) / WEIGHTS_FILE[self.format]

    @property
    def adapter_config(self) -> dict[str, Any] | None:
        p = Path(self.path) / "adapter_config.json"
        return json.loads(p.read_text()) if p.exists() else None


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
        """Write a version atomically (temp folder + rename) and return its record."""
        if fmt not in WEIGHTS_FILE:
            raise ValueError(f"format must be one of {sorted(WEIGHTS_FILE)}, got {fmt!r}")
        if fmt == LORA and adapter_config is None:
            raise ValueError("a LoRA version needs its adapter_config")
        final = self.folder(version)
        if (final / "manifest.json").exists():
            raise FileExistsError(f"version {version} already in {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version:06d}-", dir=self.root))
        try:
            weights = tmp / WEIGHTS_FILE[fmt]
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights))
            if adapter_config is not None:
                (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, default=str))
            record = VersionRecord(
                version=version, format=fmt, sha256=sha256_file(weights), path=str(final), parent=parent,
                base_model=base_model, created_unix_ms=int(time.time() * 1000), meta=meta or {},
            )
            (tmp / "manifest.json").write_text(json.dumps(asdict(record), indent=2))
            _fsync_dir(tmp)
            if final.exists():  # an earlier interrupted write of the same version
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def get(self, version: int) -> VersionRecord:
        manifest = self.folder(version) / "manifest.json"
        if not manifest.exists():
            raise CorruptWeights(f"version {version} is not in the weight store {self.root}")
        data = json.loads(manifest.read_text())
        data["path"] = str(self.folder(version))  # the store may have moved (volume mounts)
        return VersionRecord(**data)

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
