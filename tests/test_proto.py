"""The wire protocol's generated stubs: in sync with the .proto files, and every message
kind survives a serialise/parse round trip."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "genproto.py"


def test_committed_stubs_match_the_protos() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "match" in done.stdout


@pytest.fixture
def genproto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, Path]:
    """The script as a module, pointed at a scratch copy of proto/ (the tree is not touched)."""
    spec = importlib.util.spec_from_file_location("genproto_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    proto_dir = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_dir, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(module, "PROTO_DIR", proto_dir)
    monkeypatch.setattr(sys, "argv", ["genproto.py", "--check"])
    return module, proto_dir


def test_check_passes_on_an_unchanged_copy(genproto: tuple[ModuleType, Path]) -> None:
    module, _ = genproto
    assert module.main() == 0


def test_check_detects_a_field_added_to_a_message(genproto: tuple[ModuleType, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    module, proto_dir = genproto
    proto = proto_dir / "controller.proto"
    before = (proto_dir / "controller_pb2.py").read_text()
    text = proto.read_text()
    old = "message Shutdown {\n  string reason = 1;\n"
    assert old in text
    proto.write_text(text.replace(old, "message Shutdown {\n  string reason = 1;\n"
                                       "  uint32 grace_s = 9;\n"))
    assert module.main() == 1
    out = capsys.readouterr()
    assert "controller_pb2" in out.err and "grace_s" in out.out
    # --check reports; it never rewrites the stubs.
    assert (proto_dir / "controller_pb2.py").read_text() == before


def test_check_detects_a_stale_stub(genproto: tuple[ModuleType, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    module, proto_dir = genproto
    (proto_dir / "removed_pb2.py").write_text("# generated from a .proto that is gone\n")
    assert module.main() == 1
    assert "removed_pb2.py" in capsys.readouterr().err


# ---- round trips --------------------------------------------------------------------------

def _fill(message: Message, depth: int = 0) -> Message:
    """Set every field of `message` to a non-default value (recursing into messages)."""
    d: Descriptor = message.DESCRIPTOR
    for f in d.fields:
        if f.containing_oneof is not None and message.WhichOneof(f.containing_oneof.name):
            continue  # one member per oneof
        repeated = f.is_repeated
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            if repeated:
                for _ in range(2):
                    _fill(getattr(message, f.name).add(), depth + 1)
            else:
                _fill(getattr(message, f.name), depth + 1)
            continue
        values = _scalars(f)
        if repeated:
            getattr(message, f.name).extend(values)
        else:
            setattr(message, f.name, values[0])
    return message


def _scalars(f: FieldDescriptor) -> list:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return [f"{f.name}-\u00e9", "x"]
    if t == FieldDescriptor.TYPE_BYTES:
        return [b"\x00\xff", b"y"]
    if t == FieldDescriptor.TYPE_BOOL:
        return [True, True]
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return [1.5, -2.25]
    if t == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in f.enum_type.values if v.number != 0]
        return [numbers[-1], numbers[0]]
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
             FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_INT64,
             FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return [-7, 2**31 - 1]
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return [7, 2**32 - 1]
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return [7, 2**64 - 1]
    raise AssertionError(f"no sample value for field {f.full_name} of type {t}")


ENVELOPES = (pb.ControllerMessage, pb.AgentMessage, lpb.WorkerToAgent, lpb.AgentToWorker)
KINDS = [(env, f.name) for env in ENVELOPES
         for f in env.DESCRIPTOR.oneofs_by_name["kind"].fields]


def test_every_envelope_has_its_kinds() -> None:
    names = {env.__name__: {k for e, k in KINDS if e is env} for env in ENVELOPES}
    assert names["ControllerMessage"] == {"welcome", "membership", "resume", "refusal",
                                          "shutdown", "kill", "check_replicas",
                                          "probe_links"}
    assert names["AgentMessage"] == {"hello", "heartbeat", "worker_event", "step_report",
                                     "recovery_ready", "telemetry", "corruption",
                                     "link_probes"}


@pytest.mark.parametrize(("envelope", "kind"), KINDS,
                         ids=[f"{e.__name__}.{k}" for e, k in KINDS])
def test_every_kind_round_trips(envelope: type[Message], kind: str) -> None:
    msg = envelope()
    _fill(getattr(msg, kind))
    assert msg.WhichOneof("kind") == kind
    data = msg.SerializeToString()
    back = envelope.FromString(data)
    assert back.WhichOneof("kind") == kind
    assert back == msg
    assert back.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)
    # Every field was set, so every field comes back non-default.
    sub = getattr(back, kind)
    for f in sub.DESCRIPTOR.fields:
        if f.is_repeated:
            assert len(getattr(sub, f.name)) == 2, f.full_name
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            assert sub.HasField(f.name), f.full_name
        else:
            assert getattr(sub, f.name) == _scalars(f)[0], f.full_name


def test_empty_kind_round_trips_as_set() -> None:
    """A kind whose message has all default fields is still that kind after a round trip."""
    for env, kind in KINDS:
        msg = env()
        getattr(msg, kind).SetInParent()
        back = env.FromString(msg.SerializeToString())
        assert back.WhichOneof("kind") == kind, (env.__name__, kind)
