"""The interception proxy: it accepts reflected connections, terminates TLS for
AI hosts with leaf certificates from a per-install CA, and hands the
plaintext to the decoders; everything else is relayed byte for byte."""
