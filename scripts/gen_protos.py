"""Generate Python code (+ typing stubs) for every .proto under protos/.

Usage: python scripts/gen_protos.py [--check]

Without --check, writes *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and *_pb2_grpc.pyi next to each
.proto. With --check, generates into a temporary folder and exits 1 if any committed file
differs, so that an edited .proto without regenerated code fails `make test`.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    # The mypy-protobuf plugins sit beside this interpreter, which need not be on PATH.
    bin_dir = Path(sys.executable).parent
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *files,
    ]
    subprocess.run(command, check=True, cwd=PROTO_ROOT)


def generated_files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = generated_files(fresh_root)
        committed = generated_files(PROTO_ROOT)
        problems = [f"missing: protos/{p}" for p in sorted(fresh - committed)]
        problems += [f"stale (no .proto): protos/{p}" for p in sorted(committed - fresh)]
        problems += [
            f"differs: protos/{p}"
            for p in sorted(fresh & committed)
            if not filecmp.cmp(fresh_root / p, PROTO_ROOT / p, shallow=False)
        ]
    if problems:
        print("Generated code is out of date; run `make protos` and commit the result:")
        print("\n".join(f"  {line}" for line in problems))
        return 1
    print(f"generated code matches {len(fresh)} files")
    return 0


def main() -> int:
    if "--check" in sys.argv[1:]:
        return check()
    for stale in generated_files(PROTO_ROOT):
        (PROTO_ROOT / stale).unlink()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for rel in generated_files(Path(tmp)):
            shutil.copyfile(Path(tmp) / rel, PROTO_ROOT / rel)
    print(f"wrote {len(generated_files(PROTO_ROOT))} files under protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
