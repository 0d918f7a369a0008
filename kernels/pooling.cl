#include "common.h"

/* k x k pooling windows with a stride, no padding, CHW layout: in [c][h][w], out [c][h_out][w_out]
   with h_out = (h - k) / stride + 1; global [w_out, h_out, c]. */

__kernel void max_pool2d(__global const STORAGE_TYPE *in, __global STORAGE_TYPE *out,
                         const int c, const int h, const int w, const int h_out, const int w_out,
                         const int k, const int stride) {
  const int x = GLOBAL_ID0, y = GLOBAL_ID1, ch = GLOBAL_ID2;
  if (x >= w_out || y >= h_out || ch >= c) {
    return;
  }
  const int base = (ch * h + y * stride) * w + x * stride;
  DATA_TYPE best = LOAD(in, base);
  for (int ky = 0; ky < k; ++ky) {
    for (int kx = 0; kx < k; ++kx) {
      best = fmax(best, LOAD(in, base + ky * w + kx));
    }
  }
  STORE(out, (ch * h_out + y) * w_out + x, best);
}

__kernel void avg_pool2d(__global const STORAGE_TYPE *in, __global STORAGE_TYPE *out,
                         const int c, const int h, const int w, const int h_out, const int w_out,
                         const int k, const int stride) {
  const int x = GLOBAL_ID0, y = GLOBAL_ID1, ch = GLOBAL_ID2;
  if (x >= w_out || y >= h_out || ch >= c) {
    return;
  }
  const int base = (ch * h + y * stride) * w + x * stride;
  DATA_TYPE sum = 0;
  for (int ky = 0; ky < k; ++ky) {
    for (int kx = 0; kx < k; ++kx) {
      sum += LOAD(in, base + ky * w + kx);
    }
  }
  STORE(out, (ch * h_out + y) * w_out + x, sum / (DATA_TYPE)(k * k));
}
