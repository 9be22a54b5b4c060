"""Regenerate the protobuf/gRPC stubs in proto/ from the .proto files, or check them.

The .proto files live in the repository's proto/ folder, which installs as `splice.proto`;
mapping that folder to the virtual path `splice/proto` makes the generated modules import
each other as `splice.proto.<name>_pb2`.

    python scripts/genproto.py          # rewrite the stubs
    python scripts/genproto.py --check  # exit 1 if the committed stubs drift from the .proto
"""

from __future__ import annotations

import argparse
import difflib
import pathlib
import sys
import tempfile

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-Isplice/proto={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[f"splice/proto/{p.name}" for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "splice" / "proto").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if stubs are out of date")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(pathlib.Path(tmp))
        drift = []
        for path in generated:
            target = PROTO_DIR / path.name
            new = path.read_text()
            old = target.read_text() if target.exists() else ""
            if new == old:
                continue
            if args.check:
                drift.append(path.name)
                sys.stdout.writelines(
                    difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                         f"committed/{path.name}", f"generated/{path.name}", n=1)
                )
            else:
                target.write_text(new)
                print(f"wrote proto/{path.name}")
        stale = {p.name for p in PROTO_DIR.glob("*_pb2*.py*")} - {p.name for p in generated}
        if args.check and (drift or stale):
            print(f"stubs out of date: {sorted(drift) + sorted(stale)}; run `make proto`",
                  file=sys.stderr)
            return 1
        for name in stale:
            (PROTO_DIR / name).unlink()
    if args.check:
        print("proto stubs match the .proto files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
