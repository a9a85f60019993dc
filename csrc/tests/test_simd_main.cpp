// Runs csrc/tests/test_simd.cpp (compiled for one instruction set) when this CPU has it. This file
// is compiled without the instruction set's flags, so the check runs before any of its code.
#include <cstdio>

int run_simd_tests();

int main() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports(KDPLUG_TEST_CPU) && __builtin_cpu_supports("fma"))) {
    std::printf("skipped: this CPU has no %s\n", KDPLUG_TEST_CPU);
    return 0;
  }
  std::printf("%s:\n", KDPLUG_TEST_CPU);
  return run_simd_tests() == 0 ? 0 : 1;
}
