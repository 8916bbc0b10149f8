"""Kernels: custom autograd functions that fuse a layer's work into one node for speed.

A method module (``peftcore/lora.py``, ...) holds its config, its math and its layer, written so
that autograd can differentiate it; a kernel here computes the same equation with fewer passes
over memory and a hand-written backward. Each one's docstring states the equation it computes,
its gradients, and what it saves for backward; its layer decides when to call it and the tests
check it against autograd on the equation.

  lora.py     ``FusedLoRA``: ``y = x W^T + b + s (d(x) A^T) B^T`` over a dense frozen base,
              saving x, d(x) A^T, W, A, B and the dropped positions
  nf4_cpu.py  NF4 dequantization on x86-64 CPUs in one pass (``nf4_cpu.c``: AVX2, and AVX-512
              for fp32 outputs), compiled with the system's C compiler on first use and loaded
              with ctypes; ``dequantize_nf4`` falls back to PyTorch ops where it cannot be built
  dropout.py  LoRA's dropout on the CPU drawn by position (the dropped positions of a
              Bernoulli(p) mask as a run of geometric gaps), which ``FusedLoRA`` takes as
              int64 positions instead of a float mask
"""
