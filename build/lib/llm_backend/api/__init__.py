"""HTTP handlers, one module per spec tag: spec arguments in, JSON or streaming responses out."""
