"""Fault-injection suite: pre-emption, storage faults, bad media, hostile input, distributed and
numerical faults, determinism. docs/GUARANTEES.md maps every promise to the test that proves it."""
