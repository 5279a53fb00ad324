"""Rewrite passes over captured graphs (installed as ``adaptc.passes``)."""
