"""mrpcd-stubgen: .proto -> Python messages, stubs and servicers (protoc does the parsing)."""
