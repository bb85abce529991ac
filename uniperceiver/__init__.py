"""Uni-Perceiver: one shared Transformer encoder for text, images and video.

Every task is "find the candidate target most similar to the input": inputs and candidate
targets go through the same encoder and are compared by cosine similarity.
"""

__version__ = "0.1.0"
