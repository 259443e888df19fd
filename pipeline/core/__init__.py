"""Shared plumbing every stage uses: errors, artifacts and manifests, interrupts, preprocessing, image folders, quiet
TensorFlow, the fault points tests stop processes at, and the clock that times a conversion's stages.

May import: nothing else from the project.
"""
