"""Wire protocol: .proto files and the stubs generated from them (see scripts/genproto.py)."""
