import torch
import pytest

from rlhf.weightstore import FULL, LORA, CorruptWeights, WeightStore


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
    with pytest.raises(CorruptWeights):
        store.get(9)
    with pytest.raises(FileExistsError):
        store.put(3, {"w": torch.zeros(1)})
