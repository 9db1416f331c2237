"""The Network Structure Code: what a block is, before any network is built. Pure functions.

* ``grammar``: the NSC layer 5-tuple, parsing, formatting and validation of a block;
* ``canonical``: one key per block up to renumbering and input order (equivalent blocks);
* ``space``: the state/action space the strategies walk, as arrays.
"""
