"""The declared on-disk shapes, the artifact store and its garbage collection (torch-free)."""
