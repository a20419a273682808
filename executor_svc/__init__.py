"""The executor service: runs a transformers model over a paged KV pool, one step per plan.

It holds no policy: the scheduler decides which tokens run and which blocks they use.
"""
