// Stand-in for the header a CUDA build of torch generates; CPU wheels lack it. Used only by the
// `nvcc -c` compile check in tests/test_build.py, never by a real build.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
