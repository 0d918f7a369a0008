#include "common.h"

/* 2-D convolution of one image (batch 1) in CHW layout, no bias (bias_act follows it).
   in [c_in][h][w], weights [c_out][c_in][kh][kw], out [c_out][h_out][w_out];
   zero padding `pad` on every side; one work-item per output element, global [w_out, h_out, c_out]. */

__kernel void conv2d_3x3(__global const STORAGE_TYPE *in,
                         __global const STORAGE_TYPE *weights,
                         __global STORAGE_TYPE *out,
                         const int c_in, const int h, const int w,
                         const int c_out, const int h_out, const int w_out,
                         const int stride, const int pad) {
  const int x = GLOBAL_ID0, y = GLOBAL_ID1, co = GLOBAL_ID2;
  if (x >= w_out || y >= h_out || co >= c_out) {
    return;
  }
  DATA_TYPE acc = 0;
  for (int ci = 0; ci < c_in; ++ci) {
    const int plane = ci * h;
    const int taps = (co * c_in + ci) * 9;
    for (int ky = 0; ky < 3; ++ky) {
      const int iy = y * stride - pad + ky;
      if (iy < 0 || iy >= h) {
        continue;
      }
      for (int kx = 0; kx < 3; ++kx) {
        const int ix = x * stride - pad + kx;
        if (ix >= 0 && ix < w) {
          acc += LOAD(in, (plane + iy) * w + ix) * LOAD(weights, taps + ky * 3 + kx);
        }
      }
    }
  }
  STORE(out, (co * h_out + y) * w_out + x, acc);
}

/* Pointwise (1x1, stride 1) convolution: a GEMM of weights [c_out][c_in] by in [c_in][hw].
   global [hw, c_out]. */
__kernel void conv2d_1x1(__global const STORAGE_TYPE *in,
                         __global const STORAGE_TYPE *weights,
                         __global STORAGE_TYPE *out,
                         const int c_in, const int hw, const int c_out) {
  const int p = GLOBAL_ID0, co = GLOBAL_ID1;
  if (p >= hw || co >= c_out) {
    return;
  }
  DATA_TYPE acc = 0;
  for (int ci = 0; ci < c_in; ++ci) {
    acc += LOAD(in, ci * hw + p) * LOAD(weights, co * c_in + ci);
  }
  STORE(out, co * hw + p, acc);
}
