// The CUDA driver API calls kvsieve makes (through cudarc), answered on the CPU: one
// emulated device, host memory as device memory, synchronous streams, and kernels looked
// up by name in the emulated modules. Built into `target/cuda-emu/libcuda.so` by
// scripts/cuda-emu.sh; a process finds it through LD_LIBRARY_PATH.
#include <cuda.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>
#include <map>
#include <mutex>
#include <string>

#include "runtime.h"

// Both the plain and the versioned names are exported: cudarc may load either.
#undef cuDeviceGetUuid
#undef cuEventElapsedTime

namespace {

std::mutex mem_lock;
std::map<CUdeviceptr, std::pair<void*, size_t>> allocations;  // user address -> (mapping, mapping size)
thread_local CUcontext current_ctx = nullptr;
int ctx_token, module_token;
CUresult sticky = CUDA_SUCCESS;

struct Function {
    std::string name;
    const kvs_emu::Kernel* kernel;
};

// Work is done when it is queued, except on a stream being captured into a graph: there
// kernel launches, device copies and memsets are recorded, and calls that would allocate
// or wait for the host fail the capture (as on a GPU), which is what makes a capturable
// call checkable here.
struct Graph {
    std::vector<std::function<CUresult()>> ops;
};
struct Stream {
    Graph* capture = nullptr;
    bool invalidated = false;
};
thread_local Stream* capturing = nullptr;  // the stream this thread is capturing

Stream* stream_of(CUstream s) { return reinterpret_cast<Stream*>(s); }

// Record `op` when `s` is capturing, else run it.
CUresult queue(CUstream s, std::function<CUresult()> op) {
    Stream* st = stream_of(s);
    if (st && st->capture) {
        st->capture->ops.push_back(std::move(op));
        return CUDA_SUCCESS;
    }
    return op();
}

// A call that is not allowed while this thread captures a stream.
CUresult refuse_in_capture(const char* what) {
    if (!capturing) return CUDA_SUCCESS;
    capturing->invalidated = true;
    std::fprintf(stderr, "kvsieve CUDA emulator: %s during stream capture\n", what);
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

struct Event {
    std::chrono::steady_clock::time_point at;
};

const char* kDeviceName = "kvsieve CUDA emulator (CPU)";

// Each allocation ends just before an inaccessible page (at 256-byte granularity, as the
// driver aligns), so a read or write past its end faults, and starts filled with 0xFF bytes
// (NaN in f32, f16 and bf16), so a read of memory nothing wrote shows.
CUresult alloc(CUdeviceptr* out, size_t bytes) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = refuse_in_capture("cuMemAlloc")) return r;
    const size_t page = 4096, rounded = (bytes + 255) / 256 * 256, span = (rounded + page - 1) / page * page + page;
    void* base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    mprotect(static_cast<char*>(base) + span - page, page, PROT_NONE);
    char* user = static_cast<char*>(base) + span - page - rounded;
    std::memset(user, 0xff, rounded);
    std::lock_guard<std::mutex> g(mem_lock);
    *out = reinterpret_cast<CUdeviceptr>(user);
    allocations[*out] = {base, span};
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    if (p == 0) return CUDA_SUCCESS;
    if (CUresult r = refuse_in_capture("cuMemFree")) return r;
    std::lock_guard<std::mutex> g(mem_lock);
    auto it = allocations.find(p);
    if (it == allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    munmap(it->second.first, it->second.second);
    allocations.erase(it);
    return CUDA_SUCCESS;
}

int sm_count() {
    const char* s = std::getenv("KVSIEVE_EMU_SMS");
    int n = s ? std::atoi(s) : 0;
    return n > 0 ? n : 8;
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned int) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (size_t)len, "%s", kDeviceName);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid(CUuuid* u, CUdevice) { std::memset(u, 0, sizeof *u); return CUDA_SUCCESS; }
CUresult cuDeviceGetUuid_v2(CUuuid* u, CUdevice) { std::memset(u, 0, sizeof *u); return CUDA_SUCCESS; }
CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) { *b = (size_t)16 << 30; return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = sm_count(); break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = 48 << 10; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 227 << 10; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 0x7fffffff; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y:
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = reinterpret_cast<CUcontext>(&ctx_token);
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext c) { current_ctx = c; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* c) { *c = current_ctx; return CUDA_SUCCESS; }
CUresult cuCtxPushCurrent_v2(CUcontext c) { current_ctx = c; return CUDA_SUCCESS; }
CUresult cuCtxPopCurrent_v2(CUcontext* c) { if (c) *c = current_ctx; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return CUDA_SUCCESS; }
CUresult cuCtxSynchronize() {
    if (CUresult r = refuse_in_capture("cuCtxSynchronize")) return r;
    return sticky;
}
CUresult cuCtxSynchronize_v2(CUcontext) { return sticky; }

