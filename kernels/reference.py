"""numpy references for the kernels in kernels.yml: one function per `reference:` name.

Each takes the kernel's inputs and scalars by argument name and returns {output name: array}. They compute
in float64 and round the result to the inputs' dtype, as a device that stores that dtype must.
They run on the controller only; inputs come from a fixed seed (kernels.yml `seed`).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def saxpy(a, x, y, n):
    return {"out": a * x + y}


def relu(x, n):
    return {"out": np.maximum(x, 0)}


def matmul(a, b, m, n, k):
    product = a.astype(np.float64).reshape(m, k) @ b.astype(np.float64).reshape(k, n)
    return {"c": product.astype(a.dtype).reshape(-1)}


def _windows(x, k, stride, pad):
    """[c, h, w] -> [c, h_out, w_out, k, k] windows of the zero-padded input."""
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    return sliding_window_view(padded, (k, k), axis=(1, 2))[:, ::stride, ::stride]


def conv2d_3x3(x, weights, c_in, h, w, c_out, h_out, w_out, stride, pad):
    x64, w64 = _f64(x, weights)
    windows = _windows(x64.reshape(c_in, h, w), 3, stride, pad)[:, :h_out, :w_out]
    out = np.einsum("chwij,ocij->ohw", windows, w64.reshape(c_out, c_in, 3, 3))
    return {"out": out.astype(x.dtype)}


def conv2d_1x1(x, weights, c_in, hw, c_out):
    x64, w64 = _f64(x, weights)
    return {"out": (w64.reshape(c_out, c_in) @ x64.reshape(c_in, hw)).astype(x.dtype)}


def depthwise_conv2d(x, weights, c, h, w, h_out, w_out, stride, pad):
    x64, w64 = _f64(x, weights)
    windows = _windows(x64.reshape(c, h, w), 3, stride, pad)[:, :h_out, :w_out]
    return {"out": np.einsum("chwij,cij->chw", windows, w64.reshape(c, 3, 3)).astype(x.dtype)}


def _biased(x, bias, plane):
    x64, b64 = _f64(x, bias)
    return (x64.reshape(-1, plane) + b64.reshape(-1, 1)).reshape(x.shape)


def bias_add(x, bias, plane, n, channels):
    return {"out": _biased(x, bias, plane).astype(x.dtype)}


def bias_relu(x, bias, plane, n, channels):
    return {"out": np.maximum(_biased(x, bias, plane), 0).astype(x.dtype)}


def bias_relu6(x, bias, plane, n, channels):
    return {"out": np.clip(_biased(x, bias, plane), 0, 6).astype(x.dtype)}


def _pool_windows(x, c, h, w, h_out, w_out, k, stride):
    return _windows(x.astype(np.float64).reshape(c, h, w), k, stride, 0)[:, :h_out, :w_out]


def max_pool2d(x, c, h, w, h_out, w_out, k, stride):
    return {"out": _pool_windows(x, c, h, w, h_out, w_out, k, stride).max(axis=(3, 4)).astype(x.dtype)}


def avg_pool2d(x, c, h, w, h_out, w_out, k, stride):
    return {"out": _pool_windows(x, c, h, w, h_out, w_out, k, stride).mean(axis=(3, 4)).astype(x.dtype)}


def softmax(x, n, rows, threads):
    x64 = x.astype(np.float64).reshape(rows, n)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    return {"out": (e / e.sum(axis=1, keepdims=True)).astype(x.dtype)}


def eltwise_add(a, b, n):
    a64, b64 = _f64(a, b)
    return {"out": (a64 + b64).astype(a.dtype)}


def image_relu6(x, width, height):
    return {"out": np.clip(x, 0, 6)}
