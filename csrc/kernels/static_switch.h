// Compile-time dispatch of runtime values, after flash-attention's switch macros: each expands to an
// if/else over the supported values and runs the lambda body with the value as a constexpr name.
#pragma once

#include <stdexcept>
#include <string>

#define PK_BOOL_SWITCH(COND, NAME, ...)    \
  [&] {                                    \
    if (COND) {                            \
      constexpr static bool NAME = true;   \
      return __VA_ARGS__();                \
    } else {                               \
      constexpr static bool NAME = false;  \
      return __VA_ARGS__();                \
    }                                      \
  }()

// The head dims the kernels are compiled for; a real head dim D (a multiple of 8) runs on the smallest
// compiled one >= D, its extra columns zero-filled on load and never stored.
#define PK_HEADDIM_SWITCH(HDIM, NAME, ...)                                               \
  [&] {                                                                                  \
    if ((HDIM) <= 32) {                                                                  \
      constexpr static int NAME = 32;                                                    \
      return __VA_ARGS__();                                                              \
    } else if ((HDIM) <= 64) {                                                           \
      constexpr static int NAME = 64;                                                    \
      return __VA_ARGS__();                                                              \
    } else if ((HDIM) <= 96) {                                                           \
      constexpr static int NAME = 96;                                                    \
      return __VA_ARGS__();                                                              \
    } else if ((HDIM) <= 128) {                                                          \
      constexpr static int NAME = 128;                                                   \
      return __VA_ARGS__();                                                              \
    } else {                                                                             \
      throw std::invalid_argument("prefix_kernels: no kernel for head dim " + std::to_string(HDIM)); \
    }                                                                                    \
  }()
