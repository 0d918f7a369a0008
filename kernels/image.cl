#include "common.h"

/* An image2d_t kernel, for devices with CL_DEVICE_IMAGE_SUPPORT: MACE keeps activations in RGBA
   images, four channels per pixel. This one reads such an image (CL_RGBA, CL_FLOAT), applies relu6 and
   writes the pixels to a buffer [height][width][4] (MACE's image_to_buffer with a fused activation).
   global [width, height]. */

__constant sampler_t SAMPLER = CLK_NORMALIZED_COORDS_FALSE | CLK_ADDRESS_CLAMP | CLK_FILTER_NEAREST;

__kernel void image_relu6(__read_only image2d_t in, __global DATA_TYPE *out, const int width,
                          const int height) {
  const int x = GLOBAL_ID0, y = GLOBAL_ID1;
  if (x >= width || y >= height) {
    return;
  }
  const float4 pixel = read_imagef(in, SAMPLER, (int2)(x, y));
  vstore4(clamp(pixel, 0.0f, 6.0f), y * width + x, out);
}
