#include "common.h"

/* out = max(x, 0) */
__kernel void relu(__global const DATA_TYPE *x, __global DATA_TYPE *out, const int n) {
  const int i = GLOBAL_ID0;
  if (i < n) {
    out[i] = fmax(x[i], (DATA_TYPE)0);
  }
}
