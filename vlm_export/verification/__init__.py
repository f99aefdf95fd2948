"""Parity proof for users: golden cases written into every export and the commands that check an export with them.

- `golden`, `cases`, `observe`, `compare`, `thresholds`, `report`, `run_cli` are torch-free: `vlm-run verify` runs
  them on a device that has only the runtime installed.
- `reference` (transformers' outputs on a case), `write` (golden cases at export time) and `export_cli`
  (`vlm-export verify`) need torch and transformers.

This package depends on the runtime pipeline; the pipeline never imports it.
"""
