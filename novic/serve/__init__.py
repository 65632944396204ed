"""Serving and scaling out novic bundles on existing engines (optional extras).

- `novic.serve.ray_serve`: an HTTP service on Ray Serve (`novic-serve BUNDLE`; `pip install 'novic[ray]'`).
- `novic.serve.ray_label`: offline labelling of image collections on Ray Data (`novic-label`).

Nothing here is imported by `novic` itself: each module imports its engine only when used.
"""