CUresult cuStreamCreate(CUstream* s, unsigned int) {
    *s = reinterpret_cast<CUstream>(new Stream());
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned int f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(CUstream s) { delete stream_of(s); return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(CUstream) {
    if (CUresult r = refuse_in_capture("cuStreamSynchronize")) return r;
    return sticky;
}
CUresult cuStreamBeginCapture_v2(CUstream s, CUstreamCaptureMode) {
    Stream* st = stream_of(s);
    if (!st || st->capture) return CUDA_ERROR_ILLEGAL_STATE;
    st->capture = new Graph();
    st->invalidated = false;
    capturing = st;
    return CUDA_SUCCESS;
}
CUresult cuStreamEndCapture(CUstream s, CUgraph* g) {
    Stream* st = stream_of(s);
    if (!st || !st->capture) return CUDA_ERROR_ILLEGAL_STATE;
    if (capturing == st) capturing = nullptr;
    Graph* graph = st->capture;
    st->capture = nullptr;
    if (st->invalidated) {
        delete graph;
        *g = nullptr;
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    *g = reinterpret_cast<CUgraph>(graph);
    return CUDA_SUCCESS;
}
CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus* status) {
    Stream* st = stream_of(s);
    *status = st && st->capture ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}
CUresult cuGraphInstantiateWithFlags(CUgraphExec* e, CUgraph g, unsigned long long) {
    *e = reinterpret_cast<CUgraphExec>(new Graph(*reinterpret_cast<Graph*>(g)));
    return CUDA_SUCCESS;
}
CUresult cuGraphLaunch(CUgraphExec e, CUstream s) {
    Graph* g = reinterpret_cast<Graph*>(e);
    return queue(s, [g]() {
        for (auto& op : g->ops)
            if (CUresult r = op()) return r;
        return CUDA_SUCCESS;
    });
}
CUresult cuGraphExecDestroy(CUgraphExec e) { delete reinterpret_cast<Graph*>(e); return CUDA_SUCCESS; }
CUresult cuGraphDestroy(CUgraph g) { delete reinterpret_cast<Graph*>(g); return CUDA_SUCCESS; }
CUresult cuStreamQuery(CUstream) { return sticky; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned int) { return sticky; }

CUresult cuEventCreate(CUevent* e, unsigned int) {
    *e = reinterpret_cast<CUevent>(new Event{std::chrono::steady_clock::now()});
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) { delete reinterpret_cast<Event*>(e); return CUDA_SUCCESS; }
CUresult cuEventRecord(CUevent e, CUstream) {
    reinterpret_cast<Event*>(e)->at = std::chrono::steady_clock::now();
    return sticky;
}
CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned int) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(CUevent) {
    if (CUresult r = refuse_in_capture("cuEventSynchronize")) return r;
    return sticky;
}
CUresult cuEventQuery(CUevent) { return sticky; }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    *ms = std::chrono::duration<float, std::milli>(reinterpret_cast<Event*>(b)->at - reinterpret_cast<Event*>(a)->at).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuModuleLoadData(CUmodule* m, const void*) {
    *m = reinterpret_cast<CUmodule>(&module_token);
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    const kvs_emu::Kernel* k = kvs_emu::find_kernel(name);
    if (!k) return CUDA_ERROR_NOT_FOUND;
    *f = reinterpret_cast<CUfunction>(new Function{name, k});
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction, CUfunction_attribute, int) { return CUDA_SUCCESS; }
CUresult cuFuncGetAttribute(int* v, CUfunction_attribute, CUfunction) { *v = 0; return CUDA_SUCCESS; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream stream, void** params, void** extra) {
    if (sticky != CUDA_SUCCESS) return sticky;
    if (!f || extra || !params) return CUDA_ERROR_INVALID_VALUE;
    const Function* fn = reinterpret_cast<const Function*>(f);
    // The parameters are copied when the launch is queued, as the driver does.
    std::vector<unsigned char> bytes(static_cast<unsigned char*>(params[0]), static_cast<unsigned char*>(params[0]) + fn->kernel->param_bytes);
    return queue(stream, [fn, bytes, gx, gy, gz, bx, by, bz, shared]() mutable {
        if (sticky != CUDA_SUCCESS) return sticky;
        void* args[1] = {bytes.data()};
        std::string error;
        if (!kvs_emu::launch(fn->name.c_str(), fn->kernel->fn, dim3(gx, gy, gz), dim3(bx, by, bz), shared, args, &error)) {
            std::fprintf(stderr, "kvsieve CUDA emulator: kernel %s: %s\n", fn->name.c_str(), error.c_str());
            if (error.rfind("block of", 0) == 0 || error.rfind("dynamic shared", 0) == 0 || error.rfind("grid", 0) == 0)
                return CUDA_ERROR_INVALID_VALUE;
            sticky = CUDA_ERROR_LAUNCH_FAILED;
            return sticky;
        }
        return CUDA_SUCCESS;
    });
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return alloc(p, n); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream) { return alloc(p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p); }
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    *free_b = (size_t)8 << 30;
    *total = (size_t)16 << 30;
    return CUDA_SUCCESS;
}
static CUresult copy(void* to, const void* from, size_t n) {
    std::memmove(to, from, n);
    return sticky;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    if (CUresult r = refuse_in_capture("cuMemcpyHtoD")) return r;
    return copy(reinterpret_cast<void*>(d), h, n);
}
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    if (CUresult r = refuse_in_capture("cuMemcpyDtoH")) return r;
    return copy(h, reinterpret_cast<void*>(d), n);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr a, CUdeviceptr b, size_t n) {
    if (CUresult r = refuse_in_capture("cuMemcpyDtoD")) return r;
    return copy(reinterpret_cast<void*>(a), reinterpret_cast<void*>(b), n);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream s) {
    return queue(s, [=]() { return copy(reinterpret_cast<void*>(d), h, n); });
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream s) {
    return queue(s, [=]() { return copy(h, reinterpret_cast<void*>(d), n); });
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr a, CUdeviceptr b, size_t n, CUstream s) {
    return queue(s, [=]() { return copy(reinterpret_cast<void*>(a), reinterpret_cast<void*>(b), n); });
}
extern "C++" {
// n elements of value v from d.
template <typename T>
static CUresult fill(CUdeviceptr d, T v, size_t n) {
    std::fill_n(reinterpret_cast<T*>(d), n, v);
    return sticky;
}
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    if (CUresult r = refuse_in_capture("cuMemsetD8")) return r;
    return fill(d, v, n);
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream s) { return queue(s, [=]() { return fill(d, v, n); }); }
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned int v, size_t n) {
    if (CUresult r = refuse_in_capture("cuMemsetD32")) return r;
    return fill(d, v, n);
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUstream s) { return queue(s, [=]() { return fill(d, v, n); }); }

struct ErrorText {
    CUresult code;
    const char* name;
    const char* text;
};
static const ErrorText kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure (emulated kernel failed; see stderr)"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED", "operation failed due to a previous error during capture"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "illegal state"},
};
static const ErrorText& error_text(CUresult e) {
    static const ErrorText unknown = {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"};
    for (const ErrorText& t : kErrors)
        if (t.code == e) return t;
    return unknown;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = error_text(e).text;
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = error_text(e).name;
    return CUDA_SUCCESS;
}

}  // extern "C"
