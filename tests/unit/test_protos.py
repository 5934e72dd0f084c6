"""The checked-in (and installed) stubs must be exactly what protos/ generates."""

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
gen_protos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_protos)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    return gen_protos.generate(tmp_path_factory.mktemp("stubs"))


def test_checked_in_stubs_match_protos(fresh):
    assert gen_protos.drift(fresh, gen_protos.STUB_DIR) == [], "run: python scripts/gen_protos.py"


def test_installed_stubs_match_protos(fresh):
    import rlhf.v1

    installed = Path(rlhf.v1.__file__).parent
    assert gen_protos.drift(fresh, installed) == []


def test_an_edited_proto_is_detected_as_drift(tmp_path, fresh):
    protos = tmp_path / "protos"
    shutil.copytree(gen_protos.PROTO_ROOT, protos)
    events = protos / "rlhf" / "v1" / "events.proto"
    events.write_text(events.read_text().replace("string comment = 8;", "string comment = 8;\n  string mood = 99;"))
    edited = gen_protos.generate(tmp_path / "out", proto_root=protos)
    assert gen_protos.drift(edited, fresh) == ["events_pb2.py", "events_pb2.pyi"]


def test_every_event_has_schema_version_and_event_id():
    from rlhf.v1 import events_pb2

    for name in ("Feedback", "Interaction", "Prompt", "Rollout", "PolicyUpdate", "RewardModelUpdate"):
        fields = events_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name
        assert "schema_version" in fields and "event_id" in fields, name
