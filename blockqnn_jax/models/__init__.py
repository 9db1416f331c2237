"""From a block to a network and its cost.

* ``architecture``: ``NetworkSpec``, the stacked network's shape (stages, pooling, widths);
* ``blocks``: a block as a Flax module; ``initializers``: the kernels' initial values;
* ``networks``: ``BlockNet``, the block stacked into the network that is trained;
* ``cost``: parameter and FLOP counts, worked out from the NSC without building anything;
* ``prepare``: ``PreparedBlock``, a block checked and costed once before it is trained.
"""
