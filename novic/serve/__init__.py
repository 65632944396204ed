"""Serving and scaling out novic bundles on existing engines (optional extras).

- `novic.serve.ray_serve`: an HTTP service on Ray Serve (`novic-serve BUNDLE`; `pip install 'novic[ray]'`).
- `novic.serve.http_options`: the options and size limit of an HTTP classify request, shared by
  novic-serve and examples/serve.py (no engine imported).
- `novic.serve.ray_label`: offline labelling of image collections on Ray Data (`novic-label`).
- `novic.serve.triton`: `serve(bundle)`, the Classifier behind Triton through PyTriton
  (`novic-serve --engine triton BUNDLE`; `pip install 'novic[triton]'`).
- `novic.serve.triton_repo`: `export_triton_repo(bundle, out)`, a Triton model repository
  (`novic-export triton`).

Nothing here is imported by `novic` itself: each module imports its engine only when used.
"""
