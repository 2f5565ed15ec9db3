"""Placeholder: this family lands shortly."""

__all__ = []
