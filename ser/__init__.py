"""ser: speech emotion recognition for whole audio collections, on Ray."""

__version__ = "0.1.0"
