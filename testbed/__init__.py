"""What tests and benchmarks share: random-weight model directories in the official layouts and
the import shims that let the upstream reference implementation run beside this project."""
