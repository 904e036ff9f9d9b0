"""Errors the labeling core raises on purpose, each with a message meant for the person running it."""


class ModelUnavailable(RuntimeError):
    """Model weights or files are missing or unusable; the message says which and how to provide them."""
