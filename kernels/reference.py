"""numpy references for the kernels in kernels.yml: one function per `reference:` name.

Each takes the kernel's inputs and scalars by argument name and returns {output name: array}.
They run on the controller only; inputs come from a fixed seed (kernels.yml `seed`).
"""

import numpy as np


def saxpy(a, x, y, n):
    return {"out": a * x + y}


def relu(x, n):
    return {"out": np.maximum(x, 0)}


def matmul(a, b, m, n, k):
    product = a.astype(np.float64).reshape(m, k) @ b.astype(np.float64).reshape(k, n)
    return {"c": product.astype(a.dtype).reshape(-1)}
