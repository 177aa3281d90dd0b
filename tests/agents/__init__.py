"""Small agent programs and callables the execution-layer tests run (command and python runners)."""
