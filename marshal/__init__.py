"""Schema model, codecs, record framing: everything about bytes, nothing about I/O."""
