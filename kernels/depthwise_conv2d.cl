#include "common.h"

/* Depthwise 3x3 convolution (one filter per channel), CHW layout, no bias.
   in [c][h][w], weights [c][3][3], out [c][h_out][w_out]; zero padding `pad`;
   global [w_out, h_out, c]. */
__kernel void depthwise_conv2d(__global const STORAGE_TYPE *in,
                               __global const STORAGE_TYPE *weights,
                               __global STORAGE_TYPE *out,
                               const int c, const int h, const int w,
                               const int h_out, const int w_out,
                               const int stride, const int pad) {
  const int x = GLOBAL_ID0, y = GLOBAL_ID1, ch = GLOBAL_ID2;
  if (x >= w_out || y >= h_out || ch >= c) {
    return;
  }
  DATA_TYPE acc = 0;
  for (int ky = 0; ky < 3; ++ky) {
    const int iy = y * stride - pad + ky;
    for (int kx = 0; kx < 3; ++kx) {
      const int ix = x * stride - pad + kx;
      if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
        acc += LOAD(in, (ch * h + iy) * w + ix) * LOAD(weights, ch * 9 + ky * 3 + kx);
      }
    }
  }
  STORE(out, (ch * h_out + y) * w_out + x, acc);
}
