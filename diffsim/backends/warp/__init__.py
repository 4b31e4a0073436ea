"""The Warp backend: the backend class, the zero-copy torch <-> Warp bridge and its autograd
Functions, the fused multi-step CPU runners, worker threads, and Warp's set-up."""
