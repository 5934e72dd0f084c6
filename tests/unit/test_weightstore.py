import json
from pathlib import Path

import pytest
import torch

from rlhf.weightstore import FULL, LORA, BadManifest, CorruptWeights, UnknownVersion, WeightStore


def test_put_get_load_roundtrip(tmp_path):
    store = WeightStore(tmp_path)
    t = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5.0)}
    rec = store.put(1, t, base_model="tiny")
    assert rec.format == FULL and len(rec.sha256) == 64
    rec2, loaded = store.load(1, expected_sha256=rec.sha256)
    assert rec2.sha256 == rec.sha256
    assert torch.equal(loaded["a.weight"], t["a.weight"]) and torch.equal(loaded["b.bias"], t["b.bias"])
    assert [r.version for r in store.versions()] == [1]


def test_corrupt_bytes_and_wrong_sha_are_refused(tmp_path):
    store = WeightStore(tmp_path)
    rec = store.put(2, {"w": torch.ones(8)})
    with pytest.raises(CorruptWeights):
        store.load(2, expected_sha256="0" * 64)
    data = bytearray(rec.weights_path.read_bytes())
    data[-1] ^= 0xFF
    rec.weights_path.write_bytes(bytes(data))
    with pytest.raises(CorruptWeights):
        store.load(2)


def test_interrupted_write_is_invisible_and_versions_are_ordered(tmp_path):
    store = WeightStore(tmp_path)
    (tmp_path / "v000009").mkdir(parents=True)  # no manifest: an interrupted write
    store.put(3, {"w": torch.zeros(1)})
    store.put(10, {"w": torch.zeros(1)}, fmt=LORA, adapter_config={"r": 8})
    assert [r.version for r in store.versions()] == [3, 10]
    assert store.latest().adapter_config == {"r": 8}
    with pytest.raises(UnknownVersion):
        store.get(9)
    with pytest.raises(FileExistsError):
        store.put(3, {"w": torch.zeros(1)})


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: "not json {", "v000004/manifest.json is not JSON"),
        (lambda m: b"\xff\xfe".decode("latin-1"), "v000004/manifest.json is not JSON"),
        (lambda m: json.dumps([m]), "must be a JSON object"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "sha256"}), "field sha256: Field required"),
        (lambda m: json.dumps(m | {"version": "4"}), "field version: Input should be a valid integer"),
        (lambda m: json.dumps(m | {"version": 5}), "field version: says 5, the folder holds 4"),
        (lambda m: json.dumps(m | {"format": "gguf"}), "field format: 'gguf'"),
        (lambda m: json.dumps(m | {"sha256": "xyz"}), "field sha256: must be 64 lower-case hex digits"),
        (lambda m: json.dumps(m | {"meta": []}), "field meta: Input should be an object"),
        (lambda m: json.dumps(m | {"surprise": 1}), "field surprise: Unexpected keyword argument"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_file_and_field(tmp_path, edit, needle):
    store = WeightStore(tmp_path)
    rec = store.put(4, {"w": torch.zeros(1)}, meta={"promoted": True})
    manifest = Path(rec.path) / "manifest.json"
    manifest.write_text(edit(json.loads(manifest.read_text())))
    with pytest.raises(BadManifest) as e:
        store.get(4)
    assert needle in str(e.value)
    assert isinstance(e.value, CorruptWeights)  # callers that catch the base class still do
    with pytest.raises(UnknownVersion, match="version 5 is not in the weight store") as e:
        store.get(5)
    assert not isinstance(e.value, CorruptWeights)  # missing is not corrupt: "not stored yet" is a normal answer


def test_promoted_means_the_learner_published_it(tmp_path):
    store = WeightStore(tmp_path)
    assert store.put(1, {"w": torch.zeros(1)}, meta={"promoted": True}).promoted
    assert not store.put(2, {"w": torch.zeros(1)}, meta={"promoted": False}).promoted
    assert not store.put(3, {"w": torch.zeros(1)}).promoted
    assert not store.put(5, {"w": torch.zeros(1)}, meta={"promoted": "yes"}).promoted
