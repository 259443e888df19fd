"""Shared plumbing every stage uses: errors, artifacts and manifests, interrupts, preprocessing, image folders, quiet
TensorFlow, and the fault points tests stop processes at.

May import: nothing else from the project.
"""
