"""Kernels of our own for the memory-bound part of the step, each behind a switch whose default is PyTorch's
path (the switches are `train.*` fields; tests hold each kernel to that path, on CPU under Triton's
interpreter, TRITON_INTERPRET=1, and on a GPU)."""
