"""Parallelism applied to a plain ``TerraByte`` from outside: the rank layout, the pipeline layers,
DeepSpeed-Ulysses sequence parallelism and the AutoTP partition specs.

The model package knows nothing of ranks. Every form here runs the model's own walk (``TerraByte.patches``,
``embed_patches``, ``Stage.run_blocks``, ``lower``, ``forward_patches``) on the model's own modules, so it
computes what ``TerraByte.forward`` computes; a form only picks the range of patches, the layers or the
attention modules:

* ``plan_layout`` (``layout.py``): which ranks form a data-parallel replica (pipeline stages,
  tensor- or sequence-parallel peers) and which data-parallel rank reads which data.
* ``pipeline_module`` (``pipeline.py``): the hierarchy as a flat list of
  ``deepspeed.pipe.LayerSpec`` (embedding, global blocks, then the lower stages with the loss as one
  chunked layer) for DeepSpeed's pipeline engine, split into stages at boundaries computed here
  (``pipeline_parts``: by default balancing the stages' training FLOPs, which DeepSpeed's own
  partitioners cannot see).
* ``SequenceParallel`` (``sequence.py``): each rank of a sequence-parallel group holds a contiguous
  run of patches. The global stage's attention runs through Ulysses ``DistributedAttention`` (all-
  to-all: whole sequence, a slice of the heads); the lower stages are independent per patch given
  the global stage's output, so they run on the rank's own patches with no communication.
* ``autotp_config`` (``tensor.py``): column/row partition specs for the attention and feed-forward
  projections.
* ``heads_slice`` (``tensor.py``): a rank that holds a slice of a stage's heads (Ulysses, AutoTP, or
  both: Ulysses groups run across the tensor-parallel peers) attends with those heads' own patterns,
  by global head index, so no layout changes which keys a query attends.

DeepSpeed is imported lazily, inside the functions that need it.
"""
