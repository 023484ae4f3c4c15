#!/usr/bin/env bash
# Regenerates the gRPC stubs from proto/tessera/v1/atlas.proto (needs grpcio-tools, pinned in
# tests/python/requirements.txt) into tessera_client/_proto, or into $1.
# tests/python_client.rs fails when the committed stubs differ from what this generates.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/tessera_client/_proto}"
python="${PYTHON:-python3}"
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I "$here/../../proto/tessera/v1" --python_out="$out" --grpc_python_out="$out" atlas.proto
# The generated service module imports its messages as a top-level module: make it relative.
sed -i 's/^import atlas_pb2 as/from . import atlas_pb2 as/' "$out/atlas_pb2_grpc.py"
echo '"""gRPC stubs generated from proto/tessera/v1/atlas.proto by ../generate.sh: do not edit."""' > "$out/__init__.py"
