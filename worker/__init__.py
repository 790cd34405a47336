"""pipeq's worker side: load a route's pipeline on one device and serve its queue.

Heavy by design (torch, transformers); never imported by ``producer``.
"""
