#include "common.h"

/* Per-channel bias, then an activation, over x [channels][plane] (CHW with plane = h * w; a dense
   layer's output is channels = n, plane = 1). One work-item per element, global [n]. */

inline DATA_TYPE biased(__global const STORAGE_TYPE *x, __global const STORAGE_TYPE *bias,
                        const int i, const int plane) {
  return LOAD(x, i) + LOAD(bias, i / plane);
}

__kernel void bias_add(__global const STORAGE_TYPE *x, __global const STORAGE_TYPE *bias,
                       __global STORAGE_TYPE *out, const int plane, const int n) {
  const int i = GLOBAL_ID0;
  if (i < n) {
    STORE(out, i, biased(x, bias, i, plane));
  }
}

__kernel void bias_relu(__global const STORAGE_TYPE *x, __global const STORAGE_TYPE *bias,
                        __global STORAGE_TYPE *out, const int plane, const int n) {
  const int i = GLOBAL_ID0;
  if (i < n) {
    STORE(out, i, fmax(biased(x, bias, i, plane), (DATA_TYPE)0));
  }
}

__kernel void bias_relu6(__global const STORAGE_TYPE *x, __global const STORAGE_TYPE *bias,
                         __global STORAGE_TYPE *out, const int plane, const int n) {
  const int i = GLOBAL_ID0;
  if (i < n) {
    STORE(out, i, clamp(biased(x, bias, i, plane), (DATA_TYPE)0, (DATA_TYPE)6));
  }
}
