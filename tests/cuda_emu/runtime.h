// Interface between the emulator's driver (driver.cpp), its engine (runtime.cpp) and the
// per-file kernel tables that scripts/cuda-emu.sh generates.
#pragma once
#include "kvs_emu.h"

#include <string>

namespace kvs_emu {
// One kernel of the emulated modules, registered by name before main.
struct Reg {
    Reg(const char* name, void (*fn)(void**), size_t param_bytes);
};
struct Kernel {
    void (*fn)(void**);
    size_t param_bytes;  // size of the kernel's one parameter struct
};
// The kernel of this name, or null.
const Kernel* find_kernel(const char* name);
// Run a kernel to completion on the calling thread (launches are serialised).
bool launch(const char* name, void (*fn)(void**), dim3 grid, dim3 block, size_t shared, void** params, std::string* error);
}  // namespace kvs_emu
