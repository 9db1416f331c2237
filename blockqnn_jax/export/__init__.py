"""Export of a found network to a standalone Flax or PyTorch file, with its trained weights.

``write(spec, out_dir, 'flax' | 'pytorch', variables)`` writes ``network.py`` (the network,
every layer written out, importing only jax/flax or only torch, and numpy) and, given the
trained variables of a ``networks.BlockNet``, the weights beside it in the form that file
loads: ``variables.npz`` (Flax variable paths) or ``state_dict.npz`` (the PyTorch network's
``state_dict``). Nothing of JAX is needed to read a written file, nothing of PyTorch to
write one.

One job per module: ``writer`` (``write``, ``FORMATS``, ``ExportError``), ``common`` (what both
files share, one ``module_source`` for both frameworks), ``flax_file`` and ``torch_file`` (each
framework's dialect) and ``weights`` (the variables as the written file loads them).
"""
