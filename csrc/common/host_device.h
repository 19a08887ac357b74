// What lets one math header compile in both worlds: under nvcc (the CUDA kernels of engine._C_cuda)
// POLAR_HD makes a function callable from host and device code; under a plain C++ compiler (the CPU
// references of engine._C) it is an ordinary inline function.
//
// The hd:: overloads are the few elementary functions the math headers need. On the GPU the float
// overload calls the single-precision device function by name (expf, never exp, which would promote
// to double); on the host both overloads call <cmath>. Nothing here depends on CUDA headers.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define POLAR_HD __host__ __device__ __forceinline__
#else
#define POLAR_HD inline
#endif

// Device-pass spelling of an elementary function, then the host one.
#if defined(__CUDA_ARCH__)
#define POLAR_HD_PICK(device_expr, host_expr) return device_expr
#else
#define POLAR_HD_PICK(device_expr, host_expr) return host_expr
#endif

namespace polar::hd {

POLAR_HD float exp(float x) { POLAR_HD_PICK(expf(x), std::exp(x)); }
POLAR_HD double exp(double x) { POLAR_HD_PICK(::exp(x), std::exp(x)); }

POLAR_HD float log(float x) { POLAR_HD_PICK(logf(x), std::log(x)); }
POLAR_HD double log(double x) { POLAR_HD_PICK(::log(x), std::log(x)); }

POLAR_HD float log1p(float x) { POLAR_HD_PICK(log1pf(x), std::log1p(x)); }
POLAR_HD double log1p(double x) { POLAR_HD_PICK(::log1p(x), std::log1p(x)); }

POLAR_HD float abs(float x) { POLAR_HD_PICK(fabsf(x), std::fabs(x)); }
POLAR_HD double abs(double x) { POLAR_HD_PICK(::fabs(x), std::fabs(x)); }

// fmax semantics on both sides: a NaN argument loses to a number.
POLAR_HD float max(float a, float b) { POLAR_HD_PICK(fmaxf(a, b), std::fmax(a, b)); }
POLAR_HD double max(double a, double b) { POLAR_HD_PICK(::fmax(a, b), std::fmax(a, b)); }

// The lowest finite value of x's type (an argument, not a template, to pick the overload).
POLAR_HD float lowest(float) { return -FLT_MAX; }
POLAR_HD double lowest(double) { return -DBL_MAX; }

// 1 / sqrt(x): the device's rsqrt instruction (at most 2 ulp in float) or the exact host quotient.
POLAR_HD float rsqrt(float x) { POLAR_HD_PICK(rsqrtf(x), 1.0f / std::sqrt(x)); }
POLAR_HD double rsqrt(double x) { POLAR_HD_PICK(::rsqrt(x), 1.0 / std::sqrt(x)); }

// a * b + c. The GPU rounds once (fma, which nvcc would contract a * b + c to anyway); the host
// keeps the two roundings, so the double loops of the CPU references stay plain SSE arithmetic
// (std::fma is a library call on x86-64 builds without -mfma).
POLAR_HD float madd(float a, float b, float c) { POLAR_HD_PICK(fmaf(a, b, c), a * b + c); }
POLAR_HD double madd(double a, double b, double c) { POLAR_HD_PICK(::fma(a, b, c), a * b + c); }

}  // namespace polar::hd

#undef POLAR_HD_PICK
