"""Generates the gRPC stubs from proto/metatt/v1/*.proto into metatt_client/gen."""
import pathlib
import sys

from grpc_tools import protoc
import grpc_tools

PKG = pathlib.Path(__file__).resolve().parent
GEN = PKG / "gen"


def find_proto_root() -> pathlib.Path:
    for parent in PKG.parents:
        cand = parent / "proto"
        if (cand / "metatt" / "v1").is_dir():
            return cand
    raise FileNotFoundError("proto/metatt/v1 not found above " + str(PKG))


def stale() -> bool:
    """True when the stubs are missing or older than a .proto next to the package
    (an installed package without proto/ keeps the stubs it has)."""
    marker = GEN / "metatt" / "v1" / "jobs_pb2.py"
    if not marker.exists():
        return True
    try:
        root = find_proto_root()
    except FileNotFoundError:
        return False
    built = marker.stat().st_mtime
    return any(p.stat().st_mtime > built for p in (root / "metatt" / "v1").glob("*.proto"))


def generate(proto_root: pathlib.Path = None) -> pathlib.Path:
    proto_root = proto_root or find_proto_root()
    GEN.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "metatt" / "v1").glob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={GEN}",
                      f"--grpc_python_out={GEN}", *protos])
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}")
    for d in (GEN / "metatt", GEN / "metatt" / "v1"):
        (d / "__init__.py").touch()
    return GEN


if __name__ == "__main__":
    print("stubs in", generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else None))
