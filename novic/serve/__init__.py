"""Serving novic behind inference servers (optional extras, imported lazily).

    novic.serve.triton        serve(bundle): the Classifier behind Triton through PyTriton
    novic.serve.triton_repo   export_triton_repo(bundle, out): a Triton model repository
"""
