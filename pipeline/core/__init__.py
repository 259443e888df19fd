"""Shared plumbing every stage uses: errors, artifacts and manifests, preprocessing, image folders, quiet TensorFlow.

May import: nothing else from the project.
"""
