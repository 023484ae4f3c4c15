"""gRPC stubs generated from proto/tessera/v1/atlas.proto by ../generate.sh: do not edit."""
