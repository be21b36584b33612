"""The bottom of the library: user errors and exit code 2, file writes that never leave a half file, provenance of a
run, and the compute-dtype rule. Imports nothing else of the project."""
