"""Decoding: sampling rules and the KV-cached decoding engine (engine.py)."""
