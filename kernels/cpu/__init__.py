"""Sparse attention off the GPU, in PyTorch: ``gathered_attention`` (block-gathered K/V, linear in n,
recomputing backward) and its fast path ``part_attention`` (causal local + sink + dilated patterns
as dense tiles per part, merged by log-sum-exp)."""
